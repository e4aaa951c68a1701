"""Forms generated from declarations: one widget per `Param`, one form per registry entry, the
augmentation chain editor and the whole RunConfig form.

Nothing here knows about a particular page. State conventions:
- every widget has an explicit key under the caller's prefix (``<prefix>.<name>``), so keys are stable
  across reruns and unique on a page;
- a widget's starting value is written to ``st.session_state[key]`` *before* the widget is created
  (never passed as ``value=`` as well), so callers can reset a form by clearing its keys
  (`reset_state`) and rendering it again with new values;
- widgets whose meaning depends on a choice (a model's parameters, a schedule's parameters, an
  augmentation step's parameters) are keyed by that choice (``model_params.<model>.<param>``,
  ``s<step uid>.<param>``), so they re-render from the right values when the choice changes.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import streamlit as st

from cifar_core.config import MODEL_PARAM_SECTIONS, SECTION_LABELS, RunConfig
from cifar_core.params import ConfigError, Param, Registry

# Labels of declared parameters that read badly when made from their names (see `human_label`).
PARAM_LABELS = {"lr": "Learning rate", "p": "Probability", "n_holes": "Number of holes",
                "mlp_ratio": "MLP ratio", "embed_dim": "Embedding width", "num_ops": "Operations per image",
                "drop_path": "Stochastic depth (drop path)", "pad_mode": "Padding mode",
                "sigma_color": "Sigma (colour)", "sigma_space": "Sigma (space)",
                "fit_images": "Images to fit on", "layer_scale_init": "LayerScale init",
                "class_depth": "Class-attention layers", "whiten": "Patch whitening"}


def human_label(name: str) -> str:
    """A form label for a declared name: RunConfig's own label for its fields, else PARAM_LABELS, else
    the name in words ("kernel_size" -> "Kernel size")."""
    labels = RunConfig.labels()
    if name in labels:
        return labels[name]
    if name in PARAM_LABELS:
        return PARAM_LABELS[name]
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _augmentations() -> Registry:
    from cifar_core.augment import AUGMENTATIONS
    return AUGMENTATIONS


def default_step_p(name: str) -> float:
    from cifar_core.augment.chain import default_step_p as default
    return default(name)


def validate_chain(chain: list) -> list[dict]:
    from cifar_core.augment import validate_chain as validate
    return validate(chain)


# ---------------------------------------------------------------------------------------------------
# state helpers
# ---------------------------------------------------------------------------------------------------

def reset_state(prefix: str) -> None:
    """Forget every session-state entry under `prefix` (widgets then start from their given values)."""
    for k in [k for k in st.session_state.keys() if isinstance(k, str) and k.startswith(prefix + ".")]:
        del st.session_state[k]


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value (for 'did this change?' checks)."""
    text = json.dumps(obj, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _as_widget_value(param: Param, value: Any) -> Any:
    """The validated value in the Python type its widget holds; ConfigError if invalid."""
    out = param.validate(value)
    if param.kind == "float_pair":
        return tuple(float(v) for v in out)
    if param.kind == "float":
        return float(out)
    return out


def _coerce(param: Param, value: Any) -> Any:
    """Like _as_widget_value, falling back to the default (then to a bound) if `value` is invalid."""
    for candidate in (value, param.default):
        try:
            return _as_widget_value(param, candidate)
        except (ConfigError, TypeError, ValueError):
            continue
    if param.kind in ("int", "float"):  # a default outside its own bounds: clamp
        typ = int if param.kind == "int" else float
        return typ(param.low if param.low is not None else param.high)
    return param.default


# ---------------------------------------------------------------------------------------------------
# one parameter
# ---------------------------------------------------------------------------------------------------

def _on_grid(x: float, step: float) -> bool:
    return abs(x / step - round(x / step)) < 1e-6


def _float_step(param: Param) -> float:
    default = abs(float(param.default or 0.0))
    if default > 0:
        return 10.0 ** (math.floor(math.log10(default)) - 1)
    if param.low is not None and param.high is not None and param.high > param.low:
        return 10.0 ** (math.floor(math.log10(param.high - param.low)) - 2)
    return 0.01


def widget_kind(param: Param) -> str:
    """Which control renders a param (a key of WIDGETS): 'slider' | 'log' | 'number' | 'checkbox' |
    'select' | 'range' | 'pair' | 'text'.

    Depends on the declaration only (never on the current value), so a widget keeps its type and
    state while the user edits it."""
    bounded = param.low is not None and param.high is not None
    if param.kind in SIMPLE_KINDS:
        return SIMPLE_KINDS[param.kind]
    if param.kind == "float_pair":
        return "range" if bounded else "pair"
    if param.kind == "int":
        return "slider" if bounded and param.high - param.low <= 64 else "number"
    if bounded and param.log and param.low > 0:
        return "log"
    # linear float: a slider only for a small range whose bounds and default sit on a 0.01 grid
    if (bounded and param.high - param.low <= 2
            and all(_on_grid(float(v), 0.01) for v in (param.low, param.high, param.default))):
        return "slider"
    return "number"


SIMPLE_KINDS = {"bool": "checkbox", "choice": "select", "str": "text"}
LOG_MANTISSAS = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)  # ten steps a decade, round numbers


def _help(param: Param) -> str:
    parts = [param.help.strip()] if param.help else []
    if param.low is not None and param.high is not None:
        parts.append(f"Range {param.low:g} … {param.high:g}" + (" (log scale)." if param.log else "."))
    elif param.low is not None:
        parts.append(f"At least {param.low:g}.")
    if param.kind == "choice":
        parts.append("Choices: " + ", ".join(map(str, param.choices)) + ".")
    default = param.default
    parts.append(f"Default: {list(default) if isinstance(default, tuple) else default!r}.")
    return " ".join(parts)


@dataclass(frozen=True)
class Look:
    """How a control is drawn, whatever its kind."""
    label: str
    help: str
    disabled: bool = False
    format_func: Callable[[Any], str] = str


def _bounds(param: Param, typ: type) -> tuple[Any, Any]:
    return (None if param.low is None else typ(param.low)), (None if param.high is None else typ(param.high))


def _checkbox(param: Param, key: str, look: Look) -> bool:
    return bool(st.checkbox(look.label, key=key, help=look.help, disabled=look.disabled))


def _select(param: Param, key: str, look: Look) -> Any:
    return st.selectbox(look.label, list(param.choices), key=key, help=look.help, disabled=look.disabled,
                        format_func=look.format_func)


def _text(param: Param, key: str, look: Look) -> str:
    return st.text_input(look.label, key=key, help=look.help, disabled=look.disabled)


def _slider(param: Param, key: str, look: Look) -> int | float:
    typ = int if param.kind == "int" else float
    lo, hi = _bounds(param, typ)
    return typ(st.slider(look.label, lo, hi, key=key, step=1 if typ is int else 0.01, help=look.help,
                         disabled=look.disabled))


def _number(param: Param, key: str, look: Look) -> int | float:
    if param.kind == "int":
        lo, hi = _bounds(param, int)
        return int(st.number_input(look.label, min_value=lo, max_value=hi, step=1, key=key, help=look.help,
                                   disabled=look.disabled))
    lo, hi = _bounds(param, float)
    return float(st.number_input(look.label, min_value=lo, max_value=hi, step=_float_step(param), format="%g",
                                 key=key, help=look.help, disabled=look.disabled))


def log_options(param: Param, *extra: float) -> list[float]:
    """The stops of a log slider: LOG_MANTISSAS in every decade between the bounds, plus the bounds,
    the default and `extra` (the value shown), so every valid value it starts from is a stop."""
    lo, hi = float(param.low), float(param.high)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    stops = [float(f"{m}e{e}") for e in decades for m in LOG_MANTISSAS] + [lo, hi, float(param.default)]
    # one stop per label; where two share one, the later wins: the given values over the round stops
    by_text = {f"{v:g}": v for v in stops + [float(v) for v in extra] if lo <= v <= hi}
    return sorted(by_text.values())


def _log_slider(param: Param, key: str, look: Look) -> float:
    options = log_options(param, st.session_state[key])
    return float(st.select_slider(look.label, options, key=key, format_func=lambda v: f"{v:g}", help=look.help,
                                  disabled=look.disabled))


def _range(param: Param, key: str, look: Look) -> list[float]:
    lo, hi = float(param.low), float(param.high)
    step = 10.0 ** (math.floor(math.log10(hi - lo)) - 2) if hi > lo else 0.01
    pair = st.slider(look.label, lo, hi, key=key, step=step, format="%g", help=look.help, disabled=look.disabled)
    return [float(pair[0]), float(pair[1])]


def _pair(param: Param, key: str, look: Look) -> list[float]:
    """An unbounded pair: two number inputs side by side (their own keys under `key`)."""
    state = st.session_state
    pair = state[key]
    a, b = st.columns(2)
    k0, k1 = f"{key}.low", f"{key}.high"
    state.setdefault(k0, float(pair[0]))
    state.setdefault(k1, float(pair[1]))
    v0 = a.number_input(f"{look.label} (low)", key=k0, format="%g", help=look.help, disabled=look.disabled)
    v1 = b.number_input(f"{look.label} (high)", key=k1, format="%g", disabled=look.disabled)
    return [float(v0), float(v1)]


# widget kind -> fn(param, key, look) -> value; the starting value is already in st.session_state[key]
WIDGETS: dict[str, Callable[[Param, str, Look], Any]] = {
    "checkbox": _checkbox, "select": _select, "text": _text, "slider": _slider, "number": _number,
    "log": _log_slider, "range": _range, "pair": _pair,
}


def param_widget(param: Param, key: str, value: Any = None, label: str | None = None,
                 disabled: bool = False, format_func=None) -> Any:
    """Render the control for one declared parameter and return its current value.

    `value` is the starting value (the declared default when None); it is used only the first time
    the key is seen (or after `reset_state`): afterwards the user's value stays."""
    start = _coerce(param, param.default if value is None else value)
    state = st.session_state
    if key not in state:
        state[key] = start
    else:  # keep the user's value, but never hand a widget a value (or type) it cannot show
        try:
            current = _as_widget_value(param, state[key])
        except (ConfigError, TypeError, ValueError):
            current = start
        if type(current) is not type(state[key]) or current != state[key]:
            state[key] = current
    look = Look(label or human_label(param.name), _help(param), disabled, format_func or str)
    return WIDGETS[widget_kind(param)](param, key, look)


def _grid(n_cols: int):
    """Yield column containers round-robin, creating a new row every n_cols items."""
    i = 0
    cols = None
    while True:
        if i % n_cols == 0:
            cols = st.columns(n_cols)
        yield cols[i % n_cols]
        i += 1


# ---------------------------------------------------------------------------------------------------
# one registry entry
# ---------------------------------------------------------------------------------------------------

def registry_params_form(registry: Registry, name: str, key_prefix: str, values: dict | None = None,
                         columns: int = 3, only: Callable[[str], bool] | None = None) -> dict:
    """Render the declared parameters of `registry[name]` (those for which `only(param name)` holds,
    all by default); returns {param: value}."""
    entry = registry.get(name)
    values = values or {}
    out = {}
    params = [p for p in entry.params if only is None or only(p.name)]
    if not params:
        return out
    cells = _grid(columns)
    for param in params:
        with next(cells):
            out[param.name] = param_widget(param, f"{key_prefix}.{param.name}", values.get(param.name))
    return out


def registry_chooser(registry: Registry, key: str, value: str | None, label: str,
                     help_text: str = "") -> str:
    """A selectbox over a registry's names (description shown under it)."""
    names = registry.names()
    default = value if value in names else names[0]
    choice = Param(label, "choice", default, choices=tuple(names), help=help_text)
    pick, about = st.columns([1, 2], vertical_alignment="bottom")
    with pick:
        name = param_widget(choice, key, value, label=human_label(label))
    entry = registry.get(name)
    text = entry.description or ""
    if not entry.params:
        text += " No parameters to set."
    about.caption(text.strip())
    return name


# ---------------------------------------------------------------------------------------------------
# augmentation chain editor
# ---------------------------------------------------------------------------------------------------

def _steps_key(key: str) -> str:
    return f"{key}.__steps"


def _new_uid(key: str) -> int:
    counter = f"{key}.__next_uid"
    uid = st.session_state.get(counter, 0)
    st.session_state[counter] = uid + 1
    return uid


def set_augment_chain(key: str, chain: list[dict] | None) -> None:
    """Replace the editor's chain (e.g. a page loading a preset); widgets start from the new values."""
    reset_state(key)
    steps = []
    for spec in chain or []:
        if not isinstance(spec, dict):
            continue
        name, params = spec.get("name"), dict(spec.get("params") or {})
        try:  # one probability per step: an older flip's p_flip is folded into p, as validation does
            (step,) = validate_chain([spec])
            params, p = dict(step["params"]), step["p"]
        except (ConfigError, TypeError, ValueError):  # shown as it is; the form reports the problem
            p = spec.get("p", default_step_p(name) if isinstance(name, str) else 1.0)
        steps.append({"uid": _new_uid(key), "name": name, "params": params, "p": p})
    st.session_state[_steps_key(key)] = steps


def _move(key: str, uid: int, delta: int) -> None:
    steps = st.session_state[_steps_key(key)]
    i = next(i for i, s in enumerate(steps) if s["uid"] == uid)
    j = i + delta
    if 0 <= j < len(steps):
        steps[i], steps[j] = steps[j], steps[i]


def _remove(key: str, uid: int) -> None:
    st.session_state[_steps_key(key)] = [s for s in st.session_state[_steps_key(key)] if s["uid"] != uid]


def _add(key: str) -> None:
    name = st.session_state.get(f"{key}.__add_choice")
    if name:
        st.session_state[_steps_key(key)].append({"uid": _new_uid(key), "name": name, "params": {},
                                                  "p": default_step_p(name)})


def _clear(key: str) -> None:
    st.session_state[_steps_key(key)] = []


_P_HELP = "Probability that this step is applied to an image (each image drawn separately)."
STEP_P_LABELS = {"hflip": "Flip probability (p)", "vflip": "Flip probability (p)"}
STEP_ICONS = {"up": ":material/arrow_upward:", "down": ":material/arrow_downward:", "remove": ":material/close:",
              "add": ":material/add:", "clear": ":material/clear_all:"}


def step_probability_param(name: str) -> Param:
    """The declared probability p of a chain step (its default is the step's own: 0.5 for the flips)."""
    return Param("p", "float", default_step_p(name) if isinstance(name, str) else 1.0, 0.0, 1.0, help=_P_HELP)


def augment_chain_editor(key: str, chain: list[dict] | None = None) -> list[dict]:
    """Edit an ordered augmentation chain; returns [{"name", "params", "p"}, ...] (not yet validated).

    `chain` seeds the editor the first time `key` is seen (use `set_augment_chain` to replace it
    later). Steps are kept in st.session_state[f"{key}.__steps"]; each step's widgets are keyed by a
    per-step id, so moving a step keeps its values."""
    registry = _augmentations()
    if _steps_key(key) not in st.session_state:
        set_augment_chain(key, chain)
    steps = st.session_state[_steps_key(key)]
    out = []
    if not steps:
        st.caption("No augmentation: training images are used as they are.")
    for i, step in enumerate(steps):
        uid, name = step["uid"], step["name"]
        with st.container(border=True):
            entry = registry.entries.get(name)
            tags = f" · {', '.join(entry.tags)}" if entry and entry.tags else ""
            with st.container(horizontal=True, vertical_alignment="center", gap="small"):
                # the title takes the room left by the buttons, which keep their own width; they are
                # icon-only (Material Symbols, drawn with Streamlit's own font: arrows typed as text
                # may be missing from the browser's font and render empty), their words in the tooltip
                st.markdown(f"**{i + 1}. {name}**{tags}", width="stretch")
                st.button("", icon=STEP_ICONS["up"], key=f"{key}.s{uid}.up", help="Move up", disabled=i == 0,
                          on_click=_move, args=(key, uid, -1))
                st.button("", icon=STEP_ICONS["down"], key=f"{key}.s{uid}.down", help="Move down",
                          disabled=i == len(steps) - 1, on_click=_move, args=(key, uid, 1))
                st.button("", icon=STEP_ICONS["remove"], key=f"{key}.s{uid}.remove", help="Remove this step",
                          on_click=_remove, args=(key, uid))
            if entry is None:
                st.error(f"unknown augmentation {name!r} (choose from: {', '.join(registry.names())}); "
                         "remove this step")
                out.append({"name": name, "params": step["params"], "p": step["p"]})
                continue
            if entry.description:
                st.caption(entry.description)
            params, cells = {}, _grid(3)
            for param in entry.params:
                with next(cells):
                    params[param.name] = param_widget(param, f"{key}.s{uid}.{param.name}",
                                                      step["params"].get(param.name))
            with next(cells):
                p = param_widget(step_probability_param(name), f"{key}.s{uid}.p", step["p"],
                                 label=STEP_P_LABELS.get(name, "Probability (p)"))
        step["params"], step["p"] = params, p  # so the chain survives the widgets being cleaned up
        out.append({"name": name, "params": params, "p": p})

    names = registry.names()

    def describe(n: str) -> str:
        tags = registry.get(n).tags
        return f"{n} ({', '.join(tags)})" if tags else n

    # one row that wraps: the buttons keep their whole label whatever the width of the page
    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        with st.container(width=320):
            st.selectbox("Add a step", names, key=f"{key}.__add_choice", format_func=describe,
                         help="Steps run in order; each applies to an image with its probability p.")
        st.button("Add", icon=STEP_ICONS["add"], key=f"{key}.__add", on_click=_add, args=(key,), width="content")
        st.button("Clear all", icon=STEP_ICONS["clear"], key=f"{key}.__clear", on_click=_clear, args=(key,),
                  disabled=not steps, width="content")
    return out


# ---------------------------------------------------------------------------------------------------
# the whole RunConfig
# ---------------------------------------------------------------------------------------------------

def initial_dict(initial: RunConfig | dict | None) -> dict:
    """A full RunConfig dict: RunConfig's defaults overlaid with `initial` (unknown keys dropped)."""
    base = RunConfig().to_dict()
    if isinstance(initial, RunConfig):
        initial = initial.to_dict()
    for k, v in (initial or {}).items():
        if k in base:
            base[k] = v
    return json.loads(json.dumps(base, default=list))


_OWNER_HELP = {
    "model": "The network. Its own parameters appear below and change with the choice.",
    "schedule": "How the learning rate changes during training (a multiplier of lr).",
    "imbalance": "Make the training pool class-imbalanced (applied after the validation hold-out).",
    "balance": "How training counters class imbalance (sampling or loss weights).",
}


def config_form(initial: RunConfig | dict | None, key: str, columns: int = 3) -> dict:
    """Render the whole RunConfig, grouped in tabs by section; returns the raw dict (not validated).

    When `initial` changes (another preset, another run to start from) every widget under `key` is
    reset to it; while it stays the same, the user's edits are kept. The form is also reset when the
    page is entered afresh (Streamlit forgets widget values of pages not shown)."""
    init = initial_dict(initial)
    sig = fingerprint(init)
    sentinel = f"{key}.name"  # a widget key: gone after the page was left
    if st.session_state.get(f"{key}.__initial") != sig or sentinel not in st.session_state:
        reset_state(key)
        st.session_state[f"{key}.__initial"] = sig

    by_owner = RunConfig.registries()
    scalars = RunConfig.scalar_params()
    values: dict[str, Any] = {}
    sections = RunConfig.sections()
    model_registry = by_owner["model"]

    def model_params_in(section: str) -> Callable[[str], bool]:
        return lambda name: MODEL_PARAM_SECTIONS.get(name, "model") == section

    def render_model_params(section: str) -> None:
        """The chosen model's parameters that belong to `section` (dropout sits with the regularizers)."""
        choice = values["model"]
        wanted = model_params_in(section)
        model_values = values.setdefault("model_params", {})
        if not any(wanted(param.name) for param in model_registry.get(choice).params):
            return
        if section != "model":
            st.caption(f"Of the model ({choice}):")
        start = init["model_params"] if choice == init["model"] else None
        model_values.update(registry_params_form(model_registry, choice, f"{key}.model_params.{choice}", start,
                                                 columns=columns, only=wanted))

    tabs = st.tabs([SECTION_LABELS.get(s, s.title()) for s in sections])
    for tab, (section, names) in zip(tabs, sections.items()):
        with tab:
            cells = _grid(columns)
            for name in names:
                if name == "augment":
                    values["augment"] = augment_chain_editor(f"{key}.augment", init["augment"])
                    continue
                if name in by_owner or name.endswith("_params"):
                    continue  # rendered as a group after the section's plain fields
                if not RunConfig.applies(name, {**init, **values}):
                    values[name] = init[name]  # no effect now: not shown, the starting value kept
                    continue
                with next(cells):
                    values[name] = param_widget(scalars[name], f"{key}.{name}", init[name])
            if section != "model" and section in MODEL_PARAM_SECTIONS.values():
                render_model_params(section)
            for i, owner in enumerate(n for n in names if n in by_owner):
                registry = by_owner[owner]
                if i or len(names) > 2:  # other fields above: set the group apart
                    st.divider()
                choice = registry_chooser(registry, f"{key}.{owner}", init[owner], owner,
                                          _OWNER_HELP.get(owner, ""))
                values[owner] = choice
                if owner == "model":
                    render_model_params("model")
                    continue
                start = init[f"{owner}_params"] if choice == init[owner] else None
                values[f"{owner}_params"] = registry_params_form(
                    registry, choice, f"{key}.{owner}_params.{choice}", start, columns=columns)
    # keep RunConfig's field order
    return {name: values[name] for name in init if name in values}


def config_json_editor(seed: dict, key: str, what: str, caption: str) -> tuple[RunConfig | None, bool]:
    """A run config as editable JSON in an expander, started over from `seed` whenever `seed` changes;
    `what` names it in the messages ("The fixed config"). Returns (the validated config or None, whether
    the text was readable); each problem is shown as its own error."""
    text_key, sig_key = f"{key}.json", f"{key}.json_sig"
    if st.session_state.get(sig_key) != fingerprint(seed) or text_key not in st.session_state:
        checked, _errors = RunConfig.checked(seed)  # shown below, when the text is read back
        st.session_state[text_key] = json.dumps(checked.to_dict() if checked is not None else seed, indent=2)
        st.session_state[sig_key] = fingerprint(seed)
    with st.expander(f"{what} as JSON (edit any field)"):
        st.caption(caption)
        text = st.text_area(f"{what} (JSON)", key=text_key, height=360, label_visibility="collapsed")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        st.error(f"{what} is not valid JSON: {exc}")
        return None, False
    if not isinstance(values, dict):
        st.error(f"{what} must be a JSON object of RunConfig fields.")
        return None, False
    cfg, errors = RunConfig.checked(values)
    for message in errors:
        st.error(f"{what}: {message}")
    return cfg, True
