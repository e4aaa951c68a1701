"""Runs in several processes (DistributedDataParallel under torch's elastic agent), on the CPU with the
gloo backend and 2 processes: tiny LeNet trainings (no BatchNorm, no dropout, so that 2 processes do
the same arithmetic as 1 up to the order of float sums)."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.engine import train_run
from cifar_core.engine.distributed import ReadOnlyRecord, Ranks, check_world, failure_reason
from cifar_core.engine.loop import open_as_main
from cifar_core.params import ConfigError
from cifar_core.processes import process_alive
from cifar_core.runs import RunStore
from tests.test_jobs import wait_for

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--model", "lenet", "--subset", "per_class", "--per-class", "100", "--val-size", "0", "--test-size", "1000",
         "--epochs", "3", "--batch-size", "50", "--lr", "0.05", "--log-every", "5"]
# long enough to be stopped on purpose; the time limit ends it when it is not
LONG = ["--model", "lenet", "--subset", "per_class", "--per-class", "20", "--val-size", "0", "--test-size", "100",
        "--epochs", "2000", "--batch-size", "50", "--log-every", "1", "--eval-every", "1000"]


def cli(root: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cifar_core", "--runs-root", str(root), *args, "--data", str(data)]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(root: Path, data: Path, *args: str) -> subprocess.Popen:
    """A `train` command in its own session (like a terminal's), its output in root/launcher.log."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "launcher.log", "ab")
    return subprocess.Popen(cli(root, data, "train", "--no-progress", *args), cwd=REPO, env=environment(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the ranks the launcher's elastic agent started."""
    ranks = {}
    for pid in children(launcher):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for rank in (0, 1):
                if f"RANK={rank}".encode() in env:
                    ranks[rank] = pid
    return ranks


def steps_of(record, kind: str) -> list[int]:
    return [row["step"] for row in record.read_metrics() if row["kind"] == kind]


def gone(pids) -> bool:
    return not any(process_alive(pid) for pid in pids)


# ---- (1), (2): a 2-process run through the CLI --------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cifar_npz):
    root = tmp_path_factory.mktemp("runs")
    started = time.time()
    done = subprocess.run(cli(root, cifar_npz, "train", "--run-id", "two", "--nproc", "2", "--no-progress", *SHORT),
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    return SimpleNamespace(root=root, done=done, seconds=time.time() - started, record=RunStore(root).record("two"))


def test_a_two_process_run_completes_and_its_record_is_written_once(two_process_run):
    done, record = two_process_run.done, two_process_run.record
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("run two: completed") == 1, done.stdout  # reported by the launcher alone
    status = record.status()
    assert status["state"] == "completed", status
    assert status["distributed"] == {"world_size": 2, "per_rank_batch": 25, "sync_bn": False, "restarts": 0,
                                     "images_left_out_per_epoch": 0}
    assert status["total_steps"] == 60 and status["step"] == 60
    train_steps, eval_steps = steps_of(record, "train"), steps_of(record, "eval")
    assert train_steps == list(range(5, 61, 5))  # one line per 5 steps: not one per rank
    assert eval_steps == [20, 40, 60]
    results = record.results()
    assert results["steps"] == 60 and results["test_images"] == 1000
    assert sorted(p.name for p in record.path.glob("*.pt")) == ["best.pt", "last.pt"]
    assert list(record.path.glob("status.json*")) == [record.status_path]


def test_accuracy_matches_one_process_at_the_same_global_batch(two_process_run, cifar_npz, tmp_path):
    """Each rank trains on its half of the very batch one process trains on (same epoch order and
    augmentation draws) and DDP averages the two halves' gradients: the same arithmetic up to the order
    of float sums. Measured: train losses equal to 6 digits, test logits within 1e-6, all 1,000
    predictions the same. The tolerance, half a point (5 images), leaves room for rounding to flip a
    near-tie on another CPU; an error in the sharding (a rank training on the wrong images, or on all of
    them) moves the loss curve at once."""
    assert two_process_run.done.returncode == 0, two_process_run.done.stderr
    two = two_process_run.record
    cfg = RunConfig.from_dict({**two.config_dict(), "nproc": 1})
    one = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert one.status()["state"] == "completed"
    losses = lambda record: [row["train_loss"] for row in record.read_metrics() if row["kind"] == "train"]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert abs(two.results()["test_acc"] - one.results()["test_acc"]) <= 0.005
    assert one.results()["test_acc"] > 0.15  # it learned something: the comparison is not of two guessers


# ---- (3): a killed rank fails the run ------------------------------------------------------------
def test_killing_a_rank_fails_the_run_with_a_clear_reason_and_leaves_no_process(tmp_path, cifar_npz):
    root = tmp_path / "runs"
    launcher = start(root, cifar_npz, "--run-id", "killed", "--nproc", "2", "--time-limit-min", "2", *LONG)
    record = RunStore(root).record("killed")
    try:
        assert wait_for(lambda: record.checkpoint_path("last").exists(), timeout=120), (root / "launcher.log").read_text()
        ranks = rank_pids(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        assert launcher.wait(timeout=90) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    status = record.status()
    assert status["state"] == "failed", status
    assert f"rank 1 of 2 (pid {ranks[1]}) was killed by SIGKILL" in status["error"], status["error"]
    assert "no restarts" in status["error"]
    assert gone(ranks.values())
    assert jobs.resumable(record)  # it failed after a checkpoint: the queue's Resume can continue it


# ---- (4): with --max-restarts, a killed rank restarts the ranks from the checkpoint ---------------
def test_with_max_restarts_a_killed_rank_restarts_from_the_checkpoint(tmp_path, cifar_npz, monkeypatch):
    """Through the queue: the supervisor starts the 2-process run (2 slots asked, 1 CPU slot: it runs
    alone) as `train --resume RUN_ID`, which launches the ranks."""
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setenv("CIFAR_LAB_SLOTS_CPU", "1")
    monkeypatch.setenv("CIFAR_LAB_WORKER_IDLE", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = RunStore(tmp_path / "runs")
    cfg = RunConfig(model="lenet", subset="per_class", per_class=20, val_size=0, test_size=100, epochs=2000,
                    batch_size=50, log_every=1, eval_every=1000, time_limit_min=0.15, nproc=2, max_restarts=1)
    record = jobs.submit(cfg.validated(), store)
    try:
        assert wait_for(lambda: record.checkpoint_path("last").exists(), timeout=120), record.log_tail()
        launcher = record.status()["pid"]
        ranks = rank_pids(launcher)
        os.kill(ranks[1], signal.SIGKILL)
        assert wait_for(lambda: record.state() == "starting", timeout=60), record.log_tail()  # not failed
        assert wait_for(lambda: not process_alive(launcher), timeout=180), record.log_tail()
    finally:
        jobs.cancel(record.run_id, store, start_worker=False)
    status = record.status()
    assert status["state"] == "completed", (status, record.log_tail())
    assert status["pid"] == launcher  # the launcher stayed the run's process through the restart
    assert status["distributed"]["restarts"] == 1 and status["resumed_from"] == "last.pt"
    assert 0 < status["resumed_at_step"] < status["step"]
    train_steps = steps_of(record, "train")
    assert train_steps == list(range(1, status["step"] + 1))  # continued where the checkpoint was: no repeats
    assert gone(ranks.values())
    assert wait_for(lambda: gone(children(launcher)), timeout=30)


# ---- cancel and resume ---------------------------------------------------------------------------
def test_cancel_stops_every_rank_at_a_checkpoint_and_resume_finishes_the_run(tmp_path, cifar_npz):
    root = tmp_path / "runs"
    store = RunStore(root)
    launcher = start(root, cifar_npz, "--run-id", "stopped", "--nproc", "2", "--time-limit-min", "0.15", *LONG)
    record = store.record("stopped")
    try:
        assert wait_for(lambda: len(steps_of(record, "train")) >= 3 if record.metrics_path.exists() else False,
                        timeout=120)
        ranks = rank_pids(launcher.pid)
        assert jobs.cancel("stopped", store, start_worker=False) == "cancelling"
        assert launcher.wait(timeout=60) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    status = record.status()
    assert status["state"] == "cancelled" and "SIGTERM" in status["reason"], status
    assert gone(ranks.values())
    stopped_at = status["step"]
    resumed = subprocess.run(cli(root, cifar_npz, "train", "--resume", "stopped", "--no-progress"), cwd=REPO,
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = record.status()
    assert status["state"] == "completed" and status["resumed_at_step"] == stopped_at, status
    assert steps_of(record, "train") == list(range(1, status["step"] + 1))


# ---- (5): the queue counts a run's processes as slots ----------------------------------------------
def test_the_queue_counts_a_run_of_n_processes_as_n_slots(tmp_path, monkeypatch):
    """The supervisor's pass over the queue, with the start of each run's process replaced by a stand-in."""
    monkeypatch.setenv("CIFAR_LAB_SLOTS_CPU", "2")
    store = RunStore(tmp_path)
    launched = []

    def popen(cmd, **kwargs):
        launched.append(store.record(cmd[cmd.index("--resume") + 1]).config_dict()["name"])
        return SimpleNamespace(pid=os.getpid(), poll=lambda: None)  # a live pid: the run looks alive

    monkeypatch.setattr(jobs, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT,
                                                            DEVNULL=subprocess.DEVNULL))

    def queued(nproc: int, name: str):
        record = store.create(RunConfig(model="lenet", batch_size=64, nproc=nproc, name=name).validated())
        record.update_status(device_kind="cpu")
        return record

    supervisor = jobs.Supervisor(store)
    one = queued(1, "one")
    supervisor.tick()
    two, small = queued(2, "two"), queued(1, "small")
    supervisor.tick()
    assert launched == ["one"]  # 1 + 2 > 2 slots; "small" waits behind "two" instead of overtaking it
    assert jobs.queue_wait(store, two.run_id).startswith("2 free CPU slots (")
    one.update_status(state="completed")
    supervisor.tick()
    assert launched == ["one", "two"]  # 2 of 2 slots taken now: "small" waits for one
    assert jobs.queue_wait(store, small.run_id).startswith("a free CPU slot (")

    monkeypatch.setenv("CIFAR_LAB_SLOTS_CPU", "1")
    for record in (two, small):
        record.update_status(state="completed")
    queued(4, "big")
    supervisor.tick()
    assert launched == ["one", "two", "big"]  # more slots than there are: it runs alone rather than never
    assert [jobs.slots_needed(c) for c in ({"nproc": 3}, {}, None)] == [3, 1, 1]
    assert jobs.fits(0, 4, 1) and not jobs.fits(1, 1, 1) and not jobs.fits(0, 1, 0)


# ---- (6): configuration rules --------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"nproc": 2, "batch_size": 75}, "batch_size 75 does not split evenly over 2 processes: batch_size is the "
                                     "global batch and each process takes batch_size / nproc images (use a "
                                     "multiple of 2, such as 74 or 76)"),
    ({"nproc": 4, "batch_size": 2}, "batch_size 2 leaves some of the 4 processes without images"),
    ({"nproc": 2, "sync_bn": True, "device": "cpu"}, "sync_bn needs CUDA"),
    ({"nproc": 65}, "nproc"),
    ({"max_restarts": -1}, "max_restarts"),
])
def test_config_rules_of_several_processes(changes, message):
    problems = RunConfig.problems({"model": "lenet", "batch_size": 128, **changes})
    assert any(message in problem for problem in problems), problems


def test_valid_multi_process_configs_and_their_flags():
    cfg = RunConfig(model="lenet", batch_size=128, nproc=4, sync_bn=True, max_restarts=2).validated()
    assert {"--nproc", "--sync-bn", "--max-restarts"} <= set(cfg.to_flags())
    assert "sync-bn" in cfg.key_tricks()
    assert RunConfig(model="lenet", sync_bn=True, device="cpu").validated().sync_bn  # one process: no effect
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):  # torchrun on 3 machines
        check_world(RunConfig(model="lenet", batch_size=128).validated(), SimpleNamespace(type="cpu"), 3)


def test_cli_refuses_an_uneven_split_before_anything_starts(tmp_path, cifar_npz):
    done = subprocess.run(cli(tmp_path, cifar_npz, "train", "--nproc", "3", "--batch-size", "100", "--model", "lenet"),
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: batch_size 100 does not split evenly over 3 processes" in done.stderr
    assert RunStore(tmp_path).ids() == []


def test_a_new_run_under_torchrun_needs_a_run_id(tmp_path):
    cfg = RunConfig(model="lenet").validated()
    with contextlib.ExitStack() as held:
        message = open_as_main(cfg, RunStore(tmp_path), None, False, None, held)
    assert message.startswith("under torchrun, name the run with --run-id")


def test_the_failure_reason_names_the_killed_rank_first():
    failure = lambda code, pid: SimpleNamespace(exitcode=code, pid=pid, signal_name=lambda: "SIGKILL")
    killed = failure_reason({0: failure(1, 10), 1: failure(-9, 11)}, 2, 0, "RuntimeError: connection closed")
    assert killed.startswith("rank 1 of 2 (pid 11) was killed by SIGKILL; the other processes were stopped "
                             "(no restarts, max_restarts 0)")
    own = failure_reason({0: failure(1, 10), 1: failure(1, 11)}, 2, 2, "loss became nan at step 3")
    assert own.startswith("loss became nan at step 3 (rank 0 of 2 exited with code 1, rank 1 of 2 exited with "
                          "code 1) (after 2 restarts, max_restarts 2)")


def test_sync_bn_converts_the_norms_and_keeps_the_checkpoint_keys():
    from cifar_core.models import create_model
    model = create_model("fastnet", {"width": 0.25}, 10)
    keys = list(model.state_dict())
    converted = Ranks(0, 2).convert_norms(model, sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert list(converted.state_dict()) == keys
    assert Ranks().convert_norms(model, sync_bn=True) is model  # one process: nothing to synchronize


def test_other_ranks_never_write_the_record(tmp_path):
    store = RunStore(tmp_path)
    record = store.create(RunConfig(model="lenet").validated(), state="running")
    view = ReadOnlyRecord(store.root, record.run_id)
    assert view.update_status(state="completed")["state"] == "completed"  # its own outcome, kept in memory
    view.append_metrics({"kind": "train", "step": 1})
    view.write_logits(test_logits=None)
    assert record.state() == "running" and not record.metrics_path.exists() and not record.logits_path.exists()


def test_a_rank_takes_its_block_of_the_global_batch():
    shares = [Ranks(rank, 4).batch_slice(100) for rank in range(4)]
    assert [(s.start, s.stop) for s in shares] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert Ranks(0, 4).images_per_epoch(1010, 100) == 1008  # the last batch of 10 loses 2 to split by 4
    assert Ranks().images_per_epoch(1010, 100) == 1010
