"""Train: pick a preset (or a past run, or a chain from the previewer), change anything, launch a
background job. The form is generated from RunConfig's declarations (ui/forms.py)."""
from __future__ import annotations

import json
import shlex


import streamlit as st

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.engine.distill import check_teacher_run, teacher_candidates
from cifar_core.models import MODELS
from cifar_core.params import ConfigError
from cifar_core.experiments.presets import presets
from ui.common import data_source, data_status, device_info, friendly_errors, get_store
from ui.forms import config_form, fingerprint, validate_config

RUNS_PAGE = "pages/2_Runs.py"
FORM_KEY = "train.form"
TEACHER_PICK = "train.teacher_pick"

# Training throughput in images/s at batch 128 (forward + backward + SGD step, fp32, default model
# parameters), measured on this project's dev box: 2 CPU cores, torch 2.14, with a timing script
# (random tensors, 2 warm-up steps, then timed steps) run in the venv on 2026-11-26. Other jobs kept
# both cores busy most of the time, so each number is the fastest of several methods/rounds:
#   single-thread CPU time per step: lenet 17 ms, fastnet 1045 ms, alexnet 1345 ms,
#     resnet18 5896 ms, resnet34 9677 ms;
#   2 threads, fastest step seen in a quiet moment: lenet 21 ms (6,200 img/s), alexnet 713 ms (180),
#     resnet18 2727 ms (47), resnet34 4698 ms (27) — about twice the single-thread speed;
#   fastnet, 2 threads on a quiet machine: 173-216 img/s at batch 256-1024 (bench/README.md), and
#     180-185 img/s over the whole fast preset run.
#   vit / cait at their preset sizes (ViT-tiny 2.7 M, CaiT-tiny 3.0 M parameters), batch 128, from
#     bench/bench_vit.py on the loaded box: 39-55 (vit) and 61-64 (cait) img/s on 1 thread, lower bounds.
# GPU numbers are NOT measured: CPU × CUDA_SPEEDUP_GUESS, labelled as a rough guess on the page.
CPU_IMAGES_PER_S = {"lenet": 6000.0, "fastnet": 185.0, "alexnet": 180.0, "resnet18": 45.0, "resnet34": 26.0,
                    "vit": 45.0, "cait": 60.0}
# Convolution nets on the CPU, by (channels_last, bf16): bench/bench_step.py, fastnet at batch 1024,
# 2 threads, quiet machine: fp32 contiguous 197.4, channels_last 249.3, bf16 338.6, both 500.6 img/s.
# (bf16 barely changes the transformers here, so they get no factor.)
CPU_CNN_FORMAT_SPEEDUP = {(False, False): 1.0, (True, False): 1.26, (False, True): 1.72, (True, True): 2.54}
CUDA_SPEEDUP_GUESS = 10.0
EVAL_SPEEDUP = 3.0  # evaluation is a forward pass only: roughly 3× a training step's throughput
STARTUP_SECONDS = 10.0  # process start, imports, loading CIFAR-10 into memory

# ---------------------------------------------------------------------------------------------------
st.set_page_config(page_title="Train · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Train a model")
st.caption("Start from a preset, a past run or an augmentation chain from the previewer, change whatever "
           "you like and launch: the run is queued as a background job and keeps going when you leave "
           "the page. Every field is checked as you type.")

store = get_store()
data = data_status()
if not data["ok"]:
    st.warning(f"{data['message']}\n\nLaunching is disabled until CIFAR-10 is found (see the Home page).")

# ---- where the form starts from -------------------------------------------------------------------
PRESETS = presets()
query = st.query_params
from_run_id, from_run_config = query.get("from_run"), None
if from_run_id:
    with friendly_errors("Loading the run to start from"):
        record = store.record(from_run_id)  # ConfigError for ids that are not plain names
        if not record.exists():
            raise ConfigError(f"run {from_run_id!r} was not found in {store.root}; starting from a preset")
        config = record.config_dict()
        if not isinstance(config, dict):
            raise ConfigError(f"run {from_run_id} has no readable config.json; starting from a preset")
        from_run_config = config

chain_override = None
if query.get("chain"):
    with friendly_errors("Reading the augmentation chain from the link"):
        from cifar_core.augment import validate_chain
        from cifar_core.config import parse_augment
        chain_override = validate_chain(parse_augment(query["chain"]))

run_option = f"run {from_run_id}" if from_run_config is not None else None
options = ([run_option] if run_option else []) + list(PRESETS)
wanted = query.get("preset")
if wanted and wanted not in PRESETS:
    st.error(f"unknown preset {wanted!r} in the link (choose from: {', '.join(PRESETS)})")
    wanted = None
default = run_option or wanted or options[0]
if st.session_state.get("train.start") not in options or st.session_state.get("train.start_default") != default:
    # a new link (other preset / run): select what it asks for
    st.session_state["train.start"] = default
    st.session_state["train.start_default"] = default

left, right = st.columns([2, 3], vertical_alignment="bottom")
start = left.selectbox("Start from", options, key="train.start",
                       help="A preset fills the whole form; you can still change any field. "
                            "'run …' relaunches a past run with your changes.")
if start == run_option:
    initial = from_run_config
    right.info(f"Prefilled from run **{from_run_id}**: change what you want and launch a new run.")
else:
    initial = PRESETS[start]
    right.caption("Presets: the source report's baseline, a fast recipe, a seconds-long smoke test, and "
                  "each step of the report's cumulative trick ablation (each step adds one trick).")
if chain_override is not None:
    initial = {**initial, "augment": chain_override}
    st.info(f"The augmentation chain comes from the link ({len(chain_override)} step(s)).")

# ---- the form -------------------------------------------------------------------------------------
values = None
with st.container(border=True), friendly_errors("Building the form"):
    values = config_form(initial, key=FORM_KEY)
if values is None:
    st.stop()


# ---- teacher for distillation: a picker over the finished runs that fills the form's teacher_run ----
def _use_picked_teacher():
    if st.session_state.get(TEACHER_PICK):
        st.session_state[f"{FORM_KEY}.teacher_run"] = st.session_state[TEACHER_PICK]


if values.get("distill", "none") != "none":
    with friendly_errors("Listing the runs that can teach"):
        candidates = {c["run_id"]: c for c in teacher_candidates(store)}
        if not candidates:
            st.info(f"Distillation needs a teacher: no completed run in {store.root} yet. Train one first "
                    "(the **fast** preset makes a strong CNN teacher).")
        else:
            st.session_state[TEACHER_PICK] = values.get("teacher_run") if values.get("teacher_run") in candidates else ""

            def _label(run_id: str) -> str:
                if not run_id:
                    return "choose a completed run…"
                c = candidates[run_id]
                acc = f"{c['test_acc']:.1%}" if isinstance(c["test_acc"], (int, float)) else "?"
                return f"{run_id} · {c['model']} · test {acc}"

            st.selectbox("Teacher run", [""] + list(candidates), key=TEACHER_PICK, format_func=_label,
                         on_change=_use_picked_teacher,
                         help="A completed run in this runs folder; its best checkpoint (else its last) "
                              "teaches. Fills teacher_run in the Distill tab.")

cfg, errors = validate_config(values)
if cfg is not None and cfg.distill != "none":
    try:  # the config alone cannot know whether the run exists and has finished
        check_teacher_run(store, cfg.teacher_run)
    except ConfigError as exc:
        cfg, errors = None, [str(exc)]
for message in errors:
    st.error(message)


# ---- estimate ---------------------------------------------------------------------------------------
def training_images(c: RunConfig) -> int:
    """Images per epoch, from the config alone (imbalance and balancing approximated per class)."""
    from cifar_core.data import long_tail_counts, step_counts
    pool = {"full": 50000, "random": c.subset_size, "per_class": 10 * c.per_class}[c.subset]
    per_class = [max(0, pool - c.val_size) / 10.0] * 10
    p = c.imbalance_params
    if c.imbalance == "report_random":
        per_class = [min(n, (p["low"] + p["high"]) / 2) for n in per_class]
    elif c.imbalance == "long_tail":
        per_class = [float(v) for v in long_tail_counts(min(p["n_max"], int(per_class[0])), p["imbalance_ratio"])]
    elif c.imbalance == "step":
        per_class = [float(v) for v in step_counts(min(p["n_max"], int(per_class[0])), p["imbalance_ratio"],
                                                   p["minority_classes"])]
    if c.label_budget:
        per_class = [min(n, c.label_budget / 10) for n in per_class]
    if c.balance == "random_oversample":
        per_class = [max(per_class)] * 10
    elif c.balance == "random_undersample":
        per_class = [min(per_class)] * 10
    return int(sum(per_class))


def estimate_seconds(c: RunConfig, device_kind: str) -> tuple[float, float]:
    """(seconds, images/s) for the whole run: training epochs plus evaluations."""
    ips = CPU_IMAGES_PER_S.get(c.model, 200.0)
    width = c.model_params.get("width", 1.0) if isinstance(c.model_params, dict) else 1.0
    ips /= max(0.05, float(width)) ** 2  # conv cost grows with width²: a rough scaling
    if c.model_params.get("stem") == "imagenet":
        ips *= 8.0  # 8×8 instead of 32×32 maps in the first stage: roughly that much cheaper
    if device_kind == "cuda":
        ips *= CUDA_SPEEDUP_GUESS
    elif c.model in MODELS.names() and "cnn" in MODELS.get(c.model).tags:
        ips *= CPU_CNN_FORMAT_SPEEDUP[(bool(c.channels_last), c.precision == "bf16")]
    train = c.epochs * training_images(c) / ips
    test_images = getattr(c, "test_size", 0) or 10000
    eval_images = c.val_size or test_images
    n_evals = c.epochs // c.eval_every
    views = (2 if c.tta_flip else 1) * (3 if getattr(c, "tta_translate", False) else 1)  # test-time views
    evals = (n_evals * eval_images + test_images) * views / (EVAL_SPEEDUP * ips)
    seconds = STARTUP_SECONDS + train + evals
    if c.time_limit_min:
        seconds = min(seconds, 60 * c.time_limit_min)
    return seconds, ips


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


if cfg is not None:
    info = device_info()
    kind = jobs.job_device(cfg.to_dict())
    with friendly_errors("The estimate"):
        seconds, ips = estimate_seconds(cfg, kind)
        where = "on CPU" if kind == "cpu" else "on the GPU (a rough guess: CPU speed × 10)"
        if kind == "cuda" and info["kind"] != "cuda":
            where += "; this machine has no GPU, the run will fail to start"
        tricks = ", ".join(cfg.key_tricks()) or "none"
        st.info(f"Estimated duration: about **{human(seconds)}** {where} "
                f"({training_images(cfg):,} training images × {cfg.epochs} epoch(s) at ~{ips:,.0f} images/s, "
                f"plus evaluation).  \n**{cfg.model}**, tricks: {tricks}")

# ---- config and CLI -------------------------------------------------------------------------------


def cli_flags(c: RunConfig) -> str:
    """A `python -m cifar_core train` line with the fields that differ from the defaults."""
    default = RunConfig().validated().to_dict()
    mine = c.to_dict()
    parts = ["python", "-m", "cifar_core", "train"]
    for name, value in mine.items():
        if value == default.get(name) and name not in ("model", "schedule"):
            continue
        flag = "--" + name.replace("_", "-")
        if name.endswith("_params"):
            owner = name[:-len("_params")]
            base = _registry_defaults(owner, mine[owner])
            changed = {k: v for k, v in value.items() if base.get(k) != v}
            if changed:
                parts += [flag, json.dumps(changed, separators=(",", ":"))]
        elif name == "augment":
            parts += [flag, json.dumps(value, separators=(",", ":")) if value else "none"]
        elif isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _registry_defaults(owner: str, name: str) -> dict:
    from ui.forms import registries
    try:
        return registries()[owner].get(name).defaults()
    except ConfigError:
        return {}


shown = cfg.to_dict() if cfg is not None else values
with st.expander("Config JSON and the equivalent command line"), friendly_errors("Showing the config"):
    st.caption("The validated config (all defaults filled in)." if cfg is not None
               else "The form's values as they are (not valid yet).")
    config_text = json.dumps(shown, indent=2, sort_keys=True, default=list)
    st.code(config_text, language="json", height=360)
    st.download_button("Download run.json", config_text, file_name="run.json", mime="application/json",
                       key="train.download", disabled=cfg is None)
    st.markdown("Run it in a terminal (in the foreground, with a progress bar):")
    st.code("python -m cifar_core train --config run.json", language="bash")
    if cfg is not None:
        st.markdown("or with flags only:")
        st.code(cli_flags(cfg), language="bash", wrap_lines=True)
        st.caption("`python -m cifar_core submit …` queues it as a background job instead, like the button below.")

# ---- launch ---------------------------------------------------------------------------------------
form_sig = fingerprint(shown)
launched = st.session_state.get("train.launched") or {}
already = launched.get("sig") == form_sig
if already:
    st.success(f"queued as **{launched['run_id']}**. Change anything in the form to launch another run.")
    try:
        st.page_link(RUNS_PAGE, label="Follow it on the Runs page", icon=":material/monitoring:")
    except Exception:  # the Runs page is not part of this app (e.g. this page run on its own)
        pass

reason = ("" if data["ok"] else "CIFAR-10 is missing. ") + ("" if cfg is not None else "Fix the errors above. ")
clicked = st.button("Launch", type="primary", key="train.launch", icon=":material/rocket_launch:",
                    disabled=bool(reason) or already,
                    help=reason.strip() or ("Already launched: change the form to launch again." if already
                                            else "Queue this run as a background job."))
if clicked and cfg is not None and data["ok"] and not already:
    new_id = None
    with friendly_errors("Launching the run"):
        record = jobs.submit(cfg, store, data_source=data_source())
        new_id = record.run_id
        st.session_state["train.launched"] = {"sig": form_sig, "run_id": new_id}
        st.session_state["selected_run"] = new_id
        st.query_params["run"] = new_id
    if new_id:
        try:
            st.switch_page(RUNS_PAGE, query_params={"run": new_id})
        except Exception:  # no Runs page in this app: stay here and say where the run is
            st.rerun()
