"""The Runs and Compare pages, rendered with Streamlit's AppTest over fabricated run records.

No training: each run folder is written directly (config, status, metric lines, results.json).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_core import jobs

from cifar_core.config import RunConfig
from cifar_core.jobs import process_start_time
from cifar_core.runs import RunStore, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RUNS_PAGE = str(REPO / "app_pages" / "2_Runs.py")
COMPARE_PAGE = str(REPO / "app_pages" / "3_Compare.py")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STEPS_PER_EPOCH = 50


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(root))
    # the records here are made by hand: the page must not start a supervisor that trains them
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    return RunStore(root)


def make_run(store: RunStore, run_id: str, state: str, *, lr: float = 0.05, epochs: int = 2,
             steps: int | None = None, name: str = "", created: float | None = None, **status):
    """A run record as the trainer would leave it, written without training."""
    cfg = RunConfig(name=name, model="resnet18", epochs=epochs, lr=lr).validated()
    record = store.create(cfg, run_id=run_id, state="queued")
    total = STEPS_PER_EPOCH * epochs
    steps = total if steps is None else steps
    now = time.time()
    t0 = now - 120
    base = {"state": state, "created": created or t0 - 5, "device": "cpu", "params": 11_173_962}
    if state != "queued":
        base.update(started=t0, total_steps=total, steps_per_epoch=STEPS_PER_EPOCH, step=steps,
                    epoch=steps / STEPS_PER_EPOCH, best_val_acc=0.4)
    if state in ("completed", "failed", "cancelled"):
        base["finished"] = t0 + 100
    base.update(status)
    record.update_status(**base)
    for step in range(5, steps + 1, 5):
        record.append_metrics({"kind": "train", "step": step, "epoch": step / STEPS_PER_EPOCH,
                               "train_loss": 2.3 / (1 + step / 50), "train_acc": min(0.9, step / 120),
                               "lr": lr * (1 - step / total), "grad_norm": 1.0, "images_per_s": 900.0,
                               "elapsed": step * 0.5, "time": t0 + step * 0.5})
        if step % STEPS_PER_EPOCH == 0:
            record.append_metrics({"kind": "eval", "step": step, "epoch": step / STEPS_PER_EPOCH,
                                   "val_loss": 1.5 / (1 + step / 100), "val_acc": min(0.85, step / 150),
                                   "eval_split": "test", "elapsed": step * 0.5 + 0.2})
    if state == "completed":
        cm = [[90 if i == j else (10 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)]
        atomic_write_json(record.results_path, {
            "test_acc": 0.9, "balanced_acc": 0.9, "macro_f1": 0.8999,
            "per_class_acc": {c: 0.9 for c in CLASSES}, "confusion_matrix": cm, "classes": CLASSES,
            "train_seconds": 100.0, "steps": steps, "total_steps": total, "test_loss": 0.3})
        record.update_status(test_acc=0.9, balanced_acc=0.9, macro_f1=0.8999, train_seconds=100.0)
    return record


def app(page: str, run: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(page, default_timeout=60)
    if run:
        at.query_params["run"] = run
    return at.run()


def texts(at) -> str:
    """All the messages, captions and markdown on the page, as one string."""
    parts = []
    for kind in ("warning", "error", "info", "success", "caption", "markdown"):
        parts += [str(el.value) for el in getattr(at, kind)]
    return "\n".join(parts)


def assert_ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ---- Runs page ----------------------------------------------------------------------------------
def test_runs_page_empty(store):
    at = app(RUNS_PAGE)
    assert_ok(at)
    assert "No runs yet" in texts(at)


def test_runs_page_mixed_states(store):
    me = os.getpid()  # a live process stands in for the trainer of the running run
    make_run(store, "r-running", "running", steps=60, pid=me, pid_start=process_start_time(me))
    make_run(store, "r-done", "completed")
    make_run(store, "r-failed", "failed", steps=20, error="RuntimeError: out of memory")
    (store.root / "r-failed" / "train.log").write_text("Traceback...\nRuntimeError: out of memory\n")
    at = app(RUNS_PAGE, run="r-running")
    assert_ok(at)
    table = next(df.value for df in at.dataframe if "run id" in df.value.columns)
    assert set(table["run id"]) == {"r-running", "r-done", "r-failed"}
    assert store.record("r-running").state() == "running"
    assert at.selectbox[0].value == "r-running"
    assert "step 60 / 100" in str([p.proto for p in at.get("progress")])
    assert "train loss" in [m.label for m in at.metric]

    at = app(RUNS_PAGE, run="r-failed")
    assert_ok(at)
    assert "out of memory" in "\n".join(str(e.value) for e in at.error)


def test_completed_run_shows_results(store):
    make_run(store, "r-done", "completed")
    at = app(RUNS_PAGE, run="r-done")
    assert_ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["test accuracy"] == "90.00%"
    assert metrics["balanced accuracy"] == "90.00%"
    assert metrics["macro-F1"] == "0.8999"
    assert "Confusion matrix" in texts(at)
    specs = [el.proto.spec for el in at.get("vega_lite_chart")]
    assert any('"predicted"' in spec and '"count"' in spec for spec in specs), "no confusion heatmap"
    assert len(at.get("download_button")) >= 2


def test_corrupt_metrics_line_is_skipped(store):
    record = make_run(store, "r-bad", "completed")
    with open(record.metrics_path, "a") as fh:
        fh.write('{"kind": "train", "step": \n')        # a corrupt line
        fh.write('{"kind": "train", "step": 101, "tr')    # a half-written last line
    at = app(RUNS_PAGE, run="r-bad")
    assert_ok(at)
    assert "1 unreadable line skipped" in texts(at)


def test_run_deleted_while_selected(store):
    make_run(store, "r-gone", "completed")
    at = app(RUNS_PAGE, run="r-gone")
    assert_ok(at)
    shutil.rmtree(store.root / "r-gone")
    at.run()
    assert_ok(at)
    assert "deleted" in texts(at)


def test_missing_status_and_corrupt_config(store):
    make_run(store, "r-nostatus", "completed")
    (store.root / "r-nostatus" / "status.json").unlink()
    make_run(store, "r-badconfig", "completed")
    (store.root / "r-badconfig" / "config.json").write_text("{not json")
    at = app(RUNS_PAGE, run="r-nostatus")
    assert_ok(at)
    assert "status.json is missing" in texts(at)
    at = app(RUNS_PAGE, run="r-badconfig")
    assert_ok(at)
    assert "config.json is unreadable" in texts(at)
    make_run(store, "r-noconfig", "completed")
    (store.root / "r-noconfig" / "config.json").unlink()
    at = app(RUNS_PAGE, run="r-noconfig")
    assert_ok(at)
    assert "r-noconfig has no config.json" in texts(at)


def test_lost_process_is_marked_failed(store):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free; pid_start -1 makes it dead even if the pid is reused
    make_run(store, "r-lost", "running", steps=30, pid=proc.pid, pid_start=-1.0)
    (store.root / "r-lost" / "train.log").write_text("epoch 1 ...\nKilled\n")
    at = app(RUNS_PAGE, run="r-lost")
    assert_ok(at)
    status = store.record("r-lost").status()
    assert status["state"] == "failed"
    assert "process lost" in status["error"]
    assert "process lost" in "\n".join(str(e.value) for e in at.error)
    assert "Killed" in "\n".join(str(c.value) for c in at.code)


def test_cancel_queued_run(store):
    make_run(store, "r-queued", "queued", steps=0)
    at = app(RUNS_PAGE, run="r-queued")
    assert_ok(at)
    assert "Queued" in texts(at)
    at.button(key="runs_cancel").click().run()
    assert_ok(at)
    assert store.record("r-queued").state() == "cancelled"
    assert "cancelled" in texts(at)


def test_delete_finished_run(store):
    make_run(store, "r-old", "completed")
    at = app(RUNS_PAGE, run="r-old")
    assert at.button(key="runs_delete").disabled
    at.checkbox(key="runs_delete_ok_r-old").check().run()
    at.button(key="runs_delete").click().run()
    assert_ok(at)
    assert not (store.root / "r-old").exists()
    assert "Deleted run r-old" in texts(at)


# ---- Compare page -------------------------------------------------------------------------------
def test_compare_shows_only_differing_keys(store):
    make_run(store, "r-a", "completed", lr=0.05, created=time.time() - 50)
    make_run(store, "r-b", "completed", lr=0.1, created=time.time() - 10)
    at = app(COMPARE_PAGE)
    assert_ok(at)
    assert set(at.multiselect[0].value) == {"r-a", "r-b"}
    diff = next(df.value for df in at.dataframe if "key" in df.value.columns)
    assert list(diff["key"]) == ["lr"]
    assert set(diff.iloc[0, 1:]) == {"0.05", "0.1"}
    final = next(df.value for df in at.dataframe if "test acc %" in df.value.columns)
    assert len(final) == 2 and list(final["params"]) == [11_173_962, 11_173_962]
    assert len(at.get("vega_lite_chart")) >= 3  # loss, accuracy, lr (+ per-class)


def test_compare_empty(store):
    at = app(COMPARE_PAGE)
    assert_ok(at)
    assert "No runs yet" in texts(at)



def test_relaunch_opens_train_page_prefilled(store):
    from streamlit.testing.v1 import AppTest

    make_run(store, "r-done", "completed")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.switch_page("app_pages/2_Runs.py")
    at.query_params["run"] = "r-done"
    at.run()
    assert_ok(at)
    at.button(key="runs_relaunch").click().run()
    assert_ok(at)
    assert at.query_params.get("from_run") in ("r-done", ["r-done"])
    assert "r-done" in texts(at)


# ---- the incremental reader behind the live view -------------------------------------------------
def test_live_metrics_incremental_and_thinned(store):
    from ui.charts import curve_charts
    from ui.live import MAX_POINTS, LiveMetrics

    record = make_run(store, "r-big", "running", epochs=200, steps=0)
    with open(record.metrics_path, "a") as fh:
        for step in range(1, 10_001):
            fh.write(json.dumps({"kind": "train", "step": step, "train_loss": 1.0, "train_acc": 0.5,
                                 "lr": 0.1, "elapsed": step / 10}) + "\n")
        fh.write('{"kind": "eval", "step": 10000, "val_')  # half-written: not read yet
    live = LiveMetrics(record.metrics_path)
    assert live.refresh() == 10_000 and live.bad_lines == 0
    with open(record.metrics_path, "a") as fh:
        fh.write('acc": 0.6, "val_loss": 1.1, "elapsed": 1000.5}\n')
    assert live.refresh() == 1
    train, evl = live.frames()
    assert len(train) == 10_000 and list(evl["val_acc"]) == [0.6]
    charts = curve_charts({"big": (train, evl)}, x="elapsed", smoothing=0.9)
    rows = charts["loss"].data
    per_series = rows.groupby(["run", "split", "kind"]).size()
    assert per_series.max() <= MAX_POINTS and rows["x"].max() == pytest.approx(1000.5 / 60)
    # a resume rewrites metrics.jsonl (atomically, shorter): the view starts again from the new file
    record.metrics_path.unlink()
    record.append_metrics({"kind": "train", "step": 1, "train_loss": 2.0})
    live.refresh()
    assert len(live.frames()[0]) == 1


# ---- Runs page: live picker labels, the table, resume, a queued run ---------------------------------
def test_picker_label_shows_the_live_state_with_progress(store):
    me = os.getpid()
    make_run(store, "r-running", "running", steps=60, pid=me, pid_start=process_start_time(me))
    make_run(store, "r-done", "completed")
    make_run(store, "r-queued", "queued", steps=0)
    at = app(RUNS_PAGE, run="r-running")
    assert_ok(at)
    picker = at.selectbox[0]
    label = next(o for o in picker.options if "(r-running)" in o)
    assert "running · epoch 2/2 · 60%" in label, label  # step 60 of 2 × 50
    assert "completed · 90.00%" in next(o for o in picker.options if "(r-done)" in o)
    assert "queued" in next(o for o in picker.options if "(r-queued)" in o), picker.options


def test_history_table_numbers_full_ids_and_row_click_opens_the_run(store):
    make_run(store, "r-done-with-a-long-run-id-0123456789", "completed", created=time.time() - 50)
    make_run(store, "r-queued", "queued", steps=0, created=time.time() - 10)
    at = app(RUNS_PAGE, run="r-queued")
    assert_ok(at)
    element = next(df for df in at.dataframe if "run id" in df.value.columns)
    table = element.value
    assert list(table["run id"]) == ["r-queued", "r-done-with-a-long-run-id-0123456789"]
    assert table["best acc %"].dtype.kind == "f"  # a number column: the queued run's cell is empty, not "None"
    assert table["best acc %"].isna().tolist() == [True, False]
    proto = element.proto
    assert proto.placeholder == "—"
    columns = json.loads(proto.columns)
    assert columns["run id"]["width"] == "large" and columns["run id"].get("pinned") is True
    assert proto.selection_mode, "rows can be selected"
    # a click on the second row opens that run
    at.session_state["runs_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert_ok(at)
    assert at.selectbox[0].value == "r-done-with-a-long-run-id-0123456789"
    assert at.query_params.get("run") in ("r-done-with-a-long-run-id-0123456789",
                                          ["r-done-with-a-long-run-id-0123456789"])
    assert "test accuracy" in [m.label for m in at.metric]


def test_cancelled_run_can_be_resumed(store):
    make_run(store, "r-cancelled", "cancelled", steps=50, error="cancelled by request", cancel_requested=1.0)
    store.record("r-cancelled").checkpoint_path("last").write_bytes(b"")
    at = app(RUNS_PAGE, run="r-cancelled")
    assert_ok(at)
    resume = at.button(key="runs_resume")
    assert not resume.disabled
    resume.click().run()
    assert_ok(at)
    status = store.record("r-cancelled").status()
    assert status["state"] == "queued" and status.get("error") is None and status.get("cancel_requested") is None
    assert "queued again" in texts(at)


def test_failed_run_resumes_only_with_a_checkpoint(store):
    make_run(store, "r-failed", "failed", steps=20, error="RuntimeError: out of memory")
    at = app(RUNS_PAGE, run="r-failed")
    assert_ok(at)
    assert "runs_resume" not in {b.key for b in at.button}
    store.record("r-failed").checkpoint_path("best").write_bytes(b"")
    at = app(RUNS_PAGE, run="r-failed")
    assert_ok(at)
    at.button(key="runs_resume").click().run()
    assert store.record("r-failed").state() == "queued"


def test_queued_run_says_what_it_waits_for_instead_of_empty_charts(store):
    me = os.getpid()
    make_run(store, "r-running", "running", steps=60, pid=me, pid_start=process_start_time(me),
             device_kind="cpu", created=time.time() - 100)
    make_run(store, "r-queued", "queued", steps=0, device_kind="cpu", created=time.time() - 10)
    at = app(RUNS_PAGE, run="r-queued")
    assert_ok(at)
    info = "\n".join(str(i.value) for i in at.info)
    assert "Queued — waiting for a free CPU slot (r-running is training" in info, info
    assert "live_x" not in {r.key for r in at.radio}  # no chart controls
    assert "No metric lines yet" not in texts(at)


def write_imbalance_results(record, train_counts) -> dict:
    """results.json as the trainer writes it now (metrics.imbalance_report of constructed logits)."""
    import numpy as np

    from cifar_core.imbalance.metrics import imbalance_report

    rng = np.random.default_rng(0)
    labels = np.arange(400) % 10
    logits = rng.normal(size=(400, 10))
    logits[np.arange(400), labels] += np.where(labels < 3, 3.0, 0.5)  # the head classes are easy
    report = imbalance_report(logits, labels, train_counts, CLASSES)
    report.update(train_seconds=100.0, steps=100, total_steps=100, test_loss=1.0)
    atomic_write_json(record.results_path, report)
    return report


def test_results_show_calibration_groups_and_per_class_recall(store):
    record = make_run(store, "r-lt", "completed")
    report = write_imbalance_results(record, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    at = app(RUNS_PAGE, run="r-lt")
    assert_ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ECE"] == f"{report['ece']:.4f}"
    assert metrics["many-shot accuracy"] == f"{100 * report['group_acc']['many']:.2f}%"
    assert metrics["few-shot accuracy"] == f"{100 * report['group_acc']['few']:.2f}%"
    assert report["group_acc"]["many"] > report["group_acc"]["few"]
    shown = texts(at)
    assert "Per-class recall" in shown and "Reliability diagram" in shown
    specs = [el.proto.spec for el in at.get("vega_lite_chart")]
    assert any('"tick"' in spec and '"confidence"' in spec and '"accuracy"' in spec for spec in specs), \
        "no reliability diagram"
    assert any('"group"' in spec and '"few"' in spec for spec in specs), "per-class bars are not coloured by group"


def test_balanced_and_older_results_say_what_is_missing(store):
    write_imbalance_results(make_run(store, "r-bal", "completed"), [500] * 10)
    at = app(RUNS_PAGE, run="r-bal")
    assert_ok(at)
    assert "no many / medium / few-shot groups" in texts(at)
    assert "few-shot accuracy" not in [m.label for m in at.metric]
    make_run(store, "r-old", "completed")  # results.json without calibration
    at = app(RUNS_PAGE, run="r-old")
    assert_ok(at)
    assert {m.label: m.value for m in at.metric}["ECE"] == "—"
    assert "No reliability bins" in texts(at)
