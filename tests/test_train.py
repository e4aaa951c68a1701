"""Engine tests on tiny real subsets of CIFAR-10 (the offline copy)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_core.config import RunConfig
from cifar_core.runs import RunStore
from cifar_core.engine import train_run

REPO = Path(__file__).resolve().parents[1]


def tiny(**changes) -> RunConfig:
    base = dict(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=100,
                val_size=200, test_size=1000, epochs=4, batch_size=100, lr=0.2, schedule="onecycle",
                label_smoothing=0.1, log_every=2, augment=[{"name": "random_crop"}, {"name": "hflip"}])
    base.update(changes)
    return RunConfig(**base).validated()


def test_short_training_clearly_beats_chance(tmp_path, cifar_npz):
    record = train_run(tiny(), RunStore(tmp_path), data_source=str(cifar_npz))
    status, results = record.status(), record.results()
    assert status["state"] == "completed", status
    assert results["test_acc"] > 0.25, results["test_acc"]          # chance is 0.10
    assert len(results["per_class_acc"]) == 10
    cm = results["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == 1000 == results["test_images"]
    rows = record.read_metrics()
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 4 and all(r["eval_split"] == "val" for r in evals)
    for key in ("train_loss", "train_acc", "lr", "images_per_s", "elapsed", "epoch", "step"):
        assert key in train_rows[0]
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert record.checkpoint_path("last").exists() and record.checkpoint_path("best").exists()
    ckpt = torch.load(record.checkpoint_path("best"), weights_only=True)
    assert ckpt["model_name"] == "fastnet"
    assert ckpt["objective"] == {} and ckpt["eval_weights"] == "model"  # the supervised objective keeps no state
    assert "distill_loss" not in train_rows[0]


RESUME_VARIANTS = {
    "ema+cutout": dict(ema_decay=0.9, augment=[{"name": "random_crop"}, {"name": "hflip"},
                                               {"name": "cutout", "p": 0.5}]),
    # stopped at step 7, between two lookahead updates: the slow weights must be in the checkpoint
    "lookahead+alternating-flip": dict(lookahead_every=3, alternating_flip=True,
                                       augment=[{"name": "random_crop"}]),
}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resume_matches_uninterrupted_run(tmp_path, cifar_npz, variant):
    cfg = tiny(epochs=2, per_class=30, val_size=0, batch_size=60, **RESUME_VARIANTS[variant])
    store = RunStore(tmp_path)
    full = train_run(cfg, store, run_id="full", data_source=str(cifar_npz))
    part = train_run(cfg, store, run_id="part", data_source=str(cifar_npz), stop_at_step=7)
    assert part.state() == "cancelled"
    assert torch.load(part.checkpoint_path("last"), weights_only=True)["step"] == 7
    train_run(cfg, store, run_id="part", data_source=str(cifar_npz), resume=True)
    assert part.state() == "completed"
    a = torch.load(full.checkpoint_path("last"), weights_only=True)
    b = torch.load(part.checkpoint_path("last"), weights_only=True)
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert full.results()["test_acc"] == pytest.approx(part.results()["test_acc"], abs=2e-4)
    steps = [r["step"] for r in part.read_metrics() if r["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_fast_preset_tricks_train_in_bf16_on_the_cpu(tmp_path, cifar_npz):
    cfg = tiny(precision="bf16", channels_last=True, alternating_flip=True, lookahead_every=2,
               augment=[{"name": "random_crop"}], tta_flip=True, tta_translate=True)
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    status, results = record.status(), record.results()
    assert status["state"] == "completed" and status["precision"] == "bf16"
    assert results["test_acc"] > 0.25, results["test_acc"]
    last = torch.load(record.checkpoint_path("last"), weights_only=True)
    for name, slow in last["lookahead"].items():  # training ended on the slow weights
        assert torch.equal(last["model"][name], slow), name


def test_a_run_with_test_time_views_only_where_unsure_completes(tmp_path, cifar_npz):
    cfg = tiny(tta_flip=True, tta_translate=True, tta_confident=0.3)
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.status()["state"] == "completed"
    assert record.results()["test_acc"] > 0.2, record.results()["test_acc"]


def test_the_whitening_bias_trains_for_its_epochs_then_stays(tmp_path, cifar_npz):
    """Constant LR, so the first epoch of a 2-epoch run is the whole of a 1-epoch one."""
    def final_bias(epochs: int, bias_epochs: float):
        cfg = tiny(model_params={"width": 0.25, "whiten_bias_epochs": bias_epochs}, epochs=epochs,
                   schedule="none", val_size=0, test_size=200, name=f"wb-{epochs}-{bias_epochs}")
        record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
        assert record.status()["state"] == "completed", record.status()
        return torch.load(record.checkpoint_path("last"), weights_only=True)["model"]["whiten.bias"]

    frozen = final_bias(1, 0.0)          # the data's bias, never trained
    after_one = final_bias(1, 1.0)
    after_two = final_bias(2, 1.0)
    assert not torch.allclose(after_one, frozen)  # it trained in epoch 1 ...
    torch.testing.assert_close(after_two, after_one)  # ... and stayed fixed in epoch 2


def test_nan_loss_stops_run_as_failed(tmp_path, cifar_npz):
    cfg = tiny(model="lenet", model_params={}, lr=10.0, momentum=0.99, epochs=3, schedule="none",
               weight_decay=0, label_smoothing=0, val_size=0)
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    status = record.status()
    assert status["state"] == "failed"
    assert "loss became" in status["error"] and "diverged" in status["error"]


def test_missing_data_fails_with_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "empty"))
    record = train_run(tiny(), RunStore(tmp_path / "runs"))
    status = record.status()
    assert status["state"] == "failed"
    assert "CIFAR10_NPZ" in status["error"] and "download" in status["error"]


@pytest.mark.parametrize("balance", ["weighted_sampler", "class_weighted_loss", "random_undersample"])
def test_imbalanced_training_with_balancing(tmp_path, cifar_npz, balance):
    cfg = tiny(subset="full", imbalance="long_tail", imbalance_params={"imbalance_ratio": 10, "n_max": 60},
               balance=balance, epochs=1, val_size=0, grad_clip="norm", clip_max_norm=5.0)
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    split = record.status()["split"]
    assert split  # the per-class counts of the imbalanced set are recorded for the UI


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_cli_train_sigterm_cancels_at_safe_point(tmp_path, cifar_npz):
    env = {**os.environ, "CIFAR10_NPZ": str(cifar_npz)}
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(tmp_path), "train", "--run-id", "sig",
           "--model", "fastnet", "--model-params", "width=0.25", "--subset", "per_class", "--per-class", "200",
           "--epochs", "50", "--batch-size", "50", "--log-every", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = RunStore(tmp_path).record("sig")
    assert _wait_for(lambda: record.metrics_path.exists() and record.metrics_path.stat().st_size > 0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    status = record.status()
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
    assert record.checkpoint_path("last").exists()
    assert status["command"].startswith("python -m cifar_core --runs-root") and "--run-id sig" in status["command"]
    listing = subprocess.run([sys.executable, "-m", "cifar_core", "--runs-root", str(tmp_path), "runs"],
                             cwd=REPO, capture_output=True, text=True)
    assert "sig" in listing.stdout and "cancelled" in listing.stdout


def test_cli_rejects_invalid_config_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cifar_core", "--runs-root", str(tmp_path), "train",
                          "--lr", "-3"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "lr: -3.0 is below the minimum" in out.stderr and "Traceback" not in out.stderr
