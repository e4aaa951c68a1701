"""Train: pick a preset (or a past run, or a chain from the previewer), change anything, launch a
background job. The form is generated from RunConfig's declarations (ui/forms.py)."""
from __future__ import annotations

import json


import streamlit as st

from cifar_core import jobs
from cifar_core.config import MAX_TEACHERS, RunConfig, parse_chain, teacher_ids
from cifar_core.engine.distill import check_teacher_runs, teacher_candidates
from cifar_core.engine.init_from import check_init_run, init_candidates
from cifar_core.engine.prepare import run_split, split_counts
from cifar_core.params import ConfigError
from cifar_core.experiments.estimate import estimate_run, human_duration
from cifar_core.experiments.presets import preset_summary, presets
from ui import charts
from ui.common import data_source, data_status, friendly_errors, get_store
from ui.forms import config_form, fingerprint

RUNS_PAGE = "app_pages/2_Runs.py"
FORM_KEY = "train.form"
TEACHER_PICK = "train.teacher_pick"
INIT_PICK = "train.init_pick"
CONFIRM_KEY = "train.confirm_long"
LONG_RUN_S = 10 * 60  # a launch estimated longer than this is confirmed first, with its estimate


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
        try:
            from_run_config = store.config_dict_of(from_run_id)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; starting from a preset") from None

chain_override = None
if query.get("chain"):
    with friendly_errors("Reading the augmentation chain from the link"):
        chain_override = parse_chain(query["chain"])

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
    right.caption(preset_summary(start))
if chain_override is not None:
    initial = {**initial, "augment": chain_override}
    st.info(f"The augmentation chain comes from the link ({len(chain_override)} step(s)).")

# ---- the form -------------------------------------------------------------------------------------
values = None
with st.container(border=True), friendly_errors("Building the form"):
    values = config_form(initial, key=FORM_KEY)
if values is None:
    st.stop()


# ---- teachers for distillation: a picker over the finished runs that fills the form's teacher_run ----
def _use_picked_teachers():
    st.session_state[f"{FORM_KEY}.teacher_run"] = ",".join(st.session_state.get(TEACHER_PICK) or [])


if values.get("distill", "none") != "none":
    with friendly_errors("Listing the runs that can teach"):
        candidates = {c["run_id"]: c for c in teacher_candidates(store)}
        if not candidates:
            st.info(f"Distillation needs a teacher: no completed run in {store.root} yet. Train one first "
                    "(the **fast** preset makes a strong CNN teacher).")
        else:
            st.session_state[TEACHER_PICK] = [run_id for run_id in teacher_ids(values.get("teacher_run") or "")
                                              if run_id in candidates]

            def _label(run_id: str) -> str:
                c = candidates[run_id]
                acc = f"{c['test_acc']:.2%}" if isinstance(c["test_acc"], (int, float)) else "?"
                return f"{run_id} · {c['model']} · test {acc}"

            st.multiselect("Teacher run(s)", list(candidates), key=TEACHER_PICK, format_func=_label,
                           on_change=_use_picked_teachers, max_selections=MAX_TEACHERS,
                           placeholder="choose one or more completed runs…",
                           help="Completed runs in this runs folder; the last checkpoint (else the best) of each "
                                "teaches. Several teach as an ensemble, the mean of their logits (each adds a "
                                "forward pass to every step). Fills teacher_run in the Distill tab.")

# ---- initial weights: a picker over the finished runs that fills the form's init_run ----------------
def _use_picked_init():
    st.session_state[f"{FORM_KEY}.init_run"] = st.session_state.get(INIT_PICK) or ""


with friendly_errors("Listing the runs to start from"):
    starts = {c["run_id"]: c for c in init_candidates(store, values.get("model"), values.get("model_params"))}
    if starts:
        with st.expander("Initialise from a finished run (fine-tune, linear probe, cRT)",
                         expanded=bool(values.get("init_run"))):
            st.session_state[INIT_PICK] = values.get("init_run") if values.get("init_run") in starts else ""

            def _start_label(run_id: str) -> str:
                if not run_id:
                    return "none: random initialisation"
                c = starts[run_id]
                acc = f"{c['test_acc']:.2%}" if isinstance(c["test_acc"], (int, float)) else "?"
                fits = {True: "", False: " · another model"}.get(c["fits"], "")
                return f"{run_id} · {c['model']} · test {acc}{fits}"

            st.selectbox("Start from the weights of", [""] + list(starts), key=INIT_PICK, format_func=_start_label,
                         on_change=_use_picked_init,
                         help="A completed run in this runs folder with the same model and model options; its "
                              "last checkpoint (else its best) is loaded. Fills init_run in the Model tab.")
            st.caption("The Model tab's *Initialisation mode* says what trains: finetune (every weight), "
                       "linear_probe (the classifier head only) or crt (the head re-initialised, then trained "
                       "alone: with class_balanced_sampling under Data and a few epochs, this is cRT; "
                       "`python -m cifar_core crt RUN_ID` builds that run from a finished one).")

cfg, errors = RunConfig.checked(values)
if cfg is not None and cfg.distill != "none":
    try:  # the config alone cannot know whether the run exists and has finished
        check_teacher_runs(store, cfg.teacher_run)
    except ConfigError as exc:
        cfg, errors = None, [str(exc)]
if cfg is not None and cfg.init_run:
    try:
        check_init_run(store, cfg)
    except ConfigError as exc:
        cfg, errors = None, [str(exc)]
for message in errors:
    st.error(message)


# ---- estimate: measured on this machine (cifar_core.experiments.estimate) ------------------------------
estimate = None
if cfg is not None:
    with friendly_errors("The estimate"), st.spinner(
            "Timing this model on this machine: a few seconds, once per setting (the first time also "
            "a training process's start-up)…"):
        estimate = estimate_run(cfg, store, data_source=data_source())
if estimate is not None:
    tricks = ", ".join(cfg.key_tricks()) or "none"
    st.info(f"Estimated duration: about **{human_duration(estimate.seconds)}** ({estimate.range_text}) on the "
            f"{'GPU' if estimate.device == 'cuda' else 'CPU'}, {estimate.basis}: {estimate.parts_text()}. "
            f"{estimate.train_images:,} training images × {estimate.epochs} epoch(s) at "
            f"~{estimate.images_per_s:,.0f} images/s.  \n**{cfg.model}**, tricks: {tricks}"
            + "".join(f"  \nNote: {note}." for note in estimate.notes))

# ---- the training split, per class (what `python -m cifar_core split` prints) ----------------------
@st.cache_data(show_spinner=False, max_entries=2)
def _train_labels(source: str | None):
    from cifar_core.data import load_cifar10
    return load_cifar10(source).y_train.copy()  # only the labels stay cached, not the images


if cfg is not None and data["ok"]:
    with st.expander("Training split per class", expanded=cfg.imbalance != "none" or bool(cfg.label_budget)), \
            friendly_errors("Computing the split"):
        counts = split_counts(run_split(cfg, _train_labels(data_source())))
        totals = counts["totals"]
        ratio = counts["imbalance_ratio"]
        st.caption(f"{totals['labeled']:,} labeled · {totals['unlabeled']:,} unlabeled · "
                   f"{totals['validation']:,} validation images"
                   + (f" · imbalance ratio {ratio:.1f}" if ratio else "")
                   + ". The same counts: `python -m cifar_core split` with this run's flags.")
        for note in counts["notes"]:
            st.caption(f"Note: {note}.")
        st.altair_chart(charts.split_chart(counts), width="stretch")

# ---- config and CLI -------------------------------------------------------------------------------
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
        st.code(cfg.to_command(), language="bash", wrap_lines=True)
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

# a long run is launched only once the user has ticked a box that states its estimate; the box belongs
# to this exact form (its key carries the form's fingerprint), so any change asks again
long_run = estimate is not None and estimate.seconds > LONG_RUN_S and not already
confirmed = True
if long_run:
    confirmed = st.checkbox(
        f"I understand this run takes about {human_duration(estimate.seconds)} ({estimate.range_text})",
        key=f"{CONFIRM_KEY}.{form_sig}",
        help=f"Runs estimated over {LONG_RUN_S // 60} minutes are confirmed before they are queued. "
             "For a first try, pick the quick preset (about a minute), or lower epochs or the subset size.")
reason = ("" if data["ok"] else "CIFAR-10 is missing. ") + ("" if cfg is not None else "Fix the errors above. ") \
    + ("" if confirmed else "Confirm the duration above. ")
launch_column, estimate_column = st.columns([1, 5], vertical_alignment="center")
clicked = launch_column.button("Launch", type="primary", key="train.launch", icon=":material/rocket_launch:",
                               disabled=bool(reason) or already,
                               help=reason.strip() or ("Already launched: change the form to launch again."
                                                       if already else "Queue this run as a background job."))
if estimate is not None:
    estimate_column.caption(f"Takes {estimate.text} ({estimate.range_text}), {estimate.basis}.")
if clicked and cfg is not None and data["ok"] and not already and confirmed:
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
