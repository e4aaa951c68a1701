"""Runs: the queue and history, a live view of one run, its actions and its final results."""
from __future__ import annotations

import contextlib
import datetime as dt
import time

import pandas as pd
import streamlit as st

from cifar_core import jobs, runs
from cifar_core.params import ConfigError
from ui import charts, live
from ui.common import friendly_errors, get_store

BADGE_COLORS = {"queued": "gray", "starting": "blue", "running": "blue", "completed": "green",
                "failed": "red", "cancelled": "orange", "unknown": "gray"}
STATE_ORDER = ("queued", "starting", "running", "completed", "failed", "cancelled", "unknown")
# Every refresh re-renders its fragment (charts as Arrow rows); at 1 s and 3 s the server spent 6.5% of
# a core on one open live run, at 2 s and 5 s it stays under the 5% target (bench/bench_server_cpu.py).
LIVE_REFRESH_S = 2.0
TABLE_REFRESH_S = 5.0
TABLE_KEY = "runs_table"


def _flash(kind: str, text: str) -> None:
    st.session_state["runs_flash"] = (kind, text)


def _show_flash() -> None:
    item = st.session_state.pop("runs_flash", None)
    if item:
        getattr(st, item[0], st.info)(item[1])


def _fmt_time(ts) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "—"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _pct(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and value == value else "—"


def _badge(state: str) -> str:
    return f":{BADGE_COLORS.get(state, 'gray')}-badge[{state}]"


# ---- queue and history --------------------------------------------------------------------------
def history_table(store, summaries: list[dict]) -> None:
    if not summaries:
        st.info("No runs yet. Start one on the **Train** page; it will show up here.")
        return
    picked = st.multiselect("Show states", STATE_ORDER, key="runs_state_filter", placeholder="All states")
    rows = []
    now = time.time()
    for s in summaries:
        if picked and s["state"] not in picked:
            continue
        acc = runs.best_accuracy(s["status"])
        rows.append({
            "state": runs.shown_state(s["status"]) if s["status"] else s["state"], "name": s["name"] or "—", "model": s["model"],
            "key tricks": s["tricks"], "best acc %": None if acc is None else round(100 * acc, 2),
            "duration": charts.fmt_duration(runs.run_duration(s["status"], now)),
            "created": _fmt_time(s["created"]), "run id": s["run_id"]})
    if not rows:
        st.caption("No runs in the chosen states.")
        return
    counts = pd.Series([s["state"] for s in summaries]).value_counts()
    st.caption(" · ".join(f"{counts[s]} {s}" for s in STATE_ORDER if s in counts)
               + " · click a row to open that run")
    frame = pd.DataFrame(rows)
    frame["best acc %"] = pd.to_numeric(frame["best acc %"], errors="coerce")  # None -> NaN: a number column
    event = st.dataframe(
        frame, hide_index=True, width="stretch", height=min(38 + 35 * len(rows), 320), key=TABLE_KEY,
        on_select="rerun", selection_mode="single-row", placeholder="—",
        column_config={
            "run id": st.column_config.TextColumn("run id", width="large", pinned=True,
                                                  help="The run's folder name in the runs root."),
            "best acc %": st.column_config.NumberColumn(
                "best acc", format="%.2f%%",
                help="Test accuracy of completed runs, else the best validation accuracy so far."),
            "key tricks": st.column_config.TextColumn(width="medium"),
        })
    open_selected_row(event, [row["run id"] for row in rows])


def open_selected_row(event, ids: list[str]) -> None:
    """A row just clicked in the table opens that run (the page reruns with it selected)."""
    rows = list(getattr(getattr(event, "selection", None), "rows", None) or [])
    picked = ids[rows[0]] if rows and 0 <= rows[0] < len(ids) else None
    if picked is None:  # nothing selected (or the row clicked again): the next click opens anew
        st.session_state.pop("_runs_table_opened", None)
        return
    if st.session_state.get("_runs_table_opened") == picked:
        return
    st.session_state["_runs_table_opened"] = picked  # handled: the selection stays on the row
    if picked != st.session_state.get("selected_run"):
        st.session_state["selected_run"] = picked
        st.query_params["run"] = picked
        st.rerun()


# ---- picker ---------------------------------------------------------------------------------------
def state_text(summary: dict) -> str:
    """The live state of a run for its label: "running · epoch 3/10 · 24%", "completed · 91.20%"…"""
    status, state = summary["status"], summary["state"]
    if state in ("starting", "running"):
        last = {}
        with contextlib.suppress(Exception):  # a run deleted meanwhile: the status alone
            last = live.live_metrics(summary["record"]).latest("train")
        p = runs.run_progress(status, last)
        if state == "running" and p.total_epochs:
            epoch = min(p.total_epochs, int(p.epoch or 0) + 1)
            return f"running · epoch {epoch}/{p.total_epochs}" + (
                f" · {p.fraction:.0%}" if p.fraction is not None else "")
        return state
    if state == "completed":
        acc = runs.best_accuracy(status)
        return f"completed · {_pct(acc)}" if acc is not None else state
    return state


def pick_run(store, summaries: list[dict], refresh: bool) -> str | None:
    """The run picker; its labels show each run's live state (re-read every TABLE_REFRESH_S while a
    run is active). Picking a run reruns the page with it."""
    ids = [s["run_id"] for s in summaries]
    by_id = {s["run_id"]: s for s in summaries}
    wanted = st.query_params.get("run") or st.session_state.get("selected_run")
    if wanted and wanted not in by_id:
        st.warning(_missing_run_message(store, wanted) + (" Showing another run." if ids else ""))
        st.session_state.pop("selected_run", None)
        wanted = None
    if not ids:
        if "run" in st.query_params:
            del st.query_params["run"]
        return None
    first = wanted if wanted in by_id else ids[0]
    st.session_state["selected_run"] = first
    if st.query_params.get("run") != first:
        st.query_params["run"] = first
    renders = {"n": 0}

    @st.fragment(run_every=TABLE_REFRESH_S if refresh else None)
    def picker() -> None:
        fresh = by_id
        if renders["n"]:  # a timed or widget rerun of the picker alone: read the states again
            with contextlib.suppress(Exception):
                fresh = {**by_id, **{s["run_id"]: s for s in live.run_summaries(store) if s["run_id"] in by_id}}
        renders["n"] += 1
        current = st.session_state.get("selected_run", first)
        index = ids.index(current) if current in ids else 0
        choice = st.selectbox(
            "Run", ids, index=index,
            format_func=lambda rid: f"{live.run_label(rid, fresh[rid])}  —  {state_text(fresh[rid])}  ({rid})")
        if choice != current:  # picked here: redraw the whole page for that run
            st.session_state["selected_run"] = choice
            st.query_params["run"] = choice
            st.rerun()

    picker()
    return st.session_state.get("selected_run", first)


def _missing_run_message(store, run_id: str) -> str:
    try:
        record = store.record(run_id)
    except ConfigError:
        return f"“{run_id}” is not a valid run id."
    if record.path.is_dir() and not record.config_path.exists():
        return (f"Run {run_id} has no config.json (missing or never written), so it can't be shown. "
                f"Its folder is {record.path}.")
    return f"Run {run_id} was deleted (its folder is gone from {store.root})."


# ---- live view ------------------------------------------------------------------------------------
def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _progress(status: dict, lm: live.LiveMetrics) -> None:
    """Progress bar with steps, epochs, elapsed time and (while running) an ETA."""
    p = runs.run_progress(status, lm.latest("train"))
    parts = []
    if p.total_steps:
        parts.append(f"step {p.step:,} / {p.total_steps:,}")
        if p.epoch is not None:
            parts.append(f"epoch {p.epoch:.2f} / {p.total_epochs}")
    elif p.step:
        parts.append(f"step {p.step:,}")
    if p.elapsed is not None:
        parts.append(f"elapsed {charts.fmt_duration(p.elapsed)}")
    if p.eta is not None:
        parts.append(f"ETA {charts.fmt_duration(p.eta)}" + (
            f" (no new metrics for {charts.fmt_duration(p.stale_for)})" if p.stale else ""))
    if p.fraction is not None:
        st.progress(p.fraction, text=" · ".join(parts) or None)
    elif parts:
        st.caption(" · ".join(parts))


def _latest_metrics(status: dict, lm: live.LiveMetrics) -> None:
    last, last_eval = lm.latest("train"), lm.latest("eval")
    best = runs.best_val_accuracy(status, lm.eval["val_acc"])

    def fmt(value, spec: str) -> str:
        value = _num(value)
        return "—" if value is None else format(value, spec)

    items = [("train loss", fmt(last.get("train_loss"), ".4f")),
             ("train acc", _pct(_num(last.get("train_acc")))),
             ("val acc (last)", _pct(_num(last_eval.get("val_acc")))),
             ("val acc (best)", _pct(best)),
             ("learning rate", fmt(last.get("lr"), ".3g")),
             ("images / s", fmt(last.get("images_per_s"), ",.0f"))]
    for col, (label, value) in zip(st.columns(len(items)), items):
        col.metric(label, value)


def _failure(record, status: dict, state: str) -> None:
    error = status.get("error") or status.get("reason") or ""
    message, _, tail_in_error = str(error).partition("\n--- log tail ---\n")
    if state == "failed":
        st.error(f"**Failed:** {message or 'no error message was recorded'}")
    elif state == "cancelled":
        st.info(f"Cancelled: {message or 'by request'}")
    tail = record.log_tail() or tail_in_error
    if state == "failed" or tail:
        with st.expander("Log tail (train.log)", expanded=state == "failed"):
            st.code(tail or "(train.log is empty or missing)", language=None)


def live_view(store, run_id: str, page_state: str) -> None:
    record = store.record(run_id)
    was_active = page_state in live.ACTIVE

    @st.fragment(run_every=LIVE_REFRESH_S if was_active else None)
    def view() -> None:
        with friendly_errors("Showing the run"):
            body()

    def body() -> None:
        try:
            lm = live.live_metrics(record)
        except live.RunDeleted as exc:
            st.warning(f"{exc} Pick another run above.")
            return
        status = record.status()
        state = status.get("state", "unknown") if status else "unknown"
        if state in jobs.ACTIVE_STATES and status.get("pid") and \
                not jobs.process_alive(status.get("pid"), status.get("pid_start")):
            with friendly_errors("Checking the run's process"):
                jobs.refresh(store)
            status = record.status()
            state = status.get("state", "unknown")
        if was_active and state not in live.ACTIVE and st.session_state.get("_runs_rerun_for") != (run_id, state):
            st.session_state["_runs_rerun_for"] = (run_id, state)
            st.rerun()  # it finished: redraw the whole page (actions, results), stop auto-refresh

        conf = live.config_summary(record)
        head = f"#### {live.run_label(run_id, conf)} {_badge(state)}"
        st.markdown(head)
        facts = [f"model **{conf['model']}**"]
        if status.get("device"):
            facts.append(f"device {status['device']}")
        if _num(status.get("params")):
            facts.append(f"{int(status['params']):,} parameters")
        if status.get("started"):
            facts.append(f"started {_fmt_time(status['started'])}")
        st.caption(" · ".join(facts))
        if not status:
            st.warning("status.json is missing or unreadable: the run's state is unknown. "
                       "Metrics and files below are shown as found on disk.")
        if conf["error"]:
            st.warning(f"{conf['error']}.")
        if state == "queued":  # nothing to chart yet: say what it waits for instead of empty charts
            st.info(f"Queued — waiting for {jobs.queue_wait(store, run_id)}. Its curves appear here once "
                    "it starts.")
            return
        if state == "starting":
            st.info("Starting: loading data and building the model…")
        _progress(status, lm)
        if lm.n_rows:
            _latest_metrics(status, lm)
        if lm.bad_lines:
            n = lm.bad_lines
            st.warning(f"{n} unreadable line{'s' if n != 1 else ''} skipped in metrics.jsonl.")
        if state in ("failed", "cancelled"):
            _failure(record, status, state)
        x, smoothing = charts.curve_controls("live", scale_options=True)
        train, evl = lm.frames()
        charts.show_curves({live.run_label(run_id, conf): (train, evl)}, x, smoothing, controls="live",
                           empty_message="No metric lines yet." if state in live.ACTIVE
                           else "This run wrote no metrics.")

    view()


# ---- actions --------------------------------------------------------------------------------------
def actions(store, run_id: str, state: str) -> None:
    record = store.record(run_id)
    c1, c2, c3 = st.columns([1, 1.4, 2.6])
    with c1:
        if state in jobs.RESUMABLE_STATES and jobs.resumable(record):
            if st.button("Resume", key="runs_resume", icon=":material/play_arrow:",
                         help="Queue it again: it continues from its last checkpoint (best.pt when last.pt "
                              "is damaged), as `python -m cifar_core train --resume RUN_ID` does; a run "
                              "cancelled before it started starts."):
                with friendly_errors("Resume"):
                    jobs.resume(run_id, store)
                    live.forget(record)  # its metrics are rewritten from the checkpoint's step
                    _flash("success", f"Run {run_id} is queued again: it resumes when a slot is free.")
                    st.rerun()
        elif st.button("Cancel run", key="runs_cancel", disabled=state not in live.ACTIVE,
                       help="Queued: removed from the queue. Running: asked to stop, then killed."):
            with friendly_errors("Cancel"):
                result = jobs.cancel(run_id, store)
                _flash("success" if result in ("cancelled", "cancelling") else "info",
                       f"Run {run_id}: {result}.")
                st.rerun()
    with c2:
        if st.button("Relaunch with changes", key="runs_relaunch",
                     help="Open the Train page with this run's configuration filled in."):
            with friendly_errors("Relaunch"):
                st.switch_page("app_pages/1_Train.py", query_params={"from_run": run_id})
    with c3:
        deletable = state in live.FINISHED or state == "unknown"
        with st.expander("Delete run", expanded=False):
            if not deletable:
                st.caption("Cancel the run first; finished runs can be deleted.")
            sure = st.checkbox(f"Delete {run_id} and all its files", key=f"runs_delete_ok_{run_id}",
                               disabled=not deletable)
            if st.button("Delete", key="runs_delete", type="primary", disabled=not (deletable and sure)):
                with friendly_errors("Delete"):
                    jobs.delete(run_id, store)
                    live.forget(record)
                    st.session_state.pop("selected_run", None)
                    if "run" in st.query_params:
                        del st.query_params["run"]
                    _flash("success", f"Deleted run {run_id}.")
                    st.rerun()


# ---- results --------------------------------------------------------------------------------------
def results_section(store, run_id: str, state: str) -> None:
    record = store.record(run_id)
    if not record.path.is_dir():
        return
    results = record.results() if record.results_path.exists() else None
    status = record.status()
    if state == "completed" or results is not None:
        st.subheader("Final results")
        if not isinstance(results, dict):
            st.warning("results.json is missing or unreadable, so the final evaluation can't be shown.")
        else:
            with friendly_errors("Showing the results"):
                final_numbers(results, status)
                left, right = st.columns([1, 1])
                with left:
                    per_class_recall(run_id, results)
                with right:
                    st.markdown("**Confusion matrix** (test; rows: true class)")
                    chart = charts.confusion_chart(results.get("confusion_matrix") or [],
                                                   results.get("classes") or [])
                    if chart is None:
                        st.caption("No confusion matrix in results.json.")
                    else:
                        st.altair_chart(chart, width="content")
                calibration(results)
    if state == "completed":
        export_section(store, record)
    downloads(record)


def final_numbers(results: dict, status: dict) -> None:
    """The headline test metrics, and the many / medium / few-shot accuracies of an imbalanced run."""
    seconds = results.get("train_seconds", status.get("train_seconds"))
    cols = st.columns(5)
    cols[0].metric("test accuracy", _pct(results.get("test_acc")))
    cols[1].metric("balanced accuracy", _pct(results.get("balanced_acc")),
                   help="The mean of the per-class recalls: every class counts the same.")
    cols[2].metric("macro-F1", _fixed(results.get("macro_f1")))
    cols[3].metric("ECE", _fixed(results.get("ece")),
                   help="Expected calibration error: the gap between confidence and accuracy, averaged over "
                        f"{results.get('ece_bins', 15)} confidence bins weighted by their images (0 = calibrated).")
    cols[4].metric("training time", charts.fmt_duration(seconds))
    groups, accs = results.get("class_groups"), results.get("group_acc")
    if isinstance(groups, dict) and isinstance(accs, dict):
        cols = st.columns(3)
        for col, name in zip(cols, ("many", "medium", "few")):
            members = groups.get(name) or []
            col.metric(f"{name}-shot accuracy", _pct(accs.get(name)),
                       help=f"Mean recall of {', '.join(members) or 'no class'}: the classes with the "
                            + {"many": "most", "medium": "middle", "few": "fewest"}[name] + " training images.")
        st.caption("Groups by training count: about the top 30% of the classes are many-shot, the bottom 30% "
                   "few-shot, the rest medium; classes with the same count always share a group.")
    elif "group_acc" in results:
        st.caption("Balanced training set: every class had as many images, so there are no many / medium / "
                   "few-shot groups.")


def _fixed(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "—"


def per_class_recall(run_id: str, results: dict) -> None:
    st.markdown("**Per-class recall** (test)")
    per_class = results.get("per_class_recall", results.get("per_class_acc"))
    groups = results.get("class_groups") if isinstance(results.get("class_groups"), dict) else None
    chart = charts.per_class_chart({run_id: per_class}, title="recall", groups=groups) \
        if isinstance(per_class, dict) else None
    if chart is None:
        st.caption("No per-class recall in results.json.")
    else:
        st.altair_chart(chart, width="stretch")


def calibration(results: dict) -> None:
    st.markdown("**Reliability diagram** (test)")
    chart = charts.reliability_chart(results.get("reliability"))
    if chart is None:
        st.caption("No reliability bins in results.json (runs trained before calibration was measured).")
        return
    left, right = st.columns([3, 2])
    with left:
        st.altair_chart(chart, width="stretch")
    right.caption("Bars: the accuracy of the test images whose top probability falls in each confidence bin; "
                  "red ticks: their mean confidence; dashed: perfect calibration. Bars below the diagonal "
                  f"mean over-confidence. ECE {_fixed(results.get('ece'))} is the gap weighted by each bin's "
                  "share of the images.")


def export_section(store, record) -> None:
    """Export to ONNX (parity-checked) and hand the file to the Classify page."""
    from cifar_core.serve.export import EXPORT_KINDS, export_path, read_card
    st.markdown("**ONNX export**")
    label = st.selectbox("Export as", list(EXPORT_KINDS), key="runs_export_kind",
                        help="int8: onnxruntime static quantization calibrated on 1,000 training images "
                             "(needs the data set), checked by top-1 agreement with the fp32 export.")
    kind = EXPORT_KINDS[label]
    path = export_path(record, kind)
    card = read_card(path) if path.is_file() else None
    if card:
        parity = card.get("parity") or {}
        st.caption(f"Exported {card.get('date', '')}: `{path.name}` ({_size(path)}), parity on "
                   f"{parity.get('images', '?')} real test images max |Δlogit| "
                   f"{parity.get('max_abs_diff_batch_n', float('nan')):.1e} (batch N), "
                   f"{parity.get('max_abs_diff_batch_1', float('nan')):.1e} (batch 1)"
                   + (f", limit {parity['limit']:.1e}." if isinstance(parity.get("limit"), (int, float)) else ".")
                   + _quantization_note(card))
    row = st.container(horizontal=True)
    with row:
        clicked = st.button("Re-export to ONNX" if card else "Export to ONNX", key="runs_export",
                            icon=":material/output:",
                            help="One self-contained .onnx file (opset 20, dynamic batch) with its "
                                 "normalization and test-time augmentation inside, plus a model card; "
                                 "checked against PyTorch on real test images.")
        if card:
            st.download_button(f"{path.name} ({_size(path)})", data=_reader(path), file_name=path.name,
                               mime="application/octet-stream", key="runs_dl_onnx", on_click="ignore",
                               icon=":material/download:")
            card_path = path.with_suffix(".card.json")
            st.download_button("model card", data=_reader(card_path), file_name=card_path.name,
                               mime="application/json", key="runs_dl_card", on_click="ignore",
                               icon=":material/download:")
            if st.button("Classify photos with it", key="runs_to_classify", icon=":material/image_search:"):
                st.switch_page("app_pages/6_Classify.py",
                               query_params={"model": f"run/{record.run_id}/{path.name}"})
    if clicked:
        from cifar_core.serve.export import describe_checkpoint, export_run
        from ui.common import data_source
        with friendly_errors("The export"), st.spinner("Exporting and checking parity…"):
            # export_run writes the equivalent CLI command (--out, --int8, --tta) into the card itself
            result = export_run(record.run_id, store, out=path, data_source=data_source(), **kind.options)
            parity = result.card["parity"]
            _flash("success", f"Exported {result.onnx_path.name} {describe_checkpoint(result.card)}: parity "
                              f"max |Δlogit| {parity['max_abs_diff_batch_n']:.1e} (limit {parity.get('limit', 1e-4):.1e}) on "
                              f"{parity['images']} test images."
                              + _quantization_note(result.card))
            st.rerun()


def _quantization_note(card: dict) -> str:
    agreement = (card.get("quantization") or {}).get("agreement") or {}
    if "top1_agreement" not in agreement:
        return ""
    return (f" int8: top-1 agreement with the fp32 graph {agreement['top1_agreement']:.1%} on "
            f"{agreement.get('images', '?')} images.")


def _reader(path):
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError:
            return b""
    return read


def _size(path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def downloads(record) -> None:
    files = [(record.config_path, "config.json", "application/json"),
             (record.metrics_path, "metrics.jsonl", "application/jsonl"),
             (record.checkpoint_path("best"), "best.pt", "application/octet-stream"),
             (record.checkpoint_path("last"), "last.pt", "application/octet-stream"),
             (record.logits_path, "logits.npz", "application/octet-stream")]
    present = [(p, n, m) for p, n, m in files if p.is_file()]
    if not present:
        return
    st.markdown("**Files**")
    row = st.container(horizontal=True)
    for path, name, mime in present:
        try:
            label = f"{name} ({_size(path)})"
        except OSError:
            continue
        with row:
            st.download_button(label, data=_reader(path), file_name=f"{record.run_id}-{name}", mime=mime,
                               key=f"runs_dl_{name}", on_click="ignore", icon=":material/download:")


# ---- page -----------------------------------------------------------------------------------------
st.set_page_config(page_title="Runs · CIFAR-10 Lab", layout="wide")
st.title("Runs")
_show_flash()
store = get_store()
with friendly_errors("Checking for lost jobs"):
    jobs.refresh(store)
summaries = live.run_summaries(store)
any_active = any(s["state"] in live.ACTIVE for s in summaries)


@st.fragment(run_every=TABLE_REFRESH_S if any_active else None)
def _table() -> None:
    rows = summaries
    if st.session_state.get("_runs_table_renders", 0):  # a timed refresh: read the disk again
        with friendly_errors("Checking for lost jobs"):
            jobs.refresh(store)
        rows = live.run_summaries(store)
    st.session_state["_runs_table_renders"] = st.session_state.get("_runs_table_renders", 0) + 1
    with friendly_errors("Showing the runs table"):
        history_table(store, rows)


st.session_state["_runs_table_renders"] = 0
_table()

st.divider()
selected = pick_run(store, summaries, refresh=any_active)
if selected:
    summary = next(s for s in summaries if s["run_id"] == selected)
    state = summary["state"]
    actions(store, selected, state)
    live_view(store, selected, state)
    results_section(store, selected, state)
