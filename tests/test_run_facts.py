"""The facts the Runs and Compare pages and the CLI's `runs` command show about a run, computed in
cifar_core.runs from status.json (and metric rows): one rule each, shared by every view."""
import json
import math

import pytest

from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.params import ConfigError
from cifar_core.runs import (RunStore, best_accuracy, best_val_accuracy, final_metrics, run_duration,
                             run_progress)


@pytest.mark.parametrize("status, val_accs, expected", [
    ({"state": "completed", "test_acc": 0.91, "best_val_acc": 0.88}, (), 0.91),
    ({"state": "completed", "best_val_acc": 0.88}, (), 0.88),  # no test accuracy recorded
    ({"state": "running", "test_acc": 0.91, "best_val_acc": 0.5}, (), 0.5),  # test_acc only counts when done
    ({"state": "failed", "best_val_acc": -1.0}, (), None),  # -1: no evaluation yet
    ({"state": "running", "best_val_acc": -1.0}, (0.2, math.nan, 0.4), 0.4),  # from the metric rows
    ({"state": "running", "best_val_acc": True}, (), None),
    ({}, (), None),
])
def test_best_accuracy(status, val_accs, expected):
    assert best_accuracy(status, val_accs) == expected


def test_best_val_accuracy_prefers_the_status():
    assert best_val_accuracy({"best_val_acc": 0.3}, [0.9]) == 0.3
    assert best_val_accuracy({}, [math.nan]) is None


@pytest.fixture(autouse=True)
def no_supervisor(monkeypatch):
    """`runs` refreshes the records, which starts a detached supervisor for a queued run: with a hand-made
    "running" record that has no pid it would wait for the CPU slot forever and outlive the tests."""
    from cifar_core import jobs

    started = []
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: started.append(store.root) or False)
    return started


def test_cli_runs_uses_the_same_rule(tmp_path, capsys, no_supervisor):
    store = RunStore(tmp_path)
    cfg = RunConfig(epochs=1).validated()
    store.create(cfg, run_id="done", state="completed").update_status(test_acc=0.9, best_val_acc=0.8)
    store.create(cfg, run_id="going", state="running").update_status(test_acc=0.5, best_val_acc=0.25)
    store.create(cfg, run_id="fresh", state="queued").update_status(best_val_acc=-1)
    assert main(["--runs-root", str(tmp_path), "runs", "--json"]) == 0
    rows = {r["run_id"]: r["accuracy"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"done": "90.00%", "going": "25.00%", "fresh": ""}
    assert no_supervisor == [tmp_path]  # the queued run asked for one


def test_run_duration():
    assert run_duration({"started": 10.0, "finished": 40.0}) == 30.0
    assert run_duration({"state": "running", "started": 10.0}, now=25.0) == 15.0
    assert run_duration({"state": "failed", "started": 10.0}) is None
    assert run_duration({}) is None


def test_final_metrics_prefer_results_then_status():
    status = {"test_acc": 0.5, "macro_f1": 0.4, "step": 80, "params": 1234}
    m = final_metrics(status, {"test_acc": 0.9, "steps": 100, "train_seconds": 12.0})
    assert m == {"test_acc": 0.9, "balanced_acc": None, "macro_f1": 0.4, "ece": None, "train_seconds": 12.0,
                 "steps": 100.0, "params": 1234.0, "many_acc": None, "medium_acc": None, "few_acc": None}
    assert final_metrics(status, None)["steps"] == 80.0
    groups = final_metrics({"ece": 0.2}, {"group_acc": {"many": 0.9, "medium": 0.7, "few": None}, "ece": 0.1})
    assert (groups["ece"], groups["many_acc"], groups["medium_acc"], groups["few_acc"]) == (0.1, 0.9, 0.7, None)
    assert final_metrics({"ece": 0.2}, {})["ece"] == 0.2  # status.json's when results.json lacks it


def test_run_progress_eta_counts_down_until_metrics_go_stale():
    status = {"state": "running", "started": 0.0, "total_steps": 100, "steps_per_epoch": 10, "step": 20}
    last = {"step": 25, "elapsed": 50.0, "time": 100.0}
    p = run_progress(status, last, now=110.0)
    assert (p.step, p.total_steps, p.fraction, p.epoch, p.total_epochs) == (25, 100, 0.25, 2.5, 10)
    assert p.eta == pytest.approx(150.0 - 10.0) and not p.stale  # 2 s a step, 10 s since the last line
    p = run_progress(status, last, now=200.0)
    assert p.stale and p.eta == pytest.approx(150.0)  # not counted down any further
    done = run_progress({"state": "completed"}, {})
    assert done.fraction == 1.0 and done.eta is None
    queued = run_progress({"state": "queued"}, {})
    assert queued.fraction is None and queued.elapsed is None


def test_config_dict_of(tmp_path):
    store = RunStore(tmp_path)
    store.create(RunConfig(epochs=1).validated(), run_id="r1")
    assert store.config_dict_of("r1")["epochs"] == 1
    with pytest.raises(ConfigError, match="was not found"):
        store.config_dict_of("r2")
    with pytest.raises(ConfigError):
        store.config_dict_of("../etc")
    (tmp_path / "r1" / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="no readable config.json"):
        store.config_dict_of("r1")
