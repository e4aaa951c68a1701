"""Run records on disk: runs/<run_id>/{config.json, status.json, metrics.jsonl, results.json,
annotations.json, ...}, and what comparing runs needs (best vs last accuracy, groups as mean ± std
across runs at aligned steps, deltas to a baseline).

The trainer is the only writer of a run's metrics and checkpoints; the app and the CLI only read,
except annotations.json (the tags and note), which only the app writes: it is a file of its own so
it never races the trainer's status.json.
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
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    import numpy as np

from .config import RunConfig, config_diff, config_value
from .params import ID_RE, ConfigError, reject_unknown, validate_id

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


def shown_state(status: dict) -> str:
    """The state for run tables: a search's pruned trial reads "pruned", not "cancelled"."""
    state = status.get("state", "?")
    return "pruned" if state == "cancelled" and status.get("pruned") else state


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


GROUP_METRICS = ("many_acc", "medium_acc", "few_acc")  # results.json's group_acc, flattened


def final_metrics(status: dict, results: dict | None) -> dict[str, float | None]:
    """A run's final numbers: results.json's, else what status.json recorded (None where neither has
    one): test_acc, balanced_acc, macro_f1, ece, train_seconds, steps, params, and the many / medium /
    few-shot group accuracies (many_acc, medium_acc, few_acc; None for a balanced training set)."""
    results = results if isinstance(results, dict) else {}
    out = {}
    for key in ("test_acc", "balanced_acc", "macro_f1", "ece", "train_seconds"):
        value = _number(results.get(key))
        out[key] = value if value is not None else _number(status.get(key))
    steps = _number(results.get("steps"))
    out["steps"] = steps if steps is not None else _number(status.get("step"))
    out["params"] = _number(status.get("params"))
    groups = results.get("group_acc") if isinstance(results.get("group_acc"), dict) else {}
    for key in GROUP_METRICS:
        out[key] = _number(groups.get(key.removesuffix("_acc")))
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


# ---- annotations: tags and a note per run (annotations.json, written only by the app) -------------
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,31}$")
MAX_TAGS = 16
MAX_NOTE_CHARS = 2000


def validate_tags(tags: Iterable) -> list[str]:
    """The tags in order without repeats, or ConfigError saying which one is not allowed. A tag: a
    letter or digit, then letters, digits and _ . : = + - (at most 32 characters); at most MAX_TAGS."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Iterable):
        raise ConfigError("tags must be a list of strings")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            raise ConfigError(f"invalid tag {tag!r}: start with a letter or digit, then letters, digits and "
                              "_ . : = + - only, at most 32 characters")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ConfigError(f"{len(out)} tags: at most {MAX_TAGS} per run")
    return out


def parse_tags(text: str) -> list[str]:
    """Tags typed as text ("seed-sweep, baseline" or space separated), validated (see validate_tags)."""
    if not isinstance(text, str):
        raise ConfigError("tags must be text")
    return validate_tags(t for t in re.split(r"[,\s]+", text) if t)


def validate_note(note: Any) -> str:
    if not isinstance(note, str):
        raise ConfigError("the note must be text")
    note = note.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise ConfigError(f"the note has {len(note)} characters: at most {MAX_NOTE_CHARS}")
    return note


@dataclass(frozen=True)
class Annotations:
    """A run's tags and free-text note; `problem` says why annotations.json could not be read (then the
    tags and note read as empty)."""
    tags: tuple[str, ...] = ()
    note: str = ""
    problem: str | None = None

    def to_dict(self) -> dict:
        return {"tags": list(self.tags), "note": self.note}



LOGITS_FILE = "logits.npz"
LOGITS_DTYPES = {"test_logits": "float32", "test_labels": "int64", "val_logits": "float32",
                 "val_labels": "int64", "train_counts": "int64"}


def check_logits_arrays(arrays: dict, where: str) -> None:
    """ConfigError unless `arrays` holds the LOGITS_DTYPES arrays with those dtypes and matching shapes:
    test_logits (N, C), test_labels (N,), val_logits (M, C), val_labels (M,) (M = 0: no validation
    split), train_counts (C,); labels in 0..C-1, finite logits, counts >= 0."""
    import numpy as np

    missing = [key for key in LOGITS_DTYPES if key not in arrays]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    for key, dtype in LOGITS_DTYPES.items():
        if arrays[key].dtype != np.dtype(dtype):
            raise ConfigError(f"{where}: {key} is {arrays[key].dtype}, expected {dtype}")
    counts = arrays["train_counts"]
    if counts.ndim != 1 or counts.shape[0] < 2 or (counts < 0).any():
        raise ConfigError(f"{where}: train_counts must be one count >= 0 per class, got shape {counts.shape}")
    num_classes = counts.shape[0]
    for split in ("test", "val"):
        logits, labels = arrays[f"{split}_logits"], arrays[f"{split}_labels"]
        if logits.ndim != 2 or logits.shape[1] != num_classes or labels.shape != logits.shape[:1]:
            raise ConfigError(f"{where}: {split}_logits {logits.shape} and {split}_labels {labels.shape} do not "
                              f"match: expected (N, {num_classes}) and (N,)")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ConfigError(f"{where}: {split}_labels must be class indices 0..{num_classes - 1}")
        if not np.isfinite(logits).all():
            raise ConfigError(f"{where}: {split}_logits hold NaN or infinite values")
    if arrays["test_labels"].size == 0:
        raise ConfigError(f"{where}: no test logits")


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
    @property
    def annotations_path(self) -> Path: return self.path / "annotations.json"
    @property
    def logits_path(self) -> Path: return self.path / LOGITS_FILE

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

    # saved logits: the final model's on the test and validation splits (threshold moving, re-scoring)
    def write_logits(self, **arrays) -> None:
        """Write logits.npz atomically: the LOGITS_DTYPES arrays, converted to those dtypes and checked."""
        import io

        import numpy as np

        reject_unknown(arrays, LOGITS_DTYPES, "logits.npz", "array(s)")
        arrays = {key: np.ascontiguousarray(arrays[key], dtype=dtype) for key, dtype in LOGITS_DTYPES.items()}
        check_logits_arrays(arrays, f"run {self.run_id}: logits to save")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.logits_path, buffer.getvalue())

    def read_logits(self) -> dict[str, np.ndarray] | None:
        """logits.npz as {name: array} (see LOGITS_DTYPES); None when the run saved none (it has not
        finished, or predates saved logits); ConfigError saying what is wrong when it is damaged."""
        import numpy as np

        path = self.logits_path
        if not path.is_file():
            return None
        where = f"{path.name} of run {self.run_id}"
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises many kinds; a reader must not crash
            raise ConfigError(f"{where} is unreadable ({type(exc).__name__}: {exc}); delete it, or train the "
                              "run again to save its logits") from None
        check_logits_arrays(arrays, where)
        return arrays

    # annotations: written by the app only, never by the trainer (so it never races status.json)
    def annotations(self) -> Annotations:
        """The run's tags and note; empty ones, with `problem` set, when annotations.json is damaged."""
        data, why = read_json_object(self.annotations_path)
        if why:
            return Annotations(problem=why)
        if data is None:
            return Annotations()
        try:
            return Annotations(tuple(validate_tags(data.get("tags", []))), validate_note(data.get("note", "")))
        except ConfigError as exc:
            return Annotations(problem=f"{self.annotations_path.name} is invalid: {exc}")

    def write_annotations(self, tags: Iterable | None = None, note: str | None = None) -> Annotations:
        """Replace the tags and/or the note (None keeps the current one); ConfigError for invalid ones.
        A damaged annotations.json is overwritten by the new values."""
        if not self.path.is_dir():
            raise ConfigError(f"run {self.run_id} not found")
        current = self.annotations()
        new = Annotations(tuple(validate_tags(current.tags if tags is None else tags)),
                          validate_note(current.note if note is None else note))
        atomic_write_json(self.annotations_path, new.to_dict())
        return new

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



# ---- comparing runs: best vs last, groups (mean ± std across runs), deltas to a baseline -----------

def val_accuracy_summary(status: dict, val_accs: Iterable = ()) -> dict[str, float | None]:
    """{"best_val_acc", "last_val_acc"}: the best validation accuracy (see best_val_accuracy) and the
    last one written (the last valid value of the metric rows); None where there is none."""
    found = [v for v in map(_accuracy, val_accs) if v is not None]
    return {"best_val_acc": best_val_accuracy(status, found), "last_val_acc": found[-1] if found else None}


def mean_std(values: Iterable) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the numeric values (None, bool and NaN left out); the std
    is None for fewer than two values, the mean None for none."""
    xs = [v for v in map(_number, values) if v is not None]
    n = len(xs)
    if not n:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    return mean, (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5, n


@dataclass
class AlignedCurve:
    """The mean and sample std across runs of one metric at the steps they share (n runs at each)."""
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray  # 0.0 where only one run has the step
    n: np.ndarray


def _floats(values) -> np.ndarray:
    import numpy as np

    try:
        return np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        return np.array([np.nan if v is None else v for v in map(_number, values)], dtype=float)


def aggregate_curves(curves: Iterable[tuple[Iterable, Iterable]], min_runs: int | None = None) -> AlignedCurve:
    """Align the runs' (steps, values) series on their step values and take the mean and the sample std
    across runs at each step. A step is kept where at least `min_runs` runs have a valid value there
    (default: all of them, so a run that stopped early does not make the mean jump). NaN, inf and None
    are missing values; a step written twice in one run (a resume) counts its last value."""
    import numpy as np  # here, not at the top: the supervisor and the CLI's quick commands never need it

    steps_, values_ = [], []
    count = 0
    for steps, values in curves:
        count += 1
        s, v = _floats(steps), _floats(values)
        m = min(len(s), len(v))
        s, v = s[:m], v[:m]
        ok = np.isfinite(s) & np.isfinite(v)
        s, v = s[ok], v[ok]
        # the last value of each step: unique over the reversed rows keeps the first = the last written
        _, first = np.unique(s[::-1], return_index=True)
        keep = len(s) - 1 - first
        steps_.append(s[keep])
        values_.append(v[keep])
    need = count if min_runs is None else max(1, int(min_runs))
    if not count or not sum(map(len, steps_)):
        return AlignedCurve(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int))
    step, value = np.concatenate(steps_), np.concatenate(values_)
    steps, inverse, n = np.unique(step, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=value) / n
    dev2 = np.bincount(inverse, weights=(value - mean[inverse]) ** 2)
    std = np.where(n > 1, np.sqrt(dev2 / np.maximum(n - 1, 1)), 0.0)
    sel = n >= need
    return AlignedCurve(steps[sel], mean[sel], std[sel], n[sel])


def group_by_tag(tags_by_run: dict[str, Iterable[str]], only: Iterable[str] | None = None,
                 untagged: str = "(no tag)") -> dict[str, list[str]]:
    """{tag: run ids carrying it} (a run with several tags is in each of their groups), the runs with
    none of them under `untagged`. `only`: the tags to group by (default: every tag found)."""
    wanted = None if only is None else list(only)
    groups: dict[str, list[str]] = {}
    rest = []
    for rid, tags in tags_by_run.items():
        hit = [t for t in tags if wanted is None or t in wanted]
        for tag in hit:
            groups.setdefault(tag, []).append(rid)
        if not hit:
            rest.append(rid)
    order = wanted if wanted is not None else sorted(groups)
    out = {tag: groups[tag] for tag in order if tag in groups}
    if rest:
        out[untagged] = rest
    return out


SEED_KEYS = ("seed", "name")  # what differs between repeats of one experiment


def group_by_config(configs: dict[str, dict], ignore: Iterable[str] = SEED_KEYS) -> dict[str, list[str]]:
    """Runs whose configs are equal except for `ignore` (the seed and the name), as {label: run ids}.
    The label names the settings in which the groups differ ("lr=0.1, epochs=2"), or "all runs"."""
    ignore = set(ignore)
    keyed: dict[str, list[str]] = {}
    reps: dict[str, dict] = {}
    for rid, conf in configs.items():
        rest = {k: v for k, v in conf.items() if k not in ignore}
        key = json.dumps(rest, sort_keys=True, default=str)
        keyed.setdefault(key, []).append(rid)
        reps.setdefault(key, rest)
    if len(keyed) == 1:
        return {"all runs": next(iter(keyed.values()))}
    differing: list[str] = []
    first = next(iter(reps.values()))
    for rep in reps.values():
        differing += [k for k in config_diff(first, rep) if k not in differing]
    out: dict[str, list[str]] = {}
    for i, (key, ids) in enumerate(keyed.items(), 1):
        parts = [f"{k}={json.dumps(config_value(reps[key], k), sort_keys=True)}" for k in sorted(differing)[:3]]
        label = ", ".join(parts) + (" …" if len(differing) > 3 else "") if parts else f"group {i}"
        out[label if label not in out else f"{label} #{i}"] = ids
    return out


def summarize_groups(groups: dict[str, list[str]], metrics_by_run: dict[str, dict],
                     keys: Iterable[str]) -> list[dict]:
    """One row per group: {"group", "n", "runs", key: (mean, std, n)} for each metric key, across the
    group's runs (see mean_std)."""
    keys = list(keys)
    rows = []
    for name, ids in groups.items():
        ids = [rid for rid in ids if rid in metrics_by_run]
        row: dict[str, Any] = {"group": name, "n": len(ids), "runs": ids}
        for key in keys:
            row[key] = mean_std(metrics_by_run[rid].get(key) for rid in ids)
        rows.append(row)
    return rows


def deltas_to_baseline(metrics_by_run: dict[str, dict], baseline: str, keys: Iterable[str]) -> dict[str, dict]:
    """{run id: {key: value - the baseline's value}} (None where either is missing)."""
    base = metrics_by_run.get(baseline) or {}
    out = {}
    for rid, metrics in metrics_by_run.items():
        out[rid] = {}
        for key in keys:
            a, b = _number(metrics.get(key)), _number(base.get(key))
            out[rid][key] = None if a is None or b is None else a - b
    return out
