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
from typing import Any, Iterable, Iterator

from .config import RunConfig
from .params import ID_RE, ConfigError, validate_id

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINAL_STATES = ("completed", "failed", "cancelled")
UNFINISHED_STATES = ("queued", "starting", "running")  # "starting": the job process is loading data
STALE_METRICS_S = 60.0  # a running run without a new metric line for this long: its ETA is not counted down


# ---- facts about one run, from its status.json (and metric rows) ---------------------------------

def _number(value) -> float | None:
    """value as a float; None for missing, bool, NaN or non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _accuracy(value) -> float | None:
    value = _number(value)
    return value if value is not None and value >= 0 else None  # the trainer writes -1 for "none yet"


def best_val_accuracy(status: dict, val_accs: Iterable = ()) -> float | None:
    """The best validation accuracy so far: status.json's best_val_acc, else the best of the metric
    rows' val_acc values (NaN and missing values ignored)."""
    best = _accuracy(status.get("best_val_acc"))
    if best is None:
        found = [v for v in map(_accuracy, val_accs) if v is not None]
        best = max(found) if found else None
    return best


def best_accuracy(status: dict, val_accs: Iterable = ()) -> float | None:
    """The one accuracy that stands for a run in tables: the test accuracy of a completed run, else
    the best validation accuracy so far (see best_val_accuracy)."""
    test = _accuracy(status.get("test_acc")) if status.get("state") == "completed" else None
    return test if test is not None else best_val_accuracy(status, val_accs)


def run_duration(status: dict, now: float | None = None) -> float | None:
    """Seconds from start to finish, or to `now` while it runs; None before it started."""
    started, finished = _number(status.get("started")), _number(status.get("finished"))
    if started is None:
        return None
    if finished is not None and finished >= started:
        return finished - started
    if status.get("state") in ("starting", "running"):
        return (time.time() if now is None else now) - started
    return None


def final_metrics(status: dict, results: dict | None) -> dict[str, float | None]:
    """A run's final numbers: results.json's, else what status.json recorded (None where neither has
    one): test_acc, balanced_acc, macro_f1, train_seconds, steps, params."""
    results = results if isinstance(results, dict) else {}
    out = {}
    for key in ("test_acc", "balanced_acc", "macro_f1", "train_seconds"):
        value = _number(results.get(key))
        out[key] = value if value is not None else _number(status.get(key))
    steps = _number(results.get("steps"))
    out["steps"] = steps if steps is not None else _number(status.get("step"))
    out["params"] = _number(status.get("params"))
    return out


@dataclass
class Progress:
    """Where a run stands: steps, epochs, elapsed time and the time left (None where unknown)."""
    step: int
    total_steps: int | None
    fraction: float | None  # of the steps done (1.0 for a completed run without step counts)
    epoch: float | None
    total_epochs: int | None
    elapsed: float | None
    eta: float | None  # seconds left, while running
    stale_for: float  # seconds since the last metric line (0 when not running)

    @property
    def stale(self) -> bool:
        return self.stale_for > STALE_METRICS_S


def run_progress(status: dict, last_train: dict, now: float | None = None) -> Progress:
    """The progress of a run from its status.json and its latest train metric row. The ETA assumes the
    remaining steps go as fast as the done ones; while no new metric line arrives it is counted down,
    until STALE_METRICS_S, after which it stays (and the run is `stale`)."""
    now = time.time() if now is None else now
    state = status.get("state")
    step = int(max(_number(last_train.get("step")) or 0, _number(status.get("step")) or 0))
    total = _number(status.get("total_steps"))
    total = int(total) if total and total > 0 else None
    elapsed = _number(last_train.get("elapsed"))
    started = _number(status.get("started"))
    if elapsed is None and state in ("starting", "running") and started:
        elapsed = now - started
    fraction = min(1.0, step / total) if total else (1.0 if state == "completed" else None)
    per_epoch = _number(status.get("steps_per_epoch"))
    epoch = step / per_epoch if total and per_epoch and per_epoch > 0 else None
    total_epochs = round(total / per_epoch) if epoch is not None else None
    eta, stale_for = None, 0.0
    if total and state == "running" and step > 0 and elapsed is not None and elapsed > 0 and fraction < 1:
        eta = (total - step) * elapsed / step
        stale_for = max(0.0, now - (_number(last_train.get("time")) or now))
        if stale_for <= STALE_METRICS_S:
            eta = max(0.0, eta - stale_for)
    return Progress(step, total, fraction, epoch, total_epochs, elapsed, eta, stale_for)


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


def read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), (None, None) when the file is missing, or (None, why) when it
    is unreadable: not UTF-8, not JSON, or JSON that is not an object (a record must never crash a reader)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(value, dict):
        return None, f"{path.name} holds a JSON {type(value).__name__}, not an object"
    return value, None


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
        """config.json as a dict, or None when it is missing or unreadable (see `problem`)."""
        return read_json_object(self.config_path)[0]

    def problem(self) -> str | None:
        """Why this record cannot be read (status.json or config.json damaged), or None."""
        for path in (self.status_path, self.config_path):
            why = read_json_object(path)[1]
            if why:
                return why
        return None

    def config(self):
        data = self.config_dict()
        if data is None:
            raise ConfigError(f"run {self.run_id} has no readable config.json")
        return RunConfig.from_dict(data)

    # status
    def status(self) -> dict:
        """status.json; {} when missing; state "unreadable" with the reason when it is damaged."""
        status, why = read_json_object(self.status_path)
        if why:
            return {"state": "unreadable", "error": why}
        return status or {}

    def update_status(self, **changes) -> dict:
        status, why = read_json_object(self.status_path)
        if why:  # keep the damaged file for inspection instead of overwriting what is left of it
            os.replace(self.status_path, self.path / f"status.json.damaged-{int(time.time())}")
        status = dict(status or {})
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
        return read_json_object(self.results_path)[0]

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
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"the runs root {self.root} is a file, not a folder")

    def record(self, run_id: str) -> RunRecord:
        record = RunRecord(self.root, run_id)
        if record.path.resolve().parent != self.root.resolve():
            raise ConfigError(f"run id {run_id!r} does not name a folder inside {self.root}")
        return record

    def config_dict_of(self, run_id: str) -> dict:
        """config.json of an existing run as a dict, not validated (a config of an older version still
        loads); ConfigError saying what is wrong (bad id, no such run, unreadable config)."""
        record = self.record(run_id)
        if not record.exists():
            raise ConfigError(f"run {run_id!r} was not found in {self.root}")
        config = record.config_dict()
        if not isinstance(config, dict):
            raise ConfigError(f"run {run_id} has no readable config.json")
        return config

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
