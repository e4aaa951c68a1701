"""The engine under faults: a second trainer, a reused run id, a resume after a cancel or a kill, a
damaged checkpoint, dropout across a resume, a stop between two log lines. Tiny real runs (LeNet with
dropout on 200 CIFAR-10 images, 4 steps an epoch)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_core.config import RunConfig
from cifar_core.engine import Trainer, train_run
from cifar_core.jobs import reconcile
from cifar_core.params import ConfigError
from cifar_core.processes import process_start_time
from cifar_core.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 4, 3


def tiny(**changes) -> RunConfig:
    base = dict(model="lenet", model_params={"dropout": 0.5}, subset="per_class", per_class=30, val_size=100,
                test_size=200, epochs=EPOCHS, batch_size=50, lr=0.05, schedule="onecycle", log_every=2,
                augment=[{"name": "random_crop"}, {"name": "hflip"}], device="cpu")
    base.update(changes)
    return RunConfig(**base).validated()


def same_training(run_a: Path, run_b: Path) -> str:
    """bench/compare_runs.py on two run folders: every metric line and results.json, timings ignored."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_runs.py"), str(run_a), str(run_b)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cifar_npz):
    """The uninterrupted run every interrupted one must reproduce."""
    store = RunStore(tmp_path_factory.mktemp("full"))
    record = train_run(tiny(), store, run_id="full", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    assert record.status()["total_steps"] == STEPS_PER_EPOCH * EPOCHS
    return record


def stopped_run(tmp_path, cifar_npz, step: int, **changes):
    record = train_run(tiny(**changes), RunStore(tmp_path), run_id="part", data_source=str(cifar_npz),
                       stop_at_step=step)
    assert record.state() == "cancelled"
    return record


def resume(record, cifar_npz, **changes):
    train_run(tiny(**changes), RunStore(record.root), run_id=record.run_id, data_source=str(cifar_npz),
              resume=True)
    assert record.state() == "completed", record.status()
    return record


def damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # as a full disk or a kill during a copy leaves it


# ---- exact resume ---------------------------------------------------------------------------------
def test_resume_with_dropout_continues_exactly(tmp_path, cifar_npz, full_run):
    part = stopped_run(tmp_path, cifar_npz, 6)  # mid epoch 2, on a log line
    resume(part, cifar_npz)
    same_training(full_run.path, part.path)
    assert part.status()["resumed_at_step"] == 6 and part.status()["resumed_from"] == "last.pt"
    assert torch.load(part.checkpoint_path("last"), weights_only=True)["rng"]["cpu"].dtype == torch.uint8


def test_resume_before_the_first_checkpoint_drops_the_earlier_metrics(tmp_path, cifar_npz, full_run):
    part = stopped_run(tmp_path, cifar_npz, 3)
    part.checkpoint_path("last").unlink()  # killed in epoch 1: no checkpoint was written yet
    part.update_status(state="failed", error="process lost")
    assert part.read_metrics()
    resume(part, cifar_npz)
    same_training(full_run.path, part.path)
    assert part.status()["resumed_at_step"] == 0 and part.status()["resume_fallback"] is None


def test_queued_run_starts_from_step_zero_through_resume(tmp_path, cifar_npz):
    store = RunStore(tmp_path)
    record = store.create(tiny(epochs=1), run_id="queued", state="queued")  # as `submit` leaves it
    resume(record, cifar_npz, epochs=1)
    assert [r["step"] for r in record.read_metrics() if r["kind"] == "train"] == [2, 4]


# ---- damaged checkpoints, completed runs -------------------------------------------------------------
def test_damaged_last_checkpoint_resumes_from_best(tmp_path, cifar_npz, full_run):
    part = stopped_run(tmp_path, cifar_npz, 6)  # best.pt: the end of epoch 1 (step 4)
    assert torch.load(part.checkpoint_path("best"), weights_only=True)["step"] == 4
    damage(part.checkpoint_path("last"))
    resume(part, cifar_npz)
    status = part.status()
    assert status["resumed_from"] == "best.pt" and status["resumed_at_step"] == 4
    assert str(part.checkpoint_path("last")) in status["resume_fallback"]
    assert "unreadable" in status["resume_fallback"] and "resumed from best.pt at step 4" in status["resume_fallback"]
    same_training(full_run.path, part.path)  # exact from best's step, its later lines dropped


def test_no_readable_checkpoint_trains_again_from_zero_and_says_why(tmp_path, cifar_npz, full_run):
    part = stopped_run(tmp_path, cifar_npz, 3)  # no best.pt yet
    damage(part.checkpoint_path("last"))
    resume(part, cifar_npz)
    note = part.status()["resume_fallback"]
    assert str(part.checkpoint_path("last")) in note and "best.pt does not exist" in note
    assert note.endswith("training again from step 0")
    same_training(full_run.path, part.path)


def files_of(record) -> dict[str, bytes]:
    """Every file of a run folder, sub-folders (tensorboard/) included, but the lock."""
    return {str(p.relative_to(record.path)): p.read_bytes() for p in record.path.rglob("*")
            if p.is_file() and p.name != ".train.lock"}


def test_completed_run_is_never_trained_again(tmp_path, cifar_npz, full_run):
    store = RunStore(tmp_path)
    shutil.copytree(full_run.path, store.root / "done")
    record = store.record("done")
    damage(record.checkpoint_path("last"))
    before = files_of(record)
    with pytest.raises(ConfigError, match="run done is completed; nothing to resume"):
        train_run(tiny(), store, run_id="done", data_source=str(cifar_npz), resume=True)
    assert files_of(record) == before


def test_existing_run_id_is_refused_for_a_new_run(tmp_path, cifar_npz):
    store = RunStore(tmp_path)
    record = store.create(tiny(), run_id="taken", state="queued")
    before = {p.name: p.read_bytes() for p in record.path.iterdir()}
    with pytest.raises(ConfigError, match=r"run taken already exists .*`train --resume taken`"):
        train_run(tiny(lr=0.1), store, run_id="taken", data_source=str(cifar_npz))
    assert {p.name: p.read_bytes() for p in record.path.iterdir()} == before


# ---- the trainer's own pid, no leftovers of an earlier attempt ---------------------------------------
class ReconciledEachEpoch(Trainer):
    """Runs the supervisor's check after every epoch, as a live supervisor would, and notes the status."""

    seen: list

    def _end_epoch(self, at_limit):
        super()._end_epoch(at_limit)
        reconcile(RunStore(self.record.root))
        self.seen.append(self.record.status())


def test_resumed_run_records_its_own_pid_and_no_earlier_cancel(tmp_path, cifar_npz):
    part = stopped_run(tmp_path, cifar_npz, 3, epochs=2)
    # what the earlier, supervisor-started attempt left: its pid and start time, a cancel request
    part.update_status(pid=1, pid_start=12.0, cancel_requested=time.time() - 5, reason="cancelled by request")
    trainer = ReconciledEachEpoch(tiny(epochs=2), part, str(cifar_npz))
    trainer.seen = []
    assert trainer.run(resume=True) == "completed", part.status()
    first = trainer.seen[0]
    assert first["state"] == "running" and first["pid"] == os.getpid()
    assert first["pid_start"] == process_start_time(os.getpid())
    assert first["cancel_requested"] is None and first["error"] is None and first["finished"] is None
    assert part.state() == "completed" and part.status()["error"] is None


# ---- every trained step is in metrics.jsonl -------------------------------------------------------------
def train_rows(record) -> list[dict]:
    return [r for r in record.read_metrics() if r["kind"] == "train"]


def test_cancel_between_log_lines_writes_a_partial_row(tmp_path, cifar_npz):
    part = stopped_run(tmp_path, cifar_npz, 7, log_every=4)
    rows = train_rows(part)
    assert [r["step"] for r in rows] == [4, 7]
    assert rows[-1]["partial"] is True and rows[-1]["first_step"] == 5 and "partial" not in rows[0]
    resume(part, cifar_npz, log_every=4)
    assert [r["step"] for r in train_rows(part)] == [4, 7, 8, 12]


def test_time_limit_writes_the_last_steps(tmp_path, cifar_npz):
    class StopsAtStep3(Trainer):
        def _time_is_up(self):
            return self.step >= 3

    store = RunStore(tmp_path)
    record = store.create(tiny(), run_id="limited")
    assert StopsAtStep3(tiny(), record, str(cifar_npz)).run() == "completed"
    assert "time limit" in record.status()["reason"]
    rows = train_rows(record)
    assert [(r["step"], r.get("first_step")) for r in rows] == [(2, None), (3, 3)]
    assert record.results()["steps"] == 3


def test_diverged_run_keeps_the_steps_before_the_nan(tmp_path, cifar_npz):
    cfg = dict(lr=5.0, momentum=0.99, schedule="none", weight_decay=0, model_params={}, log_every=100)
    record = train_run(tiny(**cfg), RunStore(tmp_path), data_source=str(cifar_npz))
    status = record.status()
    assert status["state"] == "failed" and "loss became" in status["error"]
    trained = int(status["error"].split(" at step ")[1].split(":")[0])  # steps done before the NaN one
    assert trained % STEPS_PER_EPOCH, "pick a config whose loss diverges inside an epoch"
    assert train_rows(record)[-1]["step"] == trained and train_rows(record)[-1]["partial"] is True


# ---- two processes, one run (the command line) --------------------------------------------------------
def cli(runs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cifar_core", "--runs-root", str(runs), *args]


def test_second_trainer_and_reused_run_id_are_refused(tmp_path, cifar_npz, full_run):
    env = {**os.environ, "CIFAR10_NPZ": str(cifar_npz)}
    trainer = subprocess.Popen(cli(tmp_path, "train", "--run-id", "busy", "--model", "lenet", "--subset",
                                   "per_class", "--per-class", "100", "--epochs", "50", "--batch-size", "50",
                                   "--log-every", "3", "--val-size", "0", "--test-size", "200", "--no-progress"),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = RunStore(tmp_path).record("busy")
    try:
        end = time.time() + 120
        while not (record.metrics_path.exists() and record.metrics_path.stat().st_size) and time.time() < end:
            time.sleep(0.2)
        second = subprocess.run(cli(tmp_path, "train", "--resume", "busy", "--no-progress"), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"run busy is being trained by process {trainer.pid} (started " in second.stderr
        assert "wait for it or cancel it" in second.stderr

        again = subprocess.run(cli(tmp_path, "train", "--run-id", "busy", "--epochs", "1", "--no-progress"),
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "--resume busy" in again.stderr, again.stderr
        status = record.status()
        assert status["state"] == "running" and record.config().epochs == 50
        assert status["pid"] == trainer.pid and status["pid_start"] == process_start_time(trainer.pid)

        shutil.copytree(full_run.path, tmp_path / "done")
        done = subprocess.run(cli(tmp_path, "train", "--resume", "done", "--no-progress"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "run done is completed; nothing to resume" in done.stderr, done.stderr
    finally:
        trainer.send_signal(signal.SIGTERM)
        out, _ = trainer.communicate(timeout=60)
    assert trainer.returncode == 1 and record.state() == "cancelled", out
    stopped_at = torch.load(record.checkpoint_path("last"), weights_only=True)["step"]
    assert train_rows(record)[-1]["step"] == stopped_at == record.status()["step"]  # no step left out
