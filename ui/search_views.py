"""View helpers of the Search page (app_pages/8_Search.py): labels of the searchable fields, the widgets that
narrow one field's declared range, and the study's charts and tables. Nothing here searches: the
search itself is cifar_core.experiments.search."""
from __future__ import annotations

import math
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from cifar_core.config import RunConfig
from cifar_core.params import Param
from ui.forms import human_label

# how each trial state is drawn (colour, line dash, end marker)
STATE_COLORS = {"complete": "#4c78a8", "pruned": "#9e9e9e", "running": "#f58518", "fail": "#e45756",
                "waiting": "#b279a2"}
STATE_DASH = {"complete": [1, 0], "pruned": [5, 3], "running": [1, 0], "fail": [2, 2], "waiting": [1, 0]}
STATE_SHAPE = {"complete": "circle", "pruned": "cross", "running": "triangle-right", "fail": "square",
               "waiting": "diamond"}
STATE_WORDS = {"complete": "completed", "pruned": "pruned", "running": "running", "fail": "failed",
               "waiting": "waiting"}


# ---- the searchable fields ---------------------------------------------------------------------------

def field_label(name: str) -> str:
    """Words for a searchable name: "lr" -> "Learning rate", "model_params.dropout" -> "Model options:
    Dropout", "augment.hflip" -> "Augmentation: hflip step (on/off)", "augment.rotation.degrees" ->
    "Augmentation: rotation · Degrees"."""
    parts = name.split(".")
    if parts[0] == "augment" and len(parts) == 2:
        return f"Augmentation: {parts[1]} step (on/off)"
    if parts[0] == "augment" and len(parts) == 3:
        option = "probability" if parts[2] == "p" else human_label(parts[2]).lower()
        return f"Augmentation: {parts[1]} {option}"
    if len(parts) == 2:  # <owner>_params.<option>
        return f"{RunConfig.labels().get(parts[0], human_label(parts[0]))}: {human_label(parts[1])}"
    return human_label(name)


def field_option(name: str) -> str:
    """A picker's option text: the words and the name a space file uses."""
    return f"{field_label(name)} · {name}"


def declared_text(param: Param) -> str:
    """The declared range of a searchable Param, in words."""
    if param.kind == "bool":
        return "on or off"
    if param.kind == "choice":
        return "one of " + ", ".join(map(str, param.choices))
    if param.low is None or param.high is None:
        return "no declared bound: give both"
    return f"{param.low:g} … {param.high:g}" + (" (log scale)" if param.log else "")


def _choice_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return ("on" if value else "off") if name.count(".") == 1 and name.startswith("augment.") else str(value).lower()
    return str(value)


def _step(value: float, typ: type) -> float | int:
    """The +/- step of a bound's number input: a tenth of the value's decade."""
    if typ is int:
        return 1
    if not value or not math.isfinite(value):
        return 0.01
    return 10.0 ** (math.floor(math.log10(abs(value))) - 1)


def range_editor(name: str, param: Param, key: str) -> dict:
    """The widgets that narrow one searched field (its declared range to start with): low/high number
    inputs and a log-scale box for numbers, a multiselect of the values for choices and switches.
    Returns the field's space entry ({"low", "high", "log"} or {"choices"}); the library checks it."""
    state = st.session_state
    about, *cells = st.columns([3, 2, 2, 1] if param.kind in ("int", "float") else [3, 5],
                               vertical_alignment="bottom")
    about.markdown(f"**{field_label(name)}** `{name}`")
    text = param.help.strip()
    about.caption((text.rstrip(".") + ". " if text else "") + f"Declared: {declared_text(param)}.")
    if param.kind in ("bool", "choice"):
        options = [False, True] if param.kind == "bool" else list(param.choices)
        if not isinstance(state.get(f"{key}.choices"), list) or any(c not in options for c in state[f"{key}.choices"]):
            state[f"{key}.choices"] = list(options)
        picked = cells[0].multiselect("Values to try", options, key=f"{key}.choices",
                                      format_func=lambda v: _choice_text(name, v),
                                      help="Two or more: the sampler picks among these.")
        return {"choices": list(picked)}
    typ = int if param.kind == "int" else float
    out: dict = {}
    for cell, bound, start in ((cells[0], "low", param.low), (cells[1], "high", param.high)):
        wkey = f"{key}.{bound}"
        if start is None:
            start = 0
        if not isinstance(state.get(wkey), typ) or isinstance(state.get(wkey), bool):
            state[wkey] = typ(start)
        kwargs = {"format": "%g"} if typ is float else {}
        out[bound] = typ(cell.number_input(bound, key=wkey, step=_step(state[wkey], typ),
                                           help=f"Declared {bound}: {start:g}. Narrow the range, never widen it.",
                                           **kwargs))
    state.setdefault(f"{key}.log", bool(param.log))
    out["log"] = bool(cells[2].checkbox("log", key=f"{key}.log",
                                        help="Sample on a log scale (needs low > 0): for learning rates, decays."))
    return out


def problems(exc: Exception) -> list[str]:
    """The problems a ConfigError lists (a space's SpaceError has several), one message each."""
    return list(getattr(exc, "problems", None) or [str(exc)])


# ---- a study's tables and charts -----------------------------------------------------------------------

def trials_table(frame: pd.DataFrame, runs_url: str) -> None:
    """One row per trial: state, value, the parameters, duration, the run (a link to the Runs page)."""
    params = [c for c in frame.columns if c.startswith("param ")]
    shown = frame[["trial", "state", "value", *params, "duration_s", "epochs", "run_id", "error"]].copy()
    shown["state"] = [STATE_WORDS.get(s, s) for s in shown["state"]]
    shown["value"] = 100 * shown["value"]
    shown["open"] = [f"{runs_url}?run={rid}" if isinstance(rid, str) else None for rid in shown["run_id"]]
    if shown["error"].isna().all():
        shown = shown.drop(columns=["error"])
    config = {"value": st.column_config.NumberColumn("val acc", format="%.2f %%",
                                                     help="The trial's final validation accuracy"),
              "duration_s": st.column_config.NumberColumn("duration (s)", format="%.0f"),
              "epochs": st.column_config.NumberColumn("epochs reported", format="%d"),
              "run_id": st.column_config.TextColumn("run id"),
              "open": st.column_config.LinkColumn("Runs page", display_text="open ↗")}
    for col in params:
        name = col[len("param "):]
        config[col] = st.column_config.Column(name, help=field_label(name))
    st.dataframe(shown, hide_index=True, width="stretch", column_config=config,
                 height=min(38 + 35 * max(1, len(shown)), 600))


def _end_points(curves: pd.DataFrame) -> pd.DataFrame:
    return curves.sort_values("epoch").groupby("trial", as_index=False).tail(1)


def _state_scales(states: list[str]) -> tuple[alt.Scale, alt.Scale, alt.Scale]:
    domain = [s for s in STATE_COLORS if s in states] + sorted(set(states) - set(STATE_COLORS))
    return (alt.Scale(domain=domain, range=[STATE_COLORS.get(s, "#333333") for s in domain]),
            alt.Scale(domain=domain, range=[STATE_DASH.get(s, [1, 0]) for s in domain]),
            alt.Scale(domain=domain, range=[STATE_SHAPE.get(s, "circle") for s in domain]))


def curves_chart(curves: pd.DataFrame, best: int | None, height: int = 320):
    """Each trial's validation accuracy per epoch (what the pruner saw): pruned trials dashed and grey
    with a cross where they were stopped, the best trial drawn thicker and named. None when there is no
    point."""
    if curves.empty:
        return None
    data = curves.assign(trial_label=[f"#{t}" for t in curves["trial"]], best=curves["trial"] == best)
    color, dash, shape = _state_scales(sorted(data["state"].unique()))
    tooltip = [alt.Tooltip("trial_label:N", title="trial"), "state:N", "epoch:Q",
               alt.Tooltip("val_acc:Q", format=".2%", title="val acc")]
    x = alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1, format="d"))
    y = alt.Y("val_acc:Q", title="validation accuracy", axis=alt.Axis(format=".1~%"), scale=alt.Scale(zero=False))
    # one legend: colour, dash and end marker share the field, the scales and the title
    lines = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x, y=y, detail="trial:N", tooltip=tooltip,
        color=alt.Color("state:N", scale=color, title="trial state"),
        strokeDash=alt.StrokeDash("state:N", scale=dash, title="trial state"),
        strokeWidth=alt.condition("datum.best", alt.value(3.5), alt.value(1.4)),
        opacity=alt.condition("datum.best", alt.value(1.0), alt.value(0.75)))
    ends = alt.Chart(_end_points(data)).mark_point(size=90, filled=True, opacity=1).encode(
        x=x, y=y, tooltip=tooltip, color=alt.Color("state:N", scale=color, title="trial state"),
        shape=alt.Shape("state:N", scale=shape, title="trial state"))
    best_end = _end_points(data[data["best"]]).assign(text=lambda d: [f"best {t}" for t in d["trial_label"]])
    labels = alt.Chart(best_end).mark_text(align="right", dx=-8, dy=-9, fontSize=11, fontWeight="bold").encode(
        x=x, y=y, text="text:N", color=alt.Color("state:N", scale=color, title="trial state"))
    return (lines + ends + labels).properties(height=height)


def history_chart(frame: pd.DataFrame, curves: pd.DataFrame, height: int = 320):
    """Optimization history: each completed trial's value by trial number and the best so far; pruned
    trials as grey crosses at the last value they reported. None before any trial has a value."""
    last = _end_points(curves).set_index("trial")["val_acc"] if not curves.empty else pd.Series(dtype=float)
    rows = []
    best = -math.inf
    for _, r in frame.sort_values("trial").iterrows():
        if r["state"] not in ("complete", "pruned"):
            continue  # running, failed or waiting: no value to show yet
        value = r["value"] if r["state"] == "complete" else last.get(r["trial"])
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if r["state"] == "complete":
            best = max(best, float(value))
        rows.append({"trial": int(r["trial"]), "value": float(value), "state": r["state"],
                     "best": best if best > -math.inf else None})
    if not rows:
        return None
    data = pd.DataFrame(rows)
    color, _dash, shape = _state_scales(sorted(data["state"].unique()))
    x = alt.X("trial:Q", title="trial", axis=alt.Axis(tickMinStep=1, format="d"))
    points = alt.Chart(data).mark_point(size=80, filled=True).encode(
        x=x, y=alt.Y("value:Q", title="validation accuracy", axis=alt.Axis(format=".1~%"), scale=alt.Scale(zero=False)),
        color=alt.Color("state:N", scale=color, title="trial state"),
        shape=alt.Shape("state:N", scale=shape, title="trial state"),
        tooltip=["trial:Q", "state:N", alt.Tooltip("value:Q", format=".2%", title="val acc (pruned: last reported)")])
    steps = alt.Chart(data.dropna(subset=["best"])).mark_line(interpolate="step-after", color="#e45756").encode(
        x=x, y=alt.Y("best:Q"), tooltip=["trial:Q", alt.Tooltip("best:Q", format=".2%", title="best so far")])
    return (steps + points).properties(height=height)


def importance_chart(values: dict[str, float], height_per_bar: int = 30):
    """fANOVA importances as horizontal bars, the most important on top."""
    data = pd.DataFrame({"parameter": list(values), "importance": [float(v) for v in values.values()]})
    data["label"] = [field_option(n) for n in data["parameter"]]
    order = list(data.sort_values("importance", ascending=False)["label"])
    return alt.Chart(data).mark_bar(color="#4c78a8").encode(
        y=alt.Y("label:N", sort=order, title=None, axis=alt.Axis(labelLimit=0)),
        x=alt.X("importance:Q", title="fANOVA importance",
                axis=alt.Axis(format="%")),
        tooltip=["parameter:N", alt.Tooltip("importance:Q", format=".1%")],
    ).properties(height=height_per_bar * len(data) + 40)


def parallel_figure(study):
    """Optuna's parallel-coordinates plot (plotly) of the completed trials."""
    import optuna
    figure = optuna.visualization.plot_parallel_coordinate(study, target_name="val acc")
    figure.update_layout(title=None, margin={"l": 50, "r": 30, "t": 30, "b": 90}, height=380)
    return figure


def state_counts_text(counts: dict[str, int]) -> str:
    order = [s for s in STATE_WORDS if s in counts] + sorted(set(counts) - set(STATE_WORDS))
    return ", ".join(f"{counts[s]} {STATE_WORDS.get(s, s)}" for s in order) or "no trial yet"
