"""Training one run in several processes: DistributedDataParallel under torchrun (torch.distributed.elastic).

Inside each process (a rank, started by torchrun with RANK, WORLD_SIZE and LOCAL_RANK in its
environment), `init_distributed_mode` joins the process group (gloo for CPU tensors, NCCL for CUDA
ones) and returns the `Ranks` the trainer works with: whether this is rank 0 (the only one that writes
the run record: status, metrics, checkpoints, results), the rank's share of a global batch, sums over
the ranks, the model wrapped in DDP. A single process gets `Ranks()`, whose methods change nothing, so
the loop keeps one code path. Ranks other than 0 hold the record as a `ReadOnlyRecord`.

`launch_ranks` is what `train --nproc N` (and the job supervisor, for a queued run with nproc > 1)
runs outside torchrun: torch's elastic agent, the code behind the `torchrun` command, started in this
process with N copies of `python -m cifar_core train --resume RUN_ID`. It waits for them, restarts them
all up to max_restarts times after a failure (they resume from the last checkpoint), and writes the
outcome the ranks cannot write themselves: a rank killed or crashed ("rank 1 of 2 (pid …) was killed
by SIGKILL"), or the agent stopped by a signal (cancel).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import RunConfig, check_processes
from ..devices import cuda_available, cuda_device_count, resolve_device
from ..params import ConfigError
from ..processes import process_start_time
from ..runs import FINAL_STATES, RunRecord

LAUNCHER_ENV = "CIFAR_LAB_LAUNCHER_PID"  # set for the ranks `launch_ranks` starts: the launcher's pid
TIMEOUT_ENV = "CIFAR_LAB_DIST_TIMEOUT_MIN"  # how long a collective waits for the other ranks (default 30 min)
AGENT_POLL_S = 0.5


# ---- inside a rank -------------------------------------------------------------------------------
def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_other_rank() -> bool:
    """A process of a distributed run other than rank 0: it neither reads nor writes the run record."""
    return in_torchrun() and os.environ["RANK"] != "0"


def launched_here() -> bool:
    """Whether `launch_ranks` of this machine started this rank: the launcher then holds the run's train
    lock and is the process status.json names (cancel signals it; it outlives restarts)."""
    return os.environ.get(LAUNCHER_ENV) == str(os.getppid())


def restart_count() -> int:
    """How often torchrun restarted the ranks of this run so far."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarts_left() -> int:
    """How often torchrun will still restart the ranks after a failure."""
    return max(0, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - restart_count())


def rank_exit_code(state: str) -> int:
    """A rank's exit status: 0 for completed and cancelled, so that torchrun restarts the run only after a
    failure, never to undo a cancel."""
    return 0 if state in ("completed", "cancelled") else 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that train one run. `Ranks()`: a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def images_per_epoch(self, n: int, batch_size: int) -> int:
        """How many of an epoch's `n` images are trained on: all but (n mod batch_size) mod world, so that
        the epoch's last, smaller batch splits evenly too (at most world - 1 images an epoch left out)."""
        return n - (n % batch_size) % self.world

    def batch_slice(self, n: int) -> slice:
        """This rank's share of a global batch of `n` images (a multiple of world): consecutive blocks in
        rank order, so that together the ranks train on exactly the batch one process would."""
        share = n // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank: every rank gets the same answer."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item() > 0)

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (pickled through the process group)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def convert_norms(self, model: torch.nn.Module, sync_bn: bool) -> torch.nn.Module:
        """`model` with SyncBatchNorm in place of BatchNorm when asked and there are several ranks (the
        parameters and buffers stay the same tensors, so checkpoints read alike)."""
        if self.distributed and sync_bn:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the training steps call: DDP around `model` (it broadcasts rank 0's weights now and averages
        the gradients in backward), or `model` itself in a single process."""
        if not self.distributed:
            return model
        device_ids = [self.local_rank] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def init_distributed_mode() -> Ranks:
    """Join the process group torchrun describes in the environment; `Ranks()` outside torchrun."""
    if not in_torchrun():
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not ranks.distributed or dist.is_initialized():
        return ranks
    backend = "gloo"
    if cuda_available():
        torch.cuda.set_device(ranks.local_rank)
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (the config, the checkpoint) over gloo, CUDA ones over NCCL
    timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "30")))
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's agent keeps one store across restarts: without a prefix of its own, a restarted rank
    # could read the address a rank of the previous attempt published, and fail to connect to it
    store = dist.PrefixStore(f"cifar-lab/attempt-{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world, timeout=timeout)
    exit_with_agent()
    return ranks


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_rank(code: int) -> None:
    """End this rank's process with `code` once its part of the run is done and written, without the
    interpreter's teardown: there, one time in ten on the CPU, a gloo thread is destroyed while still
    joinable and the process dies by SIGABRT ("terminate called without an active exception") after
    a run that completed, which the agent would report as a failed run."""
    close_distributed()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_with_agent() -> None:
    """End this rank when the agent that started it is gone (killed): torchrun starts every rank in a
    session of its own, so a signal to the agent's process group never reaches the ranks, and nobody
    would collect them. A daemon thread checks the parent pid twice a second."""
    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(AGENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-agent", daemon=True).start()


def check_world(cfg: RunConfig, device: torch.device, world: int) -> None:
    """ConfigError when `cfg` cannot train in `world` processes on `device` (batch split, SyncBatchNorm)."""
    check_processes({**cfg.to_dict(), "nproc": world, "device": device.type})


class ReadOnlyRecord(RunRecord):
    """The run record as a rank other than 0 holds it: reads go to the folder (when this machine sees it),
    status changes stay in this process, and metrics, logits and the config are never written. Rank 0
    alone writes the record."""

    def __init__(self, root, run_id: str):
        super().__init__(root, run_id)
        self.own_status: dict = {}

    def status(self) -> dict:
        return {**super().status(), **self.own_status}

    def update_status(self, **changes) -> dict:
        self.own_status.update(changes)
        return self.status()

    def append_metrics(self, row: dict) -> None:
        pass

    def write_logits(self, **arrays) -> None:
        pass

    def write_config(self, cfg) -> None:
        pass


# ---- the launcher --------------------------------------------------------------------------------
def check_launch(cfg: RunConfig) -> None:
    """ConfigError, before any process starts, when this machine cannot run cfg.nproc ranks of `cfg`."""
    device = resolve_device(cfg.device)
    check_world(cfg, device, cfg.nproc)
    if device.type == "cuda" and cuda_device_count() < cfg.nproc:
        raise ConfigError(f"nproc {cfg.nproc} needs {cfg.nproc} GPUs (one per process); this machine has "
                          f"{cuda_device_count()}")


def launch_ranks(record: RunRecord, cfg: RunConfig, data_source: str | None = None) -> str:
    """Train `record` in cfg.nproc processes on this machine under torch's elastic agent; returns the
    run's final state. The caller holds the run's train lock."""
    pid = os.getpid()
    record.update_status(state="starting", pid=pid, pid_start=process_start_time(pid), host=os.uname().nodename,
                         launched=time.time(), cancel_requested=None, error=None, reason=None, finished=None)
    try:
        check_launch(cfg)
    except ConfigError as exc:  # e.g. sync_bn with device auto on a machine without GPU
        return finish(record, "failed", str(exc))
    failures, stop_signal, crash = {}, None, None
    # imported here: only the launcher needs the elastic agent (a heavy import)
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    with rank_environment(cfg.nproc), tempfile.TemporaryDirectory(prefix="cifar-lab-torchelastic-") as logs:
        try:
            elastic_launch(launch_config(record, cfg, logs), sys.executable)(*rank_arguments(record, data_source))
        except ChildFailedError as exc:
            failures = exc.failures
        except SignalException as exc:
            stop_signal = exc.sigval
        except Exception as exc:  # the rendezvous or the agent itself failed
            crash = f"the process launcher failed: {type(exc).__name__}: {exc}"
    return settle_outcome(record, cfg, failures, stop_signal, crash)


def launch_config(record: RunRecord, cfg: RunConfig, log_dir: str):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig
    # torchrun --standalone: a rendezvous store of this machine on a free port
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=record.run_id,
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=cfg.max_restarts,
                        monitor_interval=0.2, logs_specs=DefaultLogsSpecs(log_dir=log_dir))


def rank_arguments(record: RunRecord, data_source: str | None) -> list[str]:
    """What each rank runs after `python`: the same train command a queued run gets."""
    args = ["-m", "cifar_core", "--runs-root", str(record.root), "train", "--resume", record.run_id, "--no-progress"]
    return args + (["--data", data_source] if data_source else [])


@contextlib.contextmanager
def rank_environment(nproc: int):
    """The environment the ranks inherit: this launcher's pid (see `launched_here`), unbuffered output,
    and a share of the CPU cores each when OMP_NUM_THREADS is not set (torchrun would give each a single
    thread)."""
    extra = {LAUNCHER_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def settle_outcome(record: RunRecord, cfg: RunConfig, failures: dict, stop_signal, crash: str | None) -> str:
    """Write what the ranks could not and return the run's final state. Rank 0 has written completed,
    cancelled or failed (with its reason) whenever it could; a killed rank, a stopped agent or a crash
    of the launcher is said here."""
    status = record.status()
    state = status.get("state")
    if stop_signal is not None:
        if state in ("completed", "cancelled"):
            return state
        return finish(record, "cancelled", f"cancelled by request ({stop_signal.name}): every process was stopped")
    if crash:
        return finish(record, "failed", crash)
    if failures:
        own_error = status.get("error") if state == "failed" else None
        return finish(record, "failed", failure_reason(failures, cfg.nproc, cfg.max_restarts, own_error))
    if state in FINAL_STATES:
        return state
    return finish(record, "failed", "the training processes ended without reporting an outcome (see the run's log)")


def finish(record: RunRecord, state: str, reason: str) -> str:
    record.update_status(state=state, error=reason, reason=reason, finished=time.time())
    return state


def failure_reason(failures: dict, world: int, max_restarts: int, own_error: str | None = None) -> str:
    """Why the run failed, from the agent's failures ({global rank: ProcessFailure}) of its last attempt:
    the ranks killed by a signal first (the others fail because of them), else rank 0's own error
    `own_error` with the exit codes."""
    killed = {rank: f for rank, f in failures.items() if f.exitcode < 0}
    if killed:
        what = "; ".join(f"rank {rank} of {world} (pid {f.pid}) was killed by {f.signal_name()}"
                         for rank, f in sorted(killed.items()))
        what += "; the other processes were stopped"
    else:
        exits = ", ".join(f"rank {rank} of {world} exited with code {f.exitcode}" for rank, f in sorted(failures.items()))
        what = f"{own_error} ({exits})" if own_error else exits
    restarts = f"after {max_restarts} restart{'s' if max_restarts != 1 else ''}" if max_restarts else "no restarts"
    return f"{what} ({restarts}, max_restarts {max_restarts}); each process's output is in the run's log"
