"""Compare: several runs' curves overlaid, what differs in their configs, their final metrics."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from cifar_core.config import config_diff, config_value
from cifar_core.runs import final_metrics
from ui import charts, live
from ui.common import friendly_errors, get_store

MAX_RUNS = 8


def _show(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            return " → ".join(v["name"] for v in value) + "  " + json.dumps(value, sort_keys=True)
        return json.dumps(value, sort_keys=True)
    return str(value)


def diff_table(configs: dict[str, dict]) -> pd.DataFrame:
    """One row per config key whose value differs between any of the runs, one column per run."""
    labels = list(configs)
    first = configs[labels[0]]
    keys: set[str] = set()
    for label in labels[1:]:
        keys.update(config_diff(first, configs[label]))
    rows = [{"key": key, **{label: _show(config_value(configs[label], key)) for label in labels}}
            for key in sorted(keys)]
    return pd.DataFrame(rows, columns=["key", *labels])


def metrics_table(picked: list[str], by_id: dict, labels: dict[str, str],
                  results: dict[str, dict | None]) -> pd.DataFrame:
    rows = []
    for rid in picked:
        m = final_metrics(by_id[rid]["status"], results.get(rid))
        rows.append({"run": labels[rid], "state": by_id[rid]["state"],
                     "test acc %": None if m["test_acc"] is None else 100 * m["test_acc"],
                     "balanced acc %": None if m["balanced_acc"] is None else 100 * m["balanced_acc"],
                     "macro-F1": m["macro_f1"],
                     "train time": charts.fmt_duration(m["train_seconds"]),
                     "steps": None if m["steps"] is None else int(m["steps"]),
                     "params": None if m["params"] is None else int(m["params"])})
    return pd.DataFrame(rows)


st.set_page_config(page_title="Compare · CIFAR-10 Lab", layout="wide")
st.title("Compare runs")
store = get_store()
summaries = live.run_summaries(store)
if not summaries:
    st.info("No runs yet. Train a couple of runs first, then compare them here.")
    st.stop()

by_id = {s["run_id"]: s for s in summaries}
ids = [s["run_id"] for s in summaries]
labels: dict[str, str] = {}
for s in summaries:
    label = live.run_label(s["run_id"], s)
    labels[s["run_id"]] = label if label not in labels.values() else s["run_id"]

from_url = [r for r in st.query_params.get("runs", "").split(",") if r in by_id]
if from_url:
    default = from_url[:MAX_RUNS]
else:
    finished = [s["run_id"] for s in summaries if s["state"] == "completed"]
    finished += [s["run_id"] for s in summaries if s["state"] in live.FINISHED and s["run_id"] not in finished]
    default = finished[:2] or ids[:2]
picked = st.multiselect("Runs to compare", ids, default=default, max_selections=MAX_RUNS,
                        format_func=lambda rid: f"{labels[rid]}  —  {by_id[rid]['state']}",
                        placeholder="Pick runs")
if ",".join(picked) != st.query_params.get("runs", ""):
    if picked:
        st.query_params["runs"] = ",".join(picked)
    elif "runs" in st.query_params:
        del st.query_params["runs"]
if not picked:
    st.info("Pick at least one run (two or more to compare).")
    st.stop()
if len(picked) == 1:
    st.caption("Pick a second run to compare against.")

# ---- curves ---------------------------------------------------------------------------------------
st.subheader("Training curves")
any_active = any(by_id[r]["state"] in live.ACTIVE for r in picked)


@st.fragment(run_every=2.0 if any_active else None)
def curves() -> None:
    x, smoothing = charts.curve_controls("cmp")
    frames, notes = {}, []
    for rid in picked:
        record = by_id[rid]["record"]
        try:
            train, evl, bad = live.run_frames(record)
        except live.RunDeleted as exc:
            notes.append(str(exc))
            continue
        frames[labels[rid]] = (train, evl)
        if bad:
            notes.append(f"{labels[rid]}: {bad} unreadable line{'s' if bad != 1 else ''} skipped in metrics.jsonl.")
    for note in notes:
        st.warning(note)
    if frames:
        with friendly_errors("Drawing the curves"):
            charts.show_curves(frames, x, smoothing, empty_message="These runs wrote no metrics yet.")


curves()

# ---- config diff ----------------------------------------------------------------------------------
st.subheader("Configuration differences")
configs = {}
for rid in picked:
    conf = by_id[rid]["config"]
    if conf is None:
        st.warning(f"{labels[rid]}: {by_id[rid]['error'] or 'config.json is unreadable'}; left out of the diff.")
    else:
        configs[labels[rid]] = conf
if len(configs) < 2:
    st.caption("Needs two runs with a readable config.json.")
else:
    table = diff_table(configs)
    if table.empty:
        st.success("The configurations are identical.")
    else:
        st.caption(f"{len(table)} of the settings differ; identical settings are hidden.")
        st.dataframe(table, hide_index=True, width="stretch")

# ---- final metrics --------------------------------------------------------------------------------
st.subheader("Final metrics")
results = {}
for rid in picked:
    res = by_id[rid]["record"].results()
    results[rid] = res if isinstance(res, dict) else None
st.dataframe(metrics_table(picked, by_id, labels, results), hide_index=True, width="stretch",
             column_config={"test acc %": st.column_config.NumberColumn("test acc", format="%.2f%%"),
                            "balanced acc %": st.column_config.NumberColumn("balanced acc", format="%.2f%%"),
                            "macro-F1": st.column_config.NumberColumn(format="%.4f"),
                            "params": st.column_config.NumberColumn(format="localized")})

st.subheader("Per-class accuracy (test)")
per_class = {labels[rid]: res.get("per_class_acc") for rid, res in results.items()
             if res and isinstance(res.get("per_class_acc"), dict)}
missing = [labels[rid] for rid in picked if labels[rid] not in per_class]
if missing:
    st.caption("No final evaluation yet for: " + ", ".join(missing))
if per_class:
    with friendly_errors("Drawing per-class accuracy"):
        chart = charts.per_class_chart(per_class)
        if chart is not None:
            st.altair_chart(chart, width="stretch")
        table = pd.DataFrame({label: pd.Series(accs, dtype=float) * 100
                              for label, accs in per_class.items()}).T
        table.index.name = "run"
        st.dataframe(table, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.1f%%") for c in table.columns})
