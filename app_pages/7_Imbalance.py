"""Imbalance: the class-imbalance lab. The training set a profile gives, a comparison of balancing
strategies launched in one click, finished runs side by side on the imbalance metrics, threshold
moving on any finished run (no retraining), classifier re-training (cRT) and EasyEnsemble."""
from __future__ import annotations

import itertools
import json

import pandas as pd
import streamlit as st

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.data import IMBALANCE, load_cifar10
from cifar_core.engine.init_from import crt_config, crt_epochs
from cifar_core.experiments import ensembles, imbalance_lab, studies
from cifar_core.imbalance import POSTHOC
from cifar_core.params import Param
from cifar_core.runs import RunStore
from ui import charts
from ui.common import data_source, data_status, friendly_errors, get_store
from ui.forms import param_widget, registry_chooser, registry_params_form

RUNS_URL = "Runs"
STUDY = "samplers"
MAX_SIDE_BY_SIDE = 4

st.set_page_config(page_title="Imbalance · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Imbalance")
st.caption("The source report's class-imbalance section as a lab: make the training set imbalanced, "
           "compare re-sampling, cost-sensitive losses and ensembles on it, and move the decision "
           "thresholds of any finished run without retraining.")

store = get_store()
data = data_status()


@st.cache_data(show_spinner=False)
def train_labels(source: str | None):
    return load_cifar10(source).y_train


@st.cache_data(show_spinner="Estimating the duration…", max_entries=32, ttl=60)
def study_estimate(params_json: str, seeds: int, runs_root: str, source: str | None) -> str:
    estimate = studies.estimate_study(STUDY, json.loads(params_json), seeds, RunStore(runs_root), source)
    return f"{estimate.text} ({estimate.range_text}), {estimate.basis},"


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def metric_table(rows: list[dict]) -> None:
    percent = {label: st.column_config.NumberColumn(label, format="percent")
               for key, label in imbalance_lab.COMPARE_COLUMNS if key != "ece"}
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={**percent, "ECE": st.column_config.NumberColumn("ECE", format="%.4f")})


def run_option_label(run: imbalance_lab.FinishedRun) -> str:
    acc = run.metrics.get("balanced_acc")
    return f"{run.name or run.run_id} · {run.balance} · {pct(acc)} balanced · {run.run_id.rsplit('-', 1)[-1]}"


tab_set, tab_compare, tab_side, tab_move, tab_more = st.tabs(
    ["Training set", "Compare strategies", "Side by side", "Threshold moving", "cRT & ensembles"])

# ---- the training set a profile gives ---------------------------------------------------------------
with tab_set:
    st.caption("How many images of each class a run trains on with an imbalance profile (the same counts "
               "as `python -m cifar_core split`).")
    profile = registry_chooser(IMBALANCE, "imb.profile", "long_tail", "Imbalance profile")
    profile_params = registry_params_form(IMBALANCE, profile, "imb.profile.params")
    with st.columns(3)[0]:
        seed = param_widget(Param("seed", "int", 0, 0, 2**31 - 1, help="The draw of images (and of counts, for "
                                  "the report's profile)."), "imb.profile.seed", label="Seed")
    if not data["ok"]:
        st.warning(data["message"])
    else:
        with friendly_errors("Computing the training set"):
            counts = imbalance_lab.profile_counts(profile, profile_params, seed, train_labels(data_source()))
            labeled = counts["labeled"]
            ratio = counts.get("imbalance_ratio")
            st.markdown(f"**{counts['totals']['labeled']:,} training images**, largest class "
                        f"{max(labeled.values()):,}, smallest {min(labeled.values()):,}"
                        + (f" (imbalance ratio {ratio:.1f})" if isinstance(ratio, (int, float)) else ""))
            st.altair_chart(charts.split_chart(counts), width="stretch")

# ---- one click: one run per strategy, several seeds ----------------------------------------------------
with tab_compare:
    st.caption("Queues the samplers study: one background run per strategy and seed on the chosen "
               "imbalanced set; its results (mean ± std over seeds, whether the claim held) fill in on the "
               "Studies page, and every run is an ordinary run on Runs.")
    scale = param_widget(Param("scale", "choice", studies.default_scale(), choices=studies.SCALES,
                               help="cpu-quick: minutes, a smoke test; cpu: a real test on a CPU (about 30 "
                                    "minutes); gpu: the report's sizes."),
                         "imb.compare.scale", label="Scale")
    values = {}
    params = [p for p in studies.study_params(STUDY, scale) if p.name != "scale"]
    for param in params:
        choices = studies.name_list_choices(STUDY, param.name)
        if choices is not None:
            picked = st.multiselect(param.name.replace("_", " ").capitalize(), choices,
                                    key=f"imb.compare.{scale}.{param.name}",
                                    default=studies.name_list_default(STUDY, param), help=param.help)
            values[param.name] = ",".join(picked)
    cells = itertools.cycle(st.columns(3))
    for param in [p for p in params if p.name not in values]:
        if not studies.param_applies(STUDY, param.name, values):  # the study declares "profile" first
            continue  # no effect with this profile: not shown, the study's default used
        with next(cells):
            values[param.name] = param_widget(param, f"imb.compare.{scale}.{param.name}")
    seeds = param_widget(studies.seeds_param(scale), f"imb.compare.{scale}.seeds", label="Seeds")
    with friendly_errors("Planning the comparison"):
        planned = studies.build_study(STUDY, {"scale": scale, **values}, seeds)
        estimate = study_estimate(json.dumps({"scale": scale, **values}, sort_keys=True), seeds,
                                  str(store.root), data_source())
        st.caption(f"{len(planned)} runs ({len(planned) // max(1, seeds)} strategies × {seeds} seed(s)): "
                   f"{estimate} one run after another on this machine.")
        if st.button("Launch the comparison", key="imb.compare.launch", disabled=not data["ok"]):
            study_id = studies.launch_study(STUDY, {"scale": scale, **values}, store, data_source(), seeds)
            st.success(f"Queued study {study_id}: follow it on the Studies page.")

# ---- finished runs side by side ----------------------------------------------------------------------
finished = imbalance_lab.finished_runs(store)
by_id = {run.run_id: run for run in finished}

with tab_side:
    if not finished:
        st.info("No finished run yet: launch a comparison, or train a run with an imbalance profile.")
    else:
        picked = st.multiselect("Runs", list(by_id), key="imb.side.runs", max_selections=MAX_SIDE_BY_SIDE,
                                default=list(by_id)[:min(2, len(by_id))],
                                format_func=lambda rid: run_option_label(by_id[rid]))
        if picked:
            runs = [by_id[rid] for rid in picked]
            metric_table(imbalance_lab.comparison_rows(runs))
            results = {rid: store.record(rid).results() or {} for rid in picked}
            recall = {run_option_label(by_id[rid]): r.get("per_class_recall") or r.get("per_class_acc")
                      for rid, r in results.items() if r.get("per_class_acc")}
            st.markdown("**Per-class recall**")
            chart = charts.per_class_chart(recall) if recall else None
            if chart is not None:
                st.altair_chart(chart, width="stretch")
            st.markdown("**Confusion matrices and reliability diagrams**")
            for col, rid in zip(st.columns(len(picked)), picked):
                with col:
                    st.caption(run_option_label(by_id[rid]))
                    res = results[rid]
                    cm = charts.confusion_chart(res.get("confusion_matrix") or [], res.get("classes") or [],
                                                size=300)
                    if cm is not None:
                        st.altair_chart(cm)
                    rel = charts.reliability_chart(res.get("reliability") or [], height=220)
                    if rel is not None:
                        st.altair_chart(rel, width="stretch")
                    else:
                        st.caption("No reliability bins (the run predates them).")

# ---- threshold moving on saved logits -------------------------------------------------------------------
with tab_move:
    st.caption("Moves a finished run's decision thresholds on its saved test logits: instant, no retraining. "
               "Logit adjustment subtracts τ · log(training class share) from the logits; tuned biases are "
               "fitted on the validation split for balanced accuracy.")
    with_logits = [run for run in finished if run.has_logits]
    if not with_logits:
        st.info("No finished run has saved logits yet (runs save them since this version).")
    else:
        run_id = st.selectbox("Run", [r.run_id for r in with_logits], key="imb.move.run",
                              format_func=lambda rid: run_option_label(by_id[rid]))
        method = registry_chooser(POSTHOC, "imb.move.method", "logit_adjustment", "Method")
        params = registry_params_form(POSTHOC, method, f"imb.move.{method}")
        with friendly_errors("Threshold moving"):
            moved = imbalance_lab.threshold_moving(store, run_id, method, params)
            before, after = moved["before"], moved["after"]
            cols = st.columns(4)
            for col, key, label in zip(cols, ("test_acc", "balanced_acc", "macro_f1"),
                                       ("accuracy", "balanced accuracy", "macro-F1")):
                delta = after[key] - before[key]
                col.metric(label, pct(after[key]) if key != "macro_f1" else f"{after[key]:.4f}",
                           f"{100 * delta:+.2f} pt" if key != "macro_f1" else f"{delta:+.4f}")
            groups = after.get("group_acc") or {}
            cols[3].metric("few-shot accuracy", pct(groups.get("few")),
                           f"{100 * (groups['few'] - (before.get('group_acc') or {})['few']):+.2f} pt"
                           if groups.get("few") is not None else None)
            if moved.get("val_balanced_acc"):
                v0, v1 = moved["val_balanced_acc"]
                st.caption(f"Validation balanced accuracy {pct(v0)} → {pct(v1)}.")
            chart = charts.per_class_chart(imbalance_lab.recall_before_after(moved))
            if chart is not None:
                st.altair_chart(chart, width="stretch")
            st.caption("Per-class biases added to the logits (relative to their mean: a shift of every logit "
                       "by one constant changes nothing): "
                       + ", ".join(f"{c} {b:+.2f}" for c, b in imbalance_lab.centred_biases(moved).items()))

# ---- decoupling (cRT) and EasyEnsemble ---------------------------------------------------------------------
with tab_more:
    left, right = st.columns(2)
    with left:
        st.subheader("Classifier re-training (cRT)")
        st.caption("Kang et al. 2020: keep a finished run's features frozen and re-train only its classifier "
                   "head with class-balanced sampling, for a few epochs.")
        sources = [run.run_id for run in finished if run.has_checkpoint]
        if not sources:
            st.info("No finished run with a checkpoint to re-train.")
        else:
            source = st.selectbox("Source run", sources, key="imb.crt.run",
                                  format_func=lambda rid: run_option_label(by_id[rid]))
            with friendly_errors("Planning the cRT run"):
                source_epochs = int((store.record(source).config_dict() or {}).get("epochs") or 1)
                epochs = param_widget(Param("epochs", "int", crt_epochs(source_epochs), 1, 200),
                                      f"imb.crt.{source}.epochs", label="Epochs")
                cfg = crt_config(store, source, epochs)
                if st.button("Queue cRT", key="imb.crt.launch"):
                    record = jobs.submit(cfg, store, data_source=data_source())
                    st.success(f"Queued {record.run_id}.")
                    st.page_link(RUNS_URL, label="Open it on Runs", query_params={"run": record.run_id})
    with right:
        st.subheader("EasyEnsemble")
        st.caption("k runs, each on its own balanced random under-sample of the training set; their test "
                   "logits are averaged and evaluated as one model.")
        if finished:
            base = st.selectbox("Base config (a finished run's)", list(by_id), key="imb.ens.run",
                                format_func=lambda rid: run_option_label(by_id[rid]))
            members = param_widget(ensembles.MEMBERS, "imb.ens.members", label="Members")
            with friendly_errors("Launching the ensemble"):
                if st.button("Queue ensemble", key="imb.ens.launch", disabled=not data["ok"]):
                    cfg = RunConfig.from_dict(store.record(base).config_dict() or {}).replace(
                        balance="none", balance_params={})
                    ensemble_id = ensembles.launch_ensemble(cfg, members, store, data_source())
                    st.success(f"Queued ensemble {ensemble_id} ({members} runs).")
        for manifest in ensembles.list_ensembles(store)[:5]:
            with friendly_errors("Reading an ensemble"):
                result = ensembles.ensemble_result(store, manifest["ensemble_id"])
                st.markdown(f"**{result['ensemble_id']}** — {result['message']}")
                if result["ensemble"] is not None:
                    ens, mean = result["ensemble"], result["mean_member"]
                    st.dataframe(pd.DataFrame([
                        {"": "ensemble", **{k: ens[k] for k in ensembles.MEMBER_METRICS}},
                        {"": "mean member", **mean}]), hide_index=True)
