"""Compare: many runs' curves overlaid (or grouped: mean ± std), what differs in their configs, their
final metrics (best and last validation accuracy, test accuracy; deltas to a pinned baseline), and
each run's tags and note."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from cifar_core import runs
from cifar_core.config import config_diff, config_value
from cifar_core.params import ConfigError
from ui import charts, live
from ui.common import friendly_errors, get_store

MAX_RUNS = 50
NO_BASELINE = "(no baseline)"
GROUPINGS = {"no grouping": None, "tag": "tag", "same config, any seed": "config"}
METRIC_KEYS = ("best_val_acc", "last_val_acc", "test_acc", "balanced_acc", "macro_f1", "ece", "many_acc",
               "medium_acc", "few_acc")
PERCENT = {"best_val_acc": "val acc best", "last_val_acc": "val acc last", "test_acc": "test acc",
           "balanced_acc": "balanced acc", "many_acc": "many-shot acc", "medium_acc": "medium-shot acc",
           "few_acc": "few-shot acc"}
# shown only when some picked run has them (runs trained before they were measured, balanced sets: none)
OPTIONAL_COLUMNS = ("ECE", "many-shot acc %", "medium-shot acc %", "few-shot acc %", "Δ ECE")


def _show(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            return " → ".join(v["name"] for v in value) + "  " + json.dumps(value, sort_keys=True)
        return json.dumps(value, sort_keys=True)
    return str(value)


def diff_table(configs: dict[str, dict]) -> pd.DataFrame:
    """One row per config key whose value differs between any of the runs, one column per run (the
    first run's column is the reference: the baseline when one is pinned)."""
    labels = list(configs)
    first = configs[labels[0]]
    keys: set[str] = set()
    for label in labels[1:]:
        keys.update(config_diff(first, configs[label]))
    rows = [{"key": key, **{label: _show(config_value(configs[label], key)) for label in labels}}
            for key in sorted(keys)]
    return pd.DataFrame(rows, columns=["key", *labels])


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mean_std(stat: tuple, percent: bool) -> str:
    mean, std, n = stat
    if mean is None:
        return "—"
    scale, digits = (100, 2) if percent else (1, 4)
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")


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
notes = {rid: by_id[rid]["record"].annotations() for rid in ids}

# ---- which runs --------------------------------------------------------------------------------
if "cmp_runs" not in st.session_state:
    from_url = [r for r in st.query_params.get("runs", "").split(",") if r in by_id]
    if from_url:
        default = from_url[:MAX_RUNS]
    else:
        finished = [s["run_id"] for s in summaries if s["state"] == "completed"]
        finished += [s["run_id"] for s in summaries if s["state"] in live.FINISHED and s["run_id"] not in finished]
        default = finished[:2] or ids[:2]
    st.session_state["cmp_runs"] = default
else:  # a run deleted meanwhile leaves the selection
    st.session_state["cmp_runs"] = [r for r in st.session_state["cmp_runs"] if r in by_id][:MAX_RUNS]


def _add_runs(new: list[str]) -> None:
    current = [r for r in st.session_state.get("cmp_runs", []) if r in by_id]
    st.session_state["cmp_runs"] = (current + [r for r in new if r not in current])[:MAX_RUNS]


def _remove_runs(gone: list[str]) -> None:
    st.session_state["cmp_runs"] = [r for r in st.session_state.get("cmp_runs", []) if r not in gone]


picked = st.multiselect(f"Runs to compare (up to {MAX_RUNS})", ids, key="cmp_runs", max_selections=MAX_RUNS,
                        format_func=lambda rid: f"{labels[rid]}  —  {by_id[rid]['state']}",
                        placeholder="Pick runs, or use the filters below to pick many at once")

with st.expander(f"Find runs by tag, state or model ({len(ids)} runs)", expanded=False):
    all_tags = sorted({t for a in notes.values() for t in a.tags})
    f1, f2, f3 = st.columns(3)
    want_tags = f1.multiselect("Tag", all_tags, key="cmp_filter_tags", placeholder="any tag")
    want_states = f2.multiselect("State", sorted({s["state"] for s in summaries}), key="cmp_filter_states",
                                 placeholder="any state")
    want_models = f3.multiselect("Model", sorted({s["model"] for s in summaries}), key="cmp_filter_models",
                                 placeholder="any model")
    shown = [s["run_id"] for s in summaries
             if (not want_tags or set(want_tags) & set(notes[s["run_id"]].tags))
             and (not want_states or s["state"] in want_states)
             and (not want_models or s["model"] in want_models)]
    st.dataframe(pd.DataFrame([{
        "picked": rid in picked, "run": labels[rid], "run id": rid, "state": by_id[rid]["state"],
        "model": by_id[rid]["model"], "tags": ", ".join(notes[rid].tags), "note": notes[rid].note,
        "best acc %": _pct(runs.best_accuracy(by_id[rid]["status"]))} for rid in shown],
        columns=["picked", "run", "run id", "state", "model", "tags", "note", "best acc %"]),
        hide_index=True, width="stretch",
        column_config={"best acc %": st.column_config.NumberColumn("best acc", format="%.2f%%")})
    b1, b2 = st.columns(2)
    b1.button(f"Pick the {min(len(shown), MAX_RUNS)} runs shown", key="cmp_pick_shown", on_click=_add_runs,
              args=(shown,), disabled=not shown)
    b2.button("Unpick the runs shown", key="cmp_unpick_shown", on_click=_remove_runs, args=(shown,),
              disabled=not (set(shown) & set(picked)))

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

# ---- tags and notes ----------------------------------------------------------------------------
flash = st.session_state.pop("cmp_flash", None)
with st.expander("Tags and notes", expanded=bool(flash)):
    if flash:
        st.success(flash)
    target = st.selectbox("Run", picked, key="cmp_ann_run", format_func=lambda rid: f"{labels[rid]}  ({rid})")
    if target:
        ann = notes[target]
        if ann.problem:
            st.warning(f"{target}: {ann.problem}. Its tags and note read as empty; saving replaces the file.")
        tags_text = st.text_input("Tags (comma or space separated)", ", ".join(ann.tags), key=f"cmp_tags_{target}",
                                  help="Letters, digits and _ . : = + - (e.g. baseline, seed-sweep, lr=0.1); "
                                       f"at most {runs.MAX_TAGS}. Group the runs by tag below.")
        note_text = st.text_area("Note", ann.note, key=f"cmp_note_{target}", max_chars=runs.MAX_NOTE_CHARS)
        if st.button("Save tags and note", key="cmp_ann_save"):
            try:
                saved = by_id[target]["record"].write_annotations(runs.parse_tags(tags_text), note_text)
            except ConfigError as exc:
                st.error(str(exc))
            else:
                st.session_state["cmp_flash"] = (f"Saved for {labels[target]}: tags "
                                                 f"{', '.join(saved.tags) or '(none)'}; note of {len(saved.note)} "
                                                 "characters.")
                st.rerun()

# ---- grouping and baseline ---------------------------------------------------------------------
g1, g2, g3 = st.columns([2, 3, 3])
grouping = GROUPINGS[g1.selectbox("Group runs by", list(GROUPINGS), key="cmp_group",
                                  help="Groups show the mean curve with a ± std band, and mean ± std of the "
                                       "final metrics.") or "no grouping"]
groups: dict[str, list[str]] | None = None
if grouping == "tag":
    picked_tags = sorted({t for rid in picked for t in notes[rid].tags})
    if not picked_tags:
        g2.caption("None of the picked runs has a tag yet: add some under \"Tags and notes\".")
    else:
        only = g2.multiselect("Tags that form groups", picked_tags, default=picked_tags, key="cmp_group_tags")
        groups = runs.group_by_tag({rid: notes[rid].tags for rid in picked}, only)
elif grouping == "config":
    readable = {rid: by_id[rid]["config"] for rid in picked if by_id[rid]["config"] is not None}
    groups = runs.group_by_config(readable) if readable else None
baseline = g3.selectbox("Baseline", [NO_BASELINE, *picked], key="cmp_baseline",
                        format_func=lambda rid: rid if rid == NO_BASELINE else labels[rid],
                        help="Deltas of the final metrics against this run; its config is the diff's first column.")
baseline = None if baseline in (None, NO_BASELINE) else baseline
if groups:
    g2.caption(" · ".join(f"{name}: {len(members)} run{'s' if len(members) != 1 else ''}"
                          for name, members in groups.items()))
group_labels = {name: f"{name} (n={len(members)})" for name, members in (groups or {}).items()}

# ---- curves ------------------------------------------------------------------------------------
st.subheader("Training curves")
any_active = any(by_id[r]["state"] in live.ACTIVE for r in picked)


@st.fragment(run_every=2.0 if any_active else None)
def curves() -> None:
    x, smoothing = charts.curve_controls("cmp", scale_options=True, clip_default=True)
    frames, problems = {}, []
    for rid in picked:
        try:
            train, evl, bad = live.run_frames(by_id[rid]["record"])
        except live.RunDeleted as exc:
            problems.append(str(exc))
            continue
        frames[rid] = (train, evl)
        if bad:
            problems.append(f"{labels[rid]}: {bad} unreadable line{'s' if bad != 1 else ''} skipped in metrics.jsonl.")
    for problem in problems:
        st.warning(problem)
    if groups:
        shown = charts.group_frames({group_labels[name]: [frames[r] for r in members if r in frames]
                                     for name, members in groups.items()})
    else:
        shown = {labels[rid]: pair for rid, pair in frames.items()}
    if shown:
        with friendly_errors("Drawing the curves"):
            charts.show_curves(shown, x, smoothing, empty_message="These runs wrote no metrics yet.",
                               controls="cmp")


curves()

# ---- config diff -------------------------------------------------------------------------------
st.subheader("Configuration differences")
configs = {}
for rid in ([baseline] if baseline else []) + [r for r in picked if r != baseline]:
    conf = by_id[rid]["config"]
    if conf is None:
        st.warning(f"{labels[rid]}: {by_id[rid]['error'] or 'config.json is unreadable'}; left out of the diff.")
    else:
        configs[labels[rid] + (" (baseline)" if rid == baseline else "")] = conf
if len(configs) < 2:
    st.caption("Needs two runs with a readable config.json.")
else:
    table = diff_table(configs)
    if table.empty:
        st.success("The configurations are identical.")
    else:
        ref = "the baseline" if baseline and by_id[baseline]["config"] is not None else "the first run"
        st.caption(f"{len(table)} of the settings differ from {ref}'s (first column); identical settings are hidden.")
        st.dataframe(table, hide_index=True, width="stretch")

# ---- final metrics -----------------------------------------------------------------------------
st.subheader("Final metrics")
results, metrics = {}, {}
for rid in picked:
    record = by_id[rid]["record"]
    res = record.results()
    results[rid] = res if isinstance(res, dict) else None
    try:
        val_accs = live.run_frames(record)[1]["val_acc"].tolist()
    except live.RunDeleted:
        val_accs = []
    metrics[rid] = {**runs.final_metrics(by_id[rid]["status"], results[rid]),
                    **runs.val_accuracy_summary(by_id[rid]["status"], val_accs)}
deltas = runs.deltas_to_baseline(metrics, baseline, METRIC_KEYS) if baseline else {}
rows = []
for rid in picked:
    m = metrics[rid]
    row = {"run": labels[rid] + (" (baseline)" if rid == baseline else ""), "state": by_id[rid]["state"],
           "tags": ", ".join(notes[rid].tags),
           "val acc best %": _pct(m["best_val_acc"]), "val acc last %": _pct(m["last_val_acc"]),
           "test acc %": _pct(m["test_acc"]), "balanced acc %": _pct(m["balanced_acc"]), "macro-F1": m["macro_f1"],
           "ECE": m["ece"], **{f"{PERCENT[key]} %": _pct(m[key]) for key in runs.GROUP_METRICS},
           "train time": charts.fmt_duration(m["train_seconds"]),
           "steps": None if m["steps"] is None else int(m["steps"]),
           "params": None if m["params"] is None else int(m["params"])}
    if baseline:
        for key in ("test_acc", "balanced_acc", "best_val_acc", "last_val_acc"):
            row[f"Δ {PERCENT[key]} (pp)"] = _pct(deltas[rid][key])
        row["Δ macro-F1"] = deltas[rid]["macro_f1"]
        row["Δ ECE"] = deltas[rid]["ece"]
    rows.append(row)
final_table = pd.DataFrame(rows)
final_table = final_table.drop(columns=[c for c in OPTIONAL_COLUMNS if c in final_table and final_table[c].isna().all()])
pp = st.column_config.NumberColumn(format="%+.2f")
st.dataframe(final_table, hide_index=True, width="stretch", placeholder="—",
             column_config={"val acc best %": st.column_config.NumberColumn("val acc best", format="%.2f%%"),
                            "val acc last %": st.column_config.NumberColumn("val acc last", format="%.2f%%"),
                            "test acc %": st.column_config.NumberColumn("test acc", format="%.2f%%"),
                            "balanced acc %": st.column_config.NumberColumn("balanced acc", format="%.2f%%"),
                            "macro-F1": st.column_config.NumberColumn(format="%.4f"),
                            "ECE": st.column_config.NumberColumn(
                                format="%.4f", help="Expected calibration error (0 = calibrated; lower is better)."),
                            **{f"{PERCENT[key]} %": st.column_config.NumberColumn(PERCENT[key], format="%.2f%%")
                               for key in runs.GROUP_METRICS},
                            "params": st.column_config.NumberColumn(format="localized"),
                            **{f"Δ {name} (pp)": pp for name in ("test acc", "balanced acc", "val acc best",
                                                                 "val acc last")},
                            "Δ macro-F1": st.column_config.NumberColumn(format="%+.4f"),
                            "Δ ECE": st.column_config.NumberColumn(format="%+.4f")})
st.caption("val acc best: the best validation accuracy during training (the checkpoint kept as best.pt); "
           "last: the final evaluation's. Test acc: the final model on the test set. Many / medium / few-shot: "
           "the mean recall of the top 30%, middle and bottom 30% of the classes by training count."
           + (" Δ: minus the baseline's value (percentage points)." if baseline else ""))
if groups:
    st.markdown("**Groups: mean ± std across each group's runs**")
    summary = runs.summarize_groups(groups, metrics, METRIC_KEYS)
    st.dataframe(pd.DataFrame([{
        "group": row["group"], "n": row["n"],
        **{f"{PERCENT.get(key, key)}{' %' if key in PERCENT else ''}": _mean_std(row[key], key in PERCENT)
           for key in METRIC_KEYS}} for row in summary]), hide_index=True, width="stretch")
    st.caption("std: the sample standard deviation across the group's runs (none for a group of one).")

st.subheader("Per-class recall (test)")
per_class = {labels[rid]: res.get("per_class_recall", res.get("per_class_acc")) for rid, res in results.items()
             if res and isinstance(res.get("per_class_recall", res.get("per_class_acc")), dict)}
missing = [labels[rid] for rid in picked if labels[rid] not in per_class]
if missing:
    st.caption("No final evaluation yet for: " + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else ""))
if per_class:
    with friendly_errors("Drawing per-class recall"):
        if len(per_class) <= 12:
            chart = charts.per_class_chart(per_class, title="recall")
            if chart is not None:
                st.altair_chart(chart, width="stretch")
        else:
            st.caption(f"{len(per_class)} runs: the table only (a bar chart of that many runs is unreadable).")
        table = pd.DataFrame({label: pd.Series(accs, dtype=float) * 100
                              for label, accs in per_class.items()}).T
        table.index.name = "run"
        st.dataframe(table, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.1f%%") for c in table.columns})
