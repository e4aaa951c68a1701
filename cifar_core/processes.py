"""Is a recorded process still the one we started? (pid reuse is told apart by the kernel start time).
Also: a lock that only one process holds at a time and that names its holder."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

__all__ = ["process_start_time", "process_alive", "LockHeld", "process_lock"]


def process_start_time(pid: int) -> float | None:
    """Kernel start time of a process (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return float(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int | None, start_time: float | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        if state == b"Z":
            return False
    except OSError:
        return False
    if start_time is not None and process_start_time(pid) != start_time:
        return False
    return True


class LockHeld(Exception):
    """Another process holds the lock. `holder`: what it wrote into the lock file (pid, pid_start,
    since: the time it took the lock), empty when the file could not be read."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is held by process {holder.get('pid', '?')}")
        self.path, self.holder = path, holder

    @property
    def pid(self) -> int | None:
        return self.holder.get("pid")

    @property
    def since(self) -> float | None:
        return self.holder.get("since")


def _read_holder(fh) -> dict:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:  # the holder is between taking the lock and writing its name
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def process_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) while the block runs, without waiting:
    LockHeld when another process holds it. While held, the file names this process (pid, kernel
    start time, since), for the message the next one gets. The kernel drops the lock when the
    process ends, however it ends, so a killed holder never leaves a stale lock."""
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, _read_holder(fh)) from None
        pid = os.getpid()
        fh.seek(0)
        fh.truncate()
        json.dump({"pid": pid, "pid_start": process_start_time(pid), "since": time.time()}, fh)
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
