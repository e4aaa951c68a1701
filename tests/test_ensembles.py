"""EasyEnsemble (cifar_core/experiments/ensembles.py): launching k member runs, the manifest, the
averaged-logits evaluation against a hand computation, partial ensembles and the CLI. Members'
logits are written here as the trainer writes them (logits.npz, contract of RunRecord.read_logits)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.experiments.ensembles import (ensemble_result, launch_ensemble, list_ensembles, manifest_path,
                                              member_configs)
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

CFG = RunConfig(model="lenet", subset="per_class", per_class=20, test_size=100, epochs=1, seed=4)
TRAIN_COUNTS = np.array([20, 20, 20, 20, 20, 10, 10, 10, 5, 5], dtype=np.int64)


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    import cifar_core.jobs as jobs
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)  # runs stay queued
    return RunStore(tmp_path / "runs")


def finish(store: RunStore, run_id: str, test_logits: np.ndarray, labels: np.ndarray) -> None:
    record = store.record(run_id)
    np.savez(record.path / "logits.npz", test_logits=test_logits.astype(np.float32),
             test_labels=labels.astype(np.int64), val_logits=np.zeros((0, 10), np.float32),
             val_labels=np.zeros(0, np.int64), train_counts=TRAIN_COUNTS)
    record.update_status(state="completed")


def members_of(store: RunStore, ensemble_id: str) -> list[str]:
    return [r["run_id"] for r in json.loads(manifest_path(store, ensemble_id).read_text())["runs"]]


def test_launch_queues_k_balanced_members_with_a_manifest(store):
    ensemble_id = launch_ensemble(CFG, 3, store, data_source="x.npz")
    run_ids = members_of(store, ensemble_id)
    assert len(run_ids) == 3
    for i, run_id in enumerate(run_ids):
        record = store.record(run_id)
        cfg, status = record.config(), record.status()
        assert cfg.balance == "easy_ensemble_member" and cfg.balance_params == {"members": 3, "member": i}
        assert cfg.seed == CFG.seed + i and cfg.model == "lenet" and cfg.per_class == 20
        assert status["state"] == "queued" and status["ensemble"] == ensemble_id and status["member"] == i
    assert [m["ensemble_id"] for m in list_ensembles(store)] == [ensemble_id]
    result = ensemble_result(store, ensemble_id)
    assert result["ensemble"] is None and not result["complete"]
    assert "no member has finished yet (3 queued)" in result["message"]


def test_averaged_logits_are_evaluated_as_one_model(store):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 3)  # 30 test images
    logits = [rng.normal(size=(30, 10)) for _ in range(3)]
    ensemble_id = launch_ensemble(CFG, 3, store)
    for run_id, member_logits in zip(members_of(store, ensemble_id), logits):
        finish(store, run_id, member_logits, labels)
    result = ensemble_result(store, ensemble_id)
    # by hand: the mean of the float32 logits, its argmax, per-class recall, their mean
    mean = sum(m.astype(np.float32).astype(np.float64) for m in logits) / 3
    predicted = mean.argmax(1)
    recall = [np.mean(predicted[labels == c] == c) for c in range(10)]
    confusion = [[int(np.sum((labels == t) & (predicted == p))) for p in range(10)] for t in range(10)]
    report = result["ensemble"]
    assert result["complete"] and result["message"].startswith("all 3 members finished")
    assert report["test_acc"] == pytest.approx(np.mean(predicted == labels))
    assert report["balanced_acc"] == pytest.approx(np.mean(recall))
    assert list(report["per_class_recall"].values()) == pytest.approx(recall)
    assert report["confusion_matrix"] == confusion
    log_probs = mean - np.log(np.exp(mean).sum(1, keepdims=True))
    assert report["test_loss"] == pytest.approx(-log_probs[np.arange(30), labels].mean())
    own = [np.mean(m.argmax(1) == labels) for m in logits]
    assert [m["metrics"]["test_acc"] for m in result["member_results"]] == pytest.approx(own)
    assert result["mean_member"]["test_acc"] == pytest.approx(np.mean(own))
    json.dumps(result)  # the CLI prints it as JSON


def test_partial_ensembles_say_what_they_cover(store):
    labels = np.arange(10)
    ensemble_id = launch_ensemble(CFG, 4, store)
    a, b, c, d = members_of(store, ensemble_id)
    finish(store, a, np.eye(10) * 3, labels)        # all right
    finish(store, b, np.roll(np.eye(10), 1, 1), labels)  # all wrong
    store.record(c).update_status(state="running")
    result = ensemble_result(store, ensemble_id)
    assert result["used"] == [a, b] and not result["complete"]
    assert "partial ensemble: 2 of 4 members finished (1 queued, 1 running)" in result["message"]
    assert "changes as the others finish" in result["message"]
    assert result["ensemble"]["test_acc"] == 1.0  # the confident member outvotes the wrong one
    store.record(c).update_status(state="failed", error="loss became nan at step 3")
    store.record(d).update_status(state="completed")  # finished without logits.npz
    result = ensemble_result(store, ensemble_id)
    states = {m["run_id"]: (m["state"], m.get("error")) for m in result["member_results"]}
    assert states[c] == ("failed", "loss became nan at step 3")
    assert states[d][0] == "unusable" and "without saved test logits" in states[d][1]
    assert "will not finish" in result["message"] and "(1 failed, 1 unusable)" in result["message"]


def test_members_tested_on_other_images_are_refused(store):
    ensemble_id = launch_ensemble(CFG, 2, store)
    a, b = members_of(store, ensemble_id)
    finish(store, a, np.eye(10), np.arange(10))
    finish(store, b, np.eye(10), np.arange(10)[::-1])
    with pytest.raises(ConfigError, match="tested on different images"):
        ensemble_result(store, ensemble_id)


def test_damaged_member_logits_are_named(store):
    ensemble_id = launch_ensemble(CFG, 2, store)
    a, _ = members_of(store, ensemble_id)
    finish(store, a, np.eye(10), np.arange(10))
    (store.record(a).path / "logits.npz").write_bytes(b"garbage")
    member = ensemble_result(store, ensemble_id)["member_results"][0]
    assert member["state"] == "unusable" and "logits.npz" in member["error"]


@pytest.mark.parametrize("ensemble_id, fragment", [("../x", "invalid ensemble id"), ("nope", "ensemble nope not found")])
def test_bad_ensemble_ids(store, ensemble_id, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ensemble_result(store, ensemble_id)


def test_bad_member_counts_and_balancing_queue_nothing(store):
    for members, cfg, fragment in ((1, CFG, "members"), (101, CFG, "members"),
                                   (3, CFG.replace(balance="weighted_sampler"), "leave balance at none")):
        with pytest.raises(ConfigError, match=fragment):
            launch_ensemble(cfg, members, store)
    assert store.ids() == [] and list_ensembles(store) == []
    assert len(member_configs(CFG, 2)) == 2


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_launches_and_reports(store, cifar_npz, capsys):
    root = str(store.root)
    code, out, err = run_cli(["--runs-root", root, "ensemble", "--members", "2", "--model", "lenet", "--epochs",
                              "1", "--data", str(cifar_npz)], capsys)
    assert code == 0, err
    ensemble_id = out.strip()
    assert len(members_of(store, ensemble_id)) == 2
    code, out, _ = run_cli(["--runs-root", root, "ensemble-result", ensemble_id], capsys)
    result = json.loads(out)
    assert code == 0 and result["ensemble_id"] == ensemble_id and result["ensemble"] is None


@pytest.mark.parametrize("argv, fragment", [
    (["ensemble", "--members", "1", "--model", "lenet"], "members"),
    (["ensemble", "--members", "3", "--balance", "weighted_sampler"], "leave balance at none"),
    (["ensemble-result", "nope"], "ensemble nope not found"),
    (["ensemble-result", "a.b"], "invalid ensemble id"),
])
def test_cli_errors(store, capsys, monkeypatch, tmp_path, argv, fragment):
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "no-data"))  # the checks come before the data's
    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    code, _, err = run_cli(["--runs-root", str(store.root), *argv], capsys)
    assert code == 2 and err.startswith("error: ") and fragment in err, err
    assert store.ids() == []
