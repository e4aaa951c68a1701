"""Background training jobs: a queue of run records and one supervisor process per runs root.

How it works
- `submit(cfg)` writes a run record in state "queued" and makes sure a supervisor is alive.
- The supervisor (`python -m cifar_core worker`) is a small process of its own, started detached by
  whoever submits or cancels (the app, the CLI). A lock file (`<runs>/.worker.lock`, flock) makes
  sure at most one runs per runs root; a second one exits at once. It loops every ~0.5 s: it starts
  queued runs oldest first while the device has free slots (default 1 CPU job, 1 GPU job; a run with
  nproc N takes N slots, and one asking for more slots than there are starts alone), forces
  a kill on cancelled runs that outlive their grace period, and marks runs whose process vanished
  as failed ("process lost") with the tail of their log. It exits after some idle time with
  nothing queued or running; the next submit starts a new one.
- A run may have an owner: a process on this machine that waits for it (a search worker waiting on
  its trial). `submit(..., owner=owner_of_this_process())` records it; when the owner dies (killed,
  machine restart) its unfinished runs are cancelled (`cancel_orphans`), so nobody trains for a
  waiter that is gone.
- Each run is its own OS process (`python -m cifar_core train --resume RUN_ID`), in its own
  session so the Streamlit server, the supervisor and the runs can each be restarted independently:
  a restarted app or supervisor re-attaches to running jobs by the pid and start time in status.json.
- State changes that race (queued -> starting vs queued -> cancelled) happen under
  `<runs>/.queue.lock`.
No queue library is used: the queue *is* the run records on disk, which is what the app must read
anyway; a broker (Redis, Celery) would add a service to keep alive for no gain on one machine.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import teacher_ids
from .devices import default_device_kind
from .processes import process_alive, process_start_time
from .params import ConfigError
from .runs import FINAL_STATES, RunRecord, RunStore

GRACE_SECONDS = float(os.environ.get("CIFAR_LAB_CANCEL_GRACE", "15"))
IDLE_EXIT_SECONDS = float(os.environ.get("CIFAR_LAB_WORKER_IDLE", "60"))
POLL_SECONDS = 0.5
ACTIVE_STATES = ("starting", "running")


def slots() -> dict[str, int]:
    return {"cpu": int(os.environ.get("CIFAR_LAB_SLOTS_CPU", "1")),
            "cuda": int(os.environ.get("CIFAR_LAB_SLOTS_CUDA", "1"))}


def slots_needed(cfg_dict: dict | None) -> int:
    """The slots of its device a run occupies: one per process (nproc)."""
    try:
        return max(1, int((cfg_dict or {}).get("nproc", 1)))
    except (TypeError, ValueError):
        return 1


def fits(busy: int, needed: int, limit: int) -> bool:
    """Whether a run needing `needed` slots may start with `busy` slots of its device taken. A run that
    needs more slots than there are starts alone (when none is taken), rather than never; a device with
    no slots (limit 0) starts nothing."""
    return busy + needed <= limit or (busy == 0 and limit > 0)


def job_device(cfg_dict: dict) -> str:
    wanted = cfg_dict.get("device", "auto")
    if wanted == "auto":
        return default_device_kind()
    return wanted


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fh, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()


# ---- public API --------------------------------------------------------------------------------
def owner_of_this_process() -> dict:
    """This process as a run's owner (see `submit`): pid, start time and host."""
    return {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}


def submit(cfg, store: RunStore | None = None, data_source: str | None = None,
           start_worker: bool = True, meta: dict | None = None, owner: dict | None = None) -> RunRecord:
    """Queue a validated config as a new run; the supervisor starts it when a slot is free.

    `meta` is stored in status.json as is (for example {"study": id, "study_kind": ..., "cell": ...}).
    `owner` (`owner_of_this_process()`): the run is cancelled when that process ends before it.
    """
    store = store or RunStore()
    cfg = cfg.validated()
    record = store.create(cfg, state="queued")
    record.update_status(device_kind=job_device(cfg.to_dict()), data_source=data_source,
                         **({"owner": owner} if owner else {}), **(meta or {}))
    if start_worker:
        ensure_worker(store)
    return record


def existing_record(store: RunStore, run_id: str) -> RunRecord:
    record = store.record(run_id)
    if not record.exists():
        raise ConfigError(f"run {run_id} not found")
    return record


def cancel(run_id: str, store: RunStore | None = None, start_worker: bool = True) -> str:
    """Cancel a queued run at once, or ask a running one to stop (SIGTERM, then a forced kill)."""
    store = store or RunStore()
    record = existing_record(store, run_id)
    with file_lock(store.root / ".queue.lock"):
        status = record.status()
        state = status.get("state")
        if state == "queued":
            record.update_status(state="cancelled", error="cancelled before it started",
                                 finished=time.time())
            return "cancelled"
        if state in FINAL_STATES:
            return state
        record.update_status(cancel_requested=time.time())
    pid = status.get("pid")
    if process_alive(pid, status.get("pid_start")):
        signal_run(pid, signal.SIGTERM)
    if start_worker:
        ensure_worker(store)
    return "cancelling"


RESUMABLE_STATES = ("cancelled", "failed")


def resumable(record: RunRecord, status: dict | None = None) -> bool:
    """Whether `resume` can queue this run again: it was cancelled, or it failed after writing a
    checkpoint (a failure before any checkpoint is better relaunched, after fixing its cause)."""
    status = record.status() if status is None else status
    state = status.get("state")
    if state == "cancelled":
        return True
    return state == "failed" and any(record.checkpoint_path(which).is_file() for which in ("last", "best"))


def resume(run_id: str, store: RunStore | None = None, start_worker: bool = True) -> RunRecord:
    """Queue a cancelled (or failed, checkpointed) run again: the supervisor then continues it from its
    newest usable checkpoint with `train --resume RUN_ID`, as a resume from the command line does
    (a run cancelled before it started simply starts). ConfigError when the run cannot be resumed."""
    store = store or RunStore()
    record = existing_record(store, run_id)
    with file_lock(store.root / ".queue.lock"):
        status = record.status()
        if not resumable(record, status):
            state = status.get("state", "unknown")
            why = ("it failed before writing a checkpoint: relaunch it instead" if state == "failed"
                   else f"it is {state}")
            raise ConfigError(f"run {run_id} cannot be resumed: {why}")
        record.update_status(state="queued", error=None, reason=None, finished=None, cancel_requested=None,
                             pid=None, pid_start=None, launched=None, resumed_at_step=None,
                             requeued=time.time())
    if start_worker:
        ensure_worker(store)
    return record


def delete(run_id: str, store: RunStore | None = None) -> None:
    """Delete a finished or queued run's folder (running runs must be cancelled first)."""
    store = store or RunStore()
    record = store.record(run_id)
    state = record.state()
    if state in ACTIVE_STATES and process_alive(record.status().get("pid"), record.status().get("pid_start")):
        raise ConfigError(f"run {run_id} is {state}: cancel it before deleting")
    if state == "queued":
        cancel(run_id, store)
    store.delete(run_id)


def signal_run(pid: int, sig: int) -> None:
    """Signal a run's process, and the processes it started when it leads its own process group (as
    the supervisor starts runs). A run started directly from a shell or a script shares its caller's
    group: only its own pid is signalled then, never the caller and the caller's other children."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def worker_alive(store: RunStore) -> bool:
    with file_lock(store.root / ".worker.lock", blocking=False) as got:
        return not got


_SPAWNED: list[subprocess.Popen] = []


def reap_workers() -> int:
    """Collect the exit status of supervisors this process started that have ended (a long-lived
    caller such as the app's server would otherwise keep them as <defunct> zombies); returns how many
    are still running. Called on every `ensure_worker` and `refresh`; each supervisor is also waited
    on by a daemon thread (`_wait_in_background`), so it is collected the moment it exits."""
    _SPAWNED[:] = [p for p in _SPAWNED if p.poll() is None]
    return len(_SPAWNED)


def _wait_in_background(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.wait, name=f"reap-supervisor-{proc.pid}", daemon=True).start()


def ensure_worker(store: RunStore | None = None) -> bool:
    """Start a detached supervisor for this runs root unless one holds the lock. True if started."""
    reap_workers()
    store = store or RunStore()
    store.root.mkdir(parents=True, exist_ok=True)
    if worker_alive(store):
        return False
    log = open(store.root / ".worker.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cifar_core", "--runs-root", str(store.root), "worker"],
                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]),
                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    _SPAWNED.append(proc)
    _wait_in_background(proc)
    return True


def reconcile(store: RunStore) -> list[str]:
    """Mark active runs whose process is gone as failed ("process lost"). Safe to call from any reader."""
    lost = []
    for record in store.records():
        status = record.status()
        if status.get("state") not in ACTIVE_STATES:
            continue
        pid = status.get("pid")
        if pid is None and time.time() - status.get("launched", time.time()) < 30:
            continue  # launched a moment ago, the trainer hasn't written its pid yet
        if process_alive(pid, status.get("pid_start")):
            continue
        # The trainer may have just written its final state: read again before declaring it lost.
        if record.status().get("state") in FINAL_STATES:
            continue
        if status.get("cancel_requested"):
            record.update_status(state="cancelled", finished=time.time(),
                                 error="cancelled (the process ended before it could report)")
            continue
        tail = record.log_tail(2000)
        record.update_status(state="failed", finished=time.time(),
                             error="process lost: the training process ended without finishing"
                                   + (f"\n--- log tail ---\n{tail}" if tail else ""))
        lost.append(record.run_id)
    return lost


def owner_gone(status: dict) -> bool:
    """Whether an unfinished run's owner (a process on this machine) has ended. An owner on another
    host cannot be checked from here: never gone."""
    owner = status.get("owner")
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    return not process_alive(owner.get("pid"), owner.get("start"))


def cancel_orphans(store: RunStore) -> list[str]:
    """Cancel the unfinished runs whose owner has ended (the running ones through the normal cancel
    path: SIGTERM, then a kill after the grace period). Returns their ids."""
    orphans = []
    for record in store.records():
        status = record.status()
        if status.get("state") in FINAL_STATES or status.get("cancel_requested") or not owner_gone(status):
            continue
        record.update_status(orphaned=f"its owner (pid {status['owner'].get('pid')}) ended before it")
        cancel(record.run_id, store, start_worker=False)
        orphans.append(record.run_id)
    return orphans


def refresh(store: RunStore) -> list[str]:
    """What every reader of the records calls (the app's pages, `runs`): mark runs whose process
    vanished as failed, and restart the supervisor when queued work has none (it died, or a machine
    restarted). Returns the run ids marked lost."""
    reap_workers()
    lost = reconcile(store)
    cancel_orphans(store)
    if any(record.status().get("state") == "queued" for record in store.records()) and not worker_alive(store):
        ensure_worker(store)
    return lost


def job_table(store: RunStore) -> dict[str, list[str]]:
    """Run ids by state (queued in submission order)."""
    table: dict[str, list[tuple[float, str]]] = {}
    for record in store.records():
        status = record.status()
        table.setdefault(status.get("state", "unknown"), []).append((status.get("created", 0), record.run_id))
    return {state: [rid for _, rid in sorted(items)] for state, items in table.items()}


def unfinished_source(config: dict, table: dict[str, list[str]]) -> str | None:
    """The run a queued run starts from (init_run) or learns from (teacher_run) while that run is still
    queued or training: the queued run must wait for it to complete."""
    unfinished = {rid for state in ("queued", "starting", "running") for rid in table.get(state, [])}
    sources = [config.get("init_run") or ""] + teacher_ids(config.get("teacher_run") or "")
    return next((run_id for run_id in sources if run_id in unfinished), None)


def queue_wait(store: RunStore, run_id: str) -> str:
    """What a queued run waits for, in words: "a free CPU slot (r-1 is training)", "2 runs queued
    before it", "the job supervisor to start it"…"""
    table = job_table(store)
    queued = table.get("queued", [])
    if run_id not in queued:
        return "its turn"
    position = queued.index(run_id)
    record = store.record(run_id)
    kind = record.status().get("device_kind") or job_device(record.config_dict() or {})
    needed = slots_needed(record.config_dict())
    busy = [rid for rid in table.get("starting", []) + table.get("running", [])
            if (store.record(rid).status().get("device_kind") or "cpu") == kind]
    taken = sum(slots_needed(store.record(rid).config_dict()) for rid in busy)
    where = f"position {position + 1} of {len(queued)} in the queue"
    source = unfinished_source(record.config_dict() or {}, table)
    if source:
        return f"run {source}, which it starts from, to complete ({where})"
    if not fits(taken, needed, slots().get(kind, 1)):
        names = ", ".join(busy[:3]) + (" …" if len(busy) > 3 else "")
        wanted = f"{needed} free {kind.upper()} slots" if needed > 1 else f"a free {kind.upper()} slot"
        return f"{wanted} ({names} {'is' if len(busy) == 1 else 'are'} training; {where})"
    if position:
        return f"{position} run{'s' if position != 1 else ''} queued before it ({where})"
    if not worker_alive(store):
        return "the job supervisor to start it (it is being started)"
    return "the job supervisor, which starts it in a moment"


# ---- supervisor --------------------------------------------------------------------------------
class Supervisor:
    def __init__(self, store: RunStore):
        self.store = store
        self.children: dict[str, subprocess.Popen] = {}

    def tick(self) -> bool:
        """One pass. Returns True if anything is queued or running."""
        for run_id, proc in list(self.children.items()):
            if proc.poll() is not None:
                del self.children[run_id]
        reconcile(self.store)
        cancel_orphans(self.store)
        self._enforce_cancel_grace()
        busy = self._start_queued()
        return busy

    def _enforce_cancel_grace(self) -> None:
        for record in self.store.records():
            status = record.status()
            requested = status.get("cancel_requested")
            if status.get("state") not in ACTIVE_STATES or not requested:
                continue
            pid = status.get("pid")
            if time.time() - requested > GRACE_SECONDS and process_alive(pid, status.get("pid_start")):
                signal_run(pid, signal.SIGKILL)
                record.update_status(state="cancelled", finished=time.time(),
                                     error=f"killed after a {GRACE_SECONDS:.0f} s grace period")

    def _start_queued(self) -> bool:
        """Start queued runs oldest first while their device has the slots they need (nproc each). A run
        that must wait holds back the later runs of its device, so small runs never starve a big one."""
        limits = slots()
        with file_lock(self.store.root / ".queue.lock"):
            table = job_table(self.store)
            taken = {"cpu": 0, "cuda": 0}
            for run_id in table.get("starting", []) + table.get("running", []):
                record = self.store.record(run_id)
                kind = record.status().get("device_kind", "cpu")
                taken[kind] = taken.get(kind, 0) + slots_needed(record.config_dict())
            queued = table.get("queued", [])
            waiting: set[str] = set()
            for run_id in queued:
                record = self.store.record(run_id)
                config = record.config_dict() or {}
                kind = record.status().get("device_kind") or job_device(config)
                if unfinished_source(config, table):
                    continue  # waits for its source run without holding back the others
                if kind in waiting or not fits(taken.get(kind, 0), slots_needed(config), limits.get(kind, 1)):
                    waiting.add(kind)
                    continue
                if self._launch(record):
                    taken[kind] = taken.get(kind, 0) + slots_needed(config)
        return bool(queued) or bool(table.get("running")) or bool(table.get("starting")) or bool(self.children)

    def _launch(self, record: RunRecord) -> bool:
        """Start a queued run's trainer; False (nothing started) when the run is no longer queued.

        Only a run still "queued" is marked "starting" (before the process starts, so that nobody
        reads a pid of an earlier attempt), and the new process's pid is written only while the run is
        still "starting": a `train --resume` started by hand may have won the run's train lock in
        between and written its own state and pid, which must stay (our process then exits, refused)."""
        status = record.status()
        if status.get("state") != "queued":
            return False
        record.update_status(state="starting", pid=None, pid_start=None, launched=time.time())
        cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(self.store.root), "train",
               "--resume", record.run_id, "--no-progress"]
        if status.get("data_source"):
            cmd += ["--data", status["data_source"]]
        try:
            with open(record.log_path, "ab") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]),
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as exc:
            record.update_status(state="failed", finished=time.time(),
                                 error=f"could not start the training process: {exc}")
            return False
        self.children[record.run_id] = proc
        now = record.status()
        if now.get("state") == "starting" and now.get("pid") is None:
            record.update_status(pid=proc.pid, pid_start=process_start_time(proc.pid))
        return True

    def serve(self, idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        stop = {"flag": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        idle_since = time.time()
        while not stop["flag"]:
            if self.tick():
                idle_since = time.time()
            elif time.time() - idle_since > idle_exit:
                break
            time.sleep(POLL_SECONDS)


def run_worker(store: RunStore, idle_exit: float = IDLE_EXIT_SECONDS) -> int:
    with file_lock(store.root / ".worker.lock", blocking=False) as got:
        if not got:
            print("another supervisor already serves", store.root)
            return 0
        print(f"supervisor {os.getpid()} serving {store.root}", flush=True)
        Supervisor(store).serve(idle_exit)
    return 0
