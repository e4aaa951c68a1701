"""Studies: one click queues a whole batch of runs that together test one claim; the results table and
chart fill in as the runs finish."""
from __future__ import annotations

import itertools
import json
import math
import time


import altair as alt
import pandas as pd
import streamlit as st

from cifar_core import jobs
from cifar_core.experiments import studies, verdicts
from cifar_core.data import CLASSES
from cifar_core.runs import RunStore
from ui.common import data_source, data_status, device_info, friendly_errors, get_store

from ui.forms import param_widget

RUNS_PAGE = "app_pages/2_Runs.py"
RUNS_URL = "Runs"  # the Runs page's URL path (relative link: keeps any base path)
REFRESH_S = 2

st.set_page_config(page_title="Studies · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Studies")
st.caption("One click queues a whole batch of background runs that together test one claim from the "
           "source report (or a paper it cites). The results fill in as the runs finish; every run "
           "is also an ordinary run on the Runs page.")

store = get_store()
data = data_status()
info = device_info()
default_scale = studies.default_scale()
device_kind = jobs.job_device({"device": "auto"})

if info["kind"] == "cuda":
    st.success(f"GPU found ({info['name']}): studies default to the **gpu** scale (the report's data "
               "sizes, more epochs).")
else:
    st.info(f"{info['name']}, no CUDA GPU: studies default to the **cpu** scale (3 seeds, sized to test "
            "each claim in 30 minutes or less on a 2-core CPU); **cpu-quick** is a smoke test of a few "
            "minutes. Each study's launch form says what to expect from its accuracies at that scale.")
if not data["ok"]:
    st.warning(f"{data['message']}\n\nLaunching is disabled until CIFAR-10 is found (see the Home page).")


# ---- helpers --------------------------------------------------------------------------------------

def pct(mean, std=math.nan) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{100 * mean:.1f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {100 * std:.1f}"
    return text + " %"


def widget(param, key: str):
    return param_widget(param, key)


@st.cache_data(show_spinner=False, max_entries=64)
def plan(kind: str, params_json: str, seeds: int) -> dict:
    """Build and validate a study once per distinct form state: how many runs, or the error."""
    params = json.loads(params_json)
    try:
        cells = studies.build_study(kind, params, seeds)
    except studies.ConfigError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "runs": len(cells), "cells": len(cells) // seeds}


@st.cache_data(show_spinner=False, max_entries=64, ttl=60)  # ttl: runs that finish meanwhile refine it
def study_estimate(kind: str, params_json: str, seeds: int, device: str, runs_root: str,
                   source: str | None) -> dict:
    """The study's duration on this machine (cifar_core.experiments.estimate), as texts."""
    estimate = studies.estimate_study(kind, json.loads(params_json), seeds, RunStore(runs_root), source, device)
    return {"text": estimate.text, "range": estimate.range_text, "basis": estimate.basis,
            "notes": list(estimate.notes)}


# ---- launch ---------------------------------------------------------------------------------------

def strategies_widget(kind: str, param, key: str) -> str:
    """A list of registry names (the samplers study's strategies) as a multiselect; the value is the
    parameter's comma-separated string (empty when nothing is picked: the plan then says so)."""
    choices = studies.name_list_choices(kind, param.name)
    current = st.session_state.get(key)
    if not isinstance(current, list) or any(name not in choices for name in current):
        st.session_state[key] = studies.name_list_default(kind, param)
    picked = st.multiselect(param.name, choices, key=key, help=param.help,
                            placeholder="Pick at least one")
    return ",".join(picked)


def launch(kind: str, params: dict, seeds: int, n_runs: int) -> None:
    """The Launch button's callback (it runs before the page, so Results lists the new study at once)."""
    with friendly_errors("Launching the study"):
        study_id = studies.launch_study(kind, params, store, data_source=data_source(), seeds=seeds)
        st.session_state["studies.selected"] = study_id
        st.session_state["studies.flash"] = (f"Study **{study_id}** queued ({n_runs} runs). Its results fill "
                                             "in under **Results** as the runs finish.")
        st.query_params["study"] = study_id


def launch_tab(kind: str) -> None:
    meta = studies.INFO[kind]
    st.markdown(f"**What it tests.** {meta.tests}")
    st.markdown(f"**The claim.** {meta.claim}")
    prefix = f"studies.{kind}"
    top = st.columns(3)
    scale_param = studies.study_params(kind, default_scale)[0]
    with top[0]:
        scale = widget(scale_param, f"{prefix}.scale")
    with top[1]:
        seeds = widget(studies.seeds_param(scale), f"{prefix}.{scale}.seeds")  # each scale its default
    with top[2]:
        st.caption(f"Scale in use: **{scale}**"
                   + (" (this machine's default)" if scale == default_scale else
                      " — not this machine's default" + (": without a GPU this takes hours"
                                                          if scale == "gpu" and device_kind == "cpu"
                                                          else "")))
    if meta.note(scale):
        st.caption(f"**{scale}:** {meta.note(scale)}")
    params = {"scale": scale}
    declared = studies.study_params(kind, scale)[1:]
    cols = itertools.cycle(st.columns(3))
    for param in declared:
        if not studies.param_applies(kind, param.name, params):
            continue  # no effect with the values chosen above: hidden, the study's default used
        with next(cols):
            key = f"{prefix}.{scale}.{param.name}"  # keyed by scale: switching it shows that scale's defaults
            if studies.name_list_choices(kind, param.name) is not None:
                params[param.name] = strategies_widget(kind, param, key)
            else:
                params[param.name] = widget(param, key)
    params_json = json.dumps(params, sort_keys=True, default=list)
    result = plan(kind, params_json, int(seeds))
    estimate = None
    if not result["ok"]:
        st.error(result["error"])
    else:
        with friendly_errors("The estimate"), st.spinner(
                "Timing these models on this machine: a few seconds per new setting…"):
            estimate = study_estimate(kind, params_json, int(seeds), device_kind, str(store.root),
                                      data_source())
        where = "on the GPU" if device_kind == "cuda" else "on this CPU"
        timing = (f"estimated total time **{estimate['text']}** ({estimate['range']}) {where}, one run "
                  f"at a time, {estimate['basis']}" if estimate else "no time estimate")
        notes = "".join(f"  \nNote: {note}." for note in (estimate or {}).get("notes", []))
        st.info(f"**{result['runs']} runs** ({result['cells']} cells × {seeds} seed(s)); {timing}.{notes}")
    reason = ("CIFAR-10 is missing. " if not data["ok"] else "") + ("" if result["ok"] else
                                                                    "Fix the error above.")
    launch_column, estimate_column = st.columns([1, 4], vertical_alignment="center")
    if estimate is not None:
        estimate_column.caption(f"Takes {estimate['text']} ({estimate['range']}).")
    launch_column.button("Launch study", key=f"{prefix}.launch", type="primary",
                         icon=":material/rocket_launch:", disabled=bool(reason),
                         help=reason or "Queue every run of this study.", on_click=launch,
                         args=(kind, params, int(seeds), result.get("runs", 0)))


def launch_form() -> None:
    kinds = studies.STUDIES.names()
    for kind, tab in zip(kinds, st.tabs([studies.INFO[k].title for k in kinds])):
        with tab:
            launch_tab(kind)


# ---- past studies ---------------------------------------------------------------------------------

all_studies: list[dict] = []
with friendly_errors("Reading the studies"):
    all_studies = studies.list_studies(store)
by_id = {m["study_id"]: m for m in all_studies}


def label_of(study_id: str) -> str:
    m = by_id[study_id]
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created", 0)))
    title = m.get("title") or studies.INFO.get(m.get("kind"), studies.StudyInfo(m.get("kind"), "", "", ())).title
    return f"{title} · {m.get('scale', '?')} · {len(m.get('runs', []))} runs · {created} · {study_id}"


def pick_study() -> str:
    wanted = st.query_params.get("study")
    if wanted in by_id and st.session_state.get("studies.selected") not in by_id:
        st.session_state["studies.selected"] = wanted
    if st.session_state.get("studies.selected") not in by_id:
        st.session_state["studies.selected"] = all_studies[0]["study_id"]
    selected = st.selectbox("Study", list(by_id), key="studies.selected", format_func=label_of)
    if st.query_params.get("study") != selected:
        st.query_params["study"] = selected
    return selected


def mean_std_frame(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = summary.copy()
    out["mean"] = out[f"{metric}_mean"]
    out["std"] = out[f"{metric}_std"]
    out["lo"] = out["mean"] - out["std"].fillna(0)
    out["hi"] = out["mean"] + out["std"].fillna(0)
    return out


def bn_vs_gn_view(df: pd.DataFrame, summary: pd.DataFrame) -> None:
    done = summary[summary["done"] > 0]
    if done.empty:
        st.caption("The chart appears when the first runs finish.")
    else:
        frame = mean_std_frame(done, "test_acc")
        x = alt.X("batch_size:Q", scale=alt.Scale(type="log", base=2), title="batch size (log scale)",
                  axis=alt.Axis(values=sorted(summary["batch_size"].unique().tolist())))
        color = alt.Color("norm:N", title="normalization",
                          scale=alt.Scale(domain=["batch", "group"], range=["#e45756", "#4c78a8"]))
        tooltip = ["norm", "batch_size", alt.Tooltip("mean:Q", format=".2%", title="test acc (mean)"),
                   alt.Tooltip("std:Q", format=".2%", title="std over seeds"), alt.Tooltip("done:Q", title="seeds done")]
        lines = alt.Chart(frame).mark_line(point=True).encode(
            x=x, y=alt.Y("mean:Q", title="test accuracy", axis=alt.Axis(format="%"),
                         scale=alt.Scale(zero=False)), color=color, tooltip=tooltip)
        bars = alt.Chart(frame[frame["std"].notna()]).mark_errorbar(ticks=True).encode(
            x=x, y=alt.Y("lo:Q", title="test accuracy"), y2="hi:Q", color=color)
        seeds = df[df["state"] == "completed"]
        points = alt.Chart(seeds).mark_circle(size=25, opacity=0.35).encode(
            x=x, y="test_acc:Q", color=color, tooltip=["norm", "batch_size", "seed", "run_id",
                                                        alt.Tooltip("test_acc:Q", format=".2%")])
        st.altair_chart((bars + lines + points).properties(height=360), width="stretch")
        st.caption("Lines: mean test accuracy over seeds; error bars: ± one standard deviation (shown with "
                   "2+ seeds); dots: single runs. The claim predicts the red (BatchNorm) line falls at "
                   "small batch sizes while the blue (GroupNorm) line stays level. LR = base_lr × "
                   "batch / base_batch for every cell.")
    table = pd.DataFrame({
        "norm": summary["norm"], "batch size": summary["batch_size"],
        "lr": summary.get("lr"), "test acc": [pct(m, s) for m, s in zip(summary["test_acc_mean"], summary["test_acc_std"])],
        "balanced acc": [pct(m, s) for m, s in zip(summary["balanced_acc_mean"], summary["balanced_acc_std"])],
        "seeds done": [f"{d}/{r}" for d, r in zip(summary["done"], summary["runs"])], "state": summary["state"]})
    st.dataframe(table, hide_index=True, width="stretch", height=table_height(len(table)))


def table_height(n_rows: int) -> int:
    return 38 + 35 * max(1, n_rows)


def samplers_view(df: pd.DataFrame, summary: pd.DataFrame) -> None:
    recall_cols = studies.recall_columns(df)
    done = summary[summary["done"] > 0]
    if done.empty or not recall_cols:
        st.caption("The per-class recall chart appears when the first runs finish.")
    else:
        rows = []
        for _, r in done.iterrows():
            for col in recall_cols:
                rows.append({"strategy": r["balance"], "class": col[len(studies.RECALL_PREFIX):],
                             "recall": r[f"{col}_mean"], "std": r[f"{col}_std"]})
        long = pd.DataFrame(rows)
        order = [c for c in CLASSES if c in set(long["class"])] or sorted(long["class"].unique())
        chart = alt.Chart(long).mark_bar().encode(
            x=alt.X("class:N", sort=order, title=None),
            xOffset=alt.XOffset("strategy:N", sort=list(summary["balance"])),
            y=alt.Y("recall:Q", title="test recall (per class)", axis=alt.Axis(format="%")),
            color=alt.Color("strategy:N", sort=list(summary["balance"]), title="balancing"),
            tooltip=["strategy", "class", alt.Tooltip("recall:Q", format=".1%", title="recall (mean)"),
                     alt.Tooltip("std:Q", format=".1%", title="std over seeds")])
        st.altair_chart(chart.properties(height=340), width="stretch")
        study_params = by_id[df.attrs.get("study_id", st.session_state.get("studies.selected"))].get("params", {})
        st.caption("Per-class recall on the balanced 10,000-image test set (= per-class accuracy), "
                   f"mean over seeds. {studies.training_counts_text(store, df, study_params)}")
    worst = []
    for _, r in summary.iterrows():
        values = [r[f"{c}_mean"] for c in recall_cols if not math.isnan(r[f"{c}_mean"])]
        worst.append(min(values) if values else math.nan)
    table = pd.DataFrame({
        "strategy": summary["balance"],
        "balanced acc": [pct(m, s) for m, s in zip(summary["balanced_acc_mean"], summary["balanced_acc_std"])],
        "test acc": [pct(m, s) for m, s in zip(summary["test_acc_mean"], summary["test_acc_std"])],
        "macro F1": [pct(m, s) for m, s in zip(summary["macro_f1_mean"], summary["macro_f1_std"])],
        "worst-class recall": [pct(w) for w in worst],
        "seeds done": [f"{d}/{r}" for d, r in zip(summary["done"], summary["runs"])], "state": summary["state"]})
    st.dataframe(table, hide_index=True, width="stretch", height=table_height(len(table)))


def ablation_view(df: pd.DataFrame, summary: pd.DataFrame) -> None:
    summary = summary.sort_values("step")
    labels = [f"{int(s)}. {t}" for s, t in zip(summary["step"], summary["trick"])]
    frame = mean_std_frame(summary, "test_acc")
    frame["label"] = labels
    done = frame[frame["done"] > 0]
    if done.empty:
        st.caption("The chart appears when the first runs finish.")
    else:
        # horizontal bars: every step's label on its own row, never dropped for overlap or cut short
        y = alt.Y("label:N", sort=labels, title="cumulative step (each adds one trick)",
                  scale=alt.Scale(domain=labels),
                  axis=alt.Axis(labelOverlap=False, labelLimit=0, labelAngle=0))
        bars = alt.Chart(done).mark_bar(color="#4c78a8").encode(
            y=y, x=alt.X("mean:Q", title="test accuracy", axis=alt.Axis(format="%")),
            tooltip=["label", alt.Tooltip("mean:Q", format=".2%", title="test acc (mean)"),
                     alt.Tooltip("std:Q", format=".2%", title="std over seeds"), "done"])
        err = alt.Chart(done[done["std"].notna()]).mark_errorbar(ticks=True, color="black").encode(
            y=y, x=alt.X("lo:Q", title="test accuracy"), x2="hi:Q")
        st.altair_chart((bars + err).properties(height=36 * len(labels) + 50), width="stretch")
    means = list(frame["mean"])
    delta_prev = [math.nan] + [b - a for a, b in zip(means, means[1:])]
    table = pd.DataFrame({
        "step": labels,
        "test acc": [pct(m, s) for m, s in zip(frame["mean"], frame["std"])],
        "Δ vs previous step": [("—" if math.isnan(d) else f"{100 * d:+.1f} pts") for d in delta_prev],
        "Δ vs baseline": [("—" if math.isnan(m - means[0]) else f"{100 * (m - means[0]):+.1f} pts")
                          for m in means],
        "seeds done": [f"{d}/{r}" for d, r in zip(frame["done"], frame["runs"])], "state": frame["state"]})
    st.dataframe(table, hide_index=True, width="stretch", height=table_height(len(table)))


VIEWS = {"bn_vs_gn": bn_vs_gn_view, "samplers": samplers_view, "ablation": ablation_view}
SCALE_CAPTIONS = {"cpu-quick": " (a first look: what to expect is under *Launch a study*)",
                  "cpu": " (sized to test the claim on a CPU)"}
VERDICT_BOXES = {verdicts.HELD: st.success, verdicts.NOT_HELD: st.warning, verdicts.TOO_FEW: st.info}


def verdict_box(df: pd.DataFrame) -> None:
    """Whether the claim held, with its numbers (cifar_core.experiments.verdicts), above the charts."""
    if df.attrs.get("kind") not in verdicts.VERDICTS:
        return
    verdict = verdicts.verdict(df)
    VERDICT_BOXES[verdict.outcome](f"**{verdict.headline}.** {verdict.summary}  \n*Tested:* {verdict.claim}")
    if verdict.rows:
        st.dataframe(pd.DataFrame(verdict.rows), hide_index=True, width="stretch",
                     height=table_height(len(verdict.rows)))


def runs_table(df: pd.DataFrame) -> None:
    cell_keys = df.attrs.get("cell_keys", [])
    shown = df[[*cell_keys, "seed", "state", "test_acc", "balanced_acc", "macro_f1", "train_seconds",
                "run_id"]].copy()
    shown["open"] = [f"{RUNS_URL}?run={rid}" for rid in shown["run_id"]]
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        "test_acc": st.column_config.NumberColumn("test acc", format="percent"),
        "balanced_acc": st.column_config.NumberColumn("balanced acc", format="percent"),
        "macro_f1": st.column_config.NumberColumn("macro F1", format="percent"),
        "train_seconds": st.column_config.NumberColumn("seconds", format="%.0f"),
        "open": st.column_config.LinkColumn("Runs page", display_text="open ↗"),
    })


def show_study(study_id: str, live: bool) -> None:
    with friendly_errors("Reading the study's results"):
        jobs.refresh(store)  # runs whose process vanished become "failed" instead of running forever
        df = studies.study_results(store, study_id)
        finished = studies.is_finished(df)
        if live and finished:
            st.rerun()  # everything is done: redraw the page once, without the timer
        m = by_id[study_id]
        summary = studies.summarize(df)
        n_done = int((df["state"] == "completed").sum())
        counts = df["state"].value_counts().to_dict()
        st.progress(n_done / max(1, len(df)),
                    text=f"{n_done}/{len(df)} runs completed · "
                         + ", ".join(f"{v} {k}" for k, v in counts.items() if k != "completed")
                    if n_done < len(df) else f"all {len(df)} runs completed")
        params = m.get("params", {})
        scale = m.get('scale', params.get('scale', '?'))
        st.caption(f"Scale **{scale}**" + SCALE_CAPTIONS.get(scale, "") + f" · {m.get('seeds', 1)} seed(s) · "
                   "parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()
                                              if k != "scale" and studies.param_applies(m.get("kind"), k, params))
                   + (" · refreshing every 2 s while runs are unfinished" if not finished else ""))
        verdict_box(df)
        VIEWS.get(m.get("kind"), lambda d, s: st.dataframe(s))(df, summary)
        with st.expander(f"The {len(df)} runs (open any of them on the Runs page)", expanded=False):
            runs_table(df)
            if len(df):
                cell_keys = df.attrs.get("cell_keys", [])
                labels = {r["run_id"]: " · ".join([*(f"{k}={r[k]}" for k in cell_keys),
                                                   f"seed {r['seed']}", str(r["state"])])
                          for _, r in df.iterrows()}
                pick = st.selectbox("Open a run", list(labels), format_func=lambda rid: labels[rid],
                                    key=f"studies.open.{study_id}")
                try:
                    st.page_link(RUNS_PAGE, label=f"Open {pick} on the Runs page", icon=":material/monitoring:",
                                 query_params={"run": pick})
                except Exception:  # the Runs page is not part of this app (this page run on its own)
                    st.caption(f"Runs page: ?run={pick}")
        failed = df[df["state"].isin(["failed", "cancelled", "deleted"])]
        for _, r in failed.iterrows():
            st.warning(f"run {r['run_id']} ({r['state']}): {str(r.get('error') or '')[:400]}")


def results() -> None:
    if not all_studies:
        st.caption("No studies yet: launch one under **Launch a study**.")
        return
    selected = pick_study()
    with friendly_errors("Reading the study's results"):
        current = studies.study_results(store, selected)
        unfinished = not studies.is_finished(current)
        view = st.fragment(run_every=REFRESH_S if unfinished else None)(show_study)
        view(selected, unfinished)


# ---- the page: results first, the long launch form on its own tab ------------------------------------

flash = st.session_state.pop("studies.flash", None)
if flash:
    st.success(flash)
results_tab, launch_tab_ = st.tabs(["Results", "Launch a study"],
                                   default="Results" if all_studies else "Launch a study")
with results_tab:
    results()
with launch_tab_:
    launch_form()
