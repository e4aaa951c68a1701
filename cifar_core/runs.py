"""Run records on disk: runs/<run_id>/{config.json, status.json, metrics.jsonl, results.json, ...}.

The trainer is the only writer of a run's metrics and checkpoints; the app and the CLI only read.
Every JSON file is replaced atomically (write a temp file, then os.replace), so a reader never sees
half a status. metrics.jsonl is append-only; readers consume it incrementally and ignore a
half-written last line until its newline arrives.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import RunConfig
from .params import ID_RE, ConfigError, validate_id

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINAL_STATES = ("completed", "failed", "cancelled")


def default_runs_root() -> Path:
    return Path(os.environ.get("CIFAR_LAB_RUNS", "runs")).expanduser()


def validate_run_id(run_id: str) -> str:
    return validate_id(run_id, "run id")


def new_run_id(label: str = "") -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:32]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (stamp, slug, secrets.token_hex(3)) if p)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return default


@dataclass
class MetricsReader:
    """Incremental reader of metrics.jsonl: each `read_new()` parses only bytes not seen before."""

    path: Path
    offset: int = 0
    rows: list = field(default_factory=list)
    bad_lines: int = 0

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # file replaced or truncated: start again
            self.offset, self.rows, self.bad_lines = 0, [], 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []  # only a half-written line so far
        self.offset += end + 1
        new = []
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(row, dict):
                new.append(row)
            else:
                self.bad_lines += 1
        self.rows.extend(new)
        return new


class RunRecord:
    """One run folder. Construct through RunStore so the id is validated and contained."""

    def __init__(self, root: Path, run_id: str):
        self.run_id = validate_run_id(run_id)
        self.root = Path(root)
        self.path = self.root / self.run_id

    # paths
    @property
    def config_path(self) -> Path: return self.path / "config.json"
    @property
    def status_path(self) -> Path: return self.path / "status.json"
    @property
    def metrics_path(self) -> Path: return self.path / "metrics.jsonl"
    @property
    def results_path(self) -> Path: return self.path / "results.json"
    @property
    def log_path(self) -> Path: return self.path / "train.log"

    def checkpoint_path(self, which: str) -> Path:
        if which not in ("last", "best"):
            raise ValueError(which)
        return self.path / f"{which}.pt"

    def exists(self) -> bool:
        return self.config_path.exists()

    # config
    def write_config(self, cfg) -> None:
        atomic_write_json(self.config_path, cfg.to_dict())

    def config_dict(self) -> dict | None:
        return read_json(self.config_path)

    def config(self):
        data = self.config_dict()
        if data is None:
            raise ConfigError(f"run {self.run_id} has no readable config.json")
        return RunConfig.from_dict(data)

    # status
    def status(self) -> dict:
        return read_json(self.status_path, default={}) or {}

    def update_status(self, **changes) -> dict:
        status = self.status()
        status.update(changes)
        status["updated"] = time.time()
        atomic_write_json(self.status_path, status)
        return status

    def state(self) -> str:
        return self.status().get("state", "unknown")

    # metrics
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def metrics_reader(self) -> MetricsReader:
        return MetricsReader(self.metrics_path)

    def read_metrics(self) -> list[dict]:
        reader = self.metrics_reader()
        reader.read_new()
        return reader.rows

    def results(self) -> dict | None:
        return read_json(self.results_path)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class RunStore:
    """The runs root: create, find, list and delete run folders, never outside the root."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_runs_root()

    def record(self, run_id: str) -> RunRecord:
        record = RunRecord(self.root, run_id)
        if record.path.resolve().parent != self.root.resolve():
            raise ConfigError(f"run id {run_id!r} does not name a folder inside {self.root}")
        return record

    def create(self, cfg, run_id: str | None = None, state: str = "queued") -> RunRecord:
        self.root.mkdir(parents=True, exist_ok=True)
        run_id = run_id or new_run_id(cfg.name or cfg.model)
        record = self.record(run_id)
        record.path.mkdir(parents=False, exist_ok=False)
        record.write_config(cfg)
        record.update_status(state=state, created=time.time(), run_id=run_id)
        return record

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = [p.name for p in self.root.iterdir()
               if p.is_dir() and ID_RE.match(p.name) and (p / "config.json").exists()]
        return sorted(out)

    def records(self) -> Iterator[RunRecord]:
        for run_id in self.ids():
            yield self.record(run_id)

    def delete(self, run_id: str) -> None:
        record = self.record(run_id)
        if record.path.is_symlink() or not record.path.is_dir():
            raise ConfigError(f"run {run_id} not found")
        shutil.rmtree(record.path)
