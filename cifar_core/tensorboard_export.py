"""A run's metrics as TensorBoard event files: <run>/tensorboard/events.out.tfevents.cifar-lab.

One event file per run, always rebuilt whole from metrics.jsonl and then (while training) appended to,
so that no step ever appears twice:

- `convert_run(store, run_id)` (the `python -m cifar_core tensorboard RUN...` command) writes the file
  from metrics.jsonl, results.json and config.json into a hidden temp file in the folder and renames it
  over the old one (atomic: a re-run replaces, never adds). Damaged metric lines are skipped and counted.
- `live_events(record)` (the trainer, at the start of every attempt, after a resume has dropped the
  metric lines past its checkpoint) does the same and keeps the file open: each new metric row is then
  appended as it is written to metrics.jsonl, and the test metrics at the end. Without the `tensorboard`
  package (or with CIFAR_LAB_TENSORBOARD=0) it logs one line and does nothing.

Tags: train/loss, train/acc, train/lr, train/grad_norm, train/images_per_s (and an objective's own
metrics, train/<name>) per train row; val/loss, val/acc per evaluation (test/… when the run evaluates on
the test split); final/test_acc, final/test_loss, final/balanced_acc, final/macro_f1 from results.json.
The config goes in as hparams (the HParams dashboard) and as a text table, the results as a text table.
Wall times are the run's start plus each row's `elapsed` (training time, resumes included), so
TensorBoard's relative-time axis shows training time. Open with `tensorboard --logdir <runs-root>`: each
run is a sub-folder, so runs appear side by side.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .params import ConfigError
from .runs import RunRecord, RunStore

EVENTS_DIR = "tensorboard"  # in the run folder
EVENTS_FILE = "events.out.tfevents.cifar-lab"  # TensorBoard reads every file whose name holds "tfevents"
PARTIAL_PREFIX = ".partial-"  # a file being written (its name has no "tfevents": TensorBoard skips it)
STALE_PARTIAL_S = 600.0  # leftovers of a killed writer older than this are removed
DISABLE_ENV = "CIFAR_LAB_TENSORBOARD"  # "0": the trainer writes no events
TRAIN_TAGS = {"train_loss": "loss", "train_acc": "acc"}  # other train keys keep their name
EVAL_TAGS = {"val_loss": "loss", "val_acc": "acc"}
NOT_SCALARS = frozenset({"step", "epoch", "elapsed", "time", "first_step"})
FINAL_METRICS = ("test_acc", "test_loss", "balanced_acc", "macro_f1", "ece")
ACTIVE_STATES = ("starting", "running")  # the trainer owns the event file then


class TensorBoardUnavailable(ConfigError):
    """The tensorboard package is not installed."""


class RunBeingTrained(ConfigError):
    """The run trains now: its trainer writes the events live."""


def events_dir(record: RunRecord) -> Path:
    return record.path / EVENTS_DIR


def open_command(root: str | Path) -> str:
    return f"tensorboard --logdir {shlex.quote(str(root))}"


def tensorboard_modules():
    """(RecordWriter, Event, summary): TensorBoard's record writer and event proto and torch's summary
    builders; TensorBoardUnavailable when the tensorboard package is missing."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from torch.utils.tensorboard import RecordWriter
        from torch.utils.tensorboard import summary
    except ImportError as exc:
        raise TensorBoardUnavailable(f"the tensorboard package is not installed ({exc}): "
                                     "pip install tensorboard") from None
    return RecordWriter, Event, summary


# ---- what goes in: metric rows → (tag, value) pairs ------------------------------------------------

def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def row_scalars(row: dict) -> list[tuple[str, float]]:
    """The (tag, value) pairs of one metrics.jsonl row (train or eval); [] for other kinds."""
    kind = row.get("kind")
    if kind == "train":
        prefix, names = "train", TRAIN_TAGS
    elif kind == "eval":
        split = row.get("eval_split")
        prefix, names = (split if split in ("val", "test") else "val"), EVAL_TAGS
    else:
        return []
    out = []
    for key, value in row.items():
        value = _number(value)
        if key in NOT_SCALARS or value is None:
            continue
        out.append((f"{prefix}/{names.get(key, key)}", value))
    return out


def usable_row(row: dict) -> bool:
    """A train or eval row with an integer step (others are skipped as damaged)."""
    step = row.get("step")
    return row.get("kind") in ("train", "eval") and isinstance(step, int) and not isinstance(step, bool) \
        and step >= 0


@dataclass
class MetricRows:
    """metrics.jsonl read for export: the usable rows and how many lines were skipped (not JSON, not an
    object, no kind/step, or a half-written last line)."""
    rows: list[dict]
    skipped: int
    found: bool  # metrics.jsonl exists

    @classmethod
    def read(cls, record: RunRecord) -> "MetricRows":
        reader = record.metrics_reader()
        reader.read_new()
        try:
            size = record.metrics_path.stat().st_size
        except FileNotFoundError:
            return cls([], 0, False)
        unfinished = 1 if reader.offset < size and record.metrics_path.read_bytes()[reader.offset:].strip() else 0
        rows = [r for r in reader.rows if usable_row(r)]
        return cls(rows, reader.bad_lines + unfinished + len(reader.rows) - len(rows), True)


def run_start(rows: list[dict]) -> float | None:
    """The wall time the run's elapsed clock counts from: time - elapsed of its first timed row."""
    for row in rows:
        now, elapsed = _number(row.get("time")), _number(row.get("elapsed"))
        if now is not None and elapsed is not None:
            return now - elapsed
    return None


def hparams_of(config: dict) -> dict:
    """The config as hparams: numbers, strings and booleans as they are, lists and dicts as JSON."""
    out = {}
    for key, value in sorted(config.items()):
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def markdown_table(pairs: dict, header: tuple[str, str] = ("key", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in pairs.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"| {key} | `{text.replace('|', '/')}` |")
    return "\n".join(lines)


# ---- the event file ------------------------------------------------------------------------------

class EventFile:
    """The run's one event file, written into a hidden temp file in <run>/tensorboard/ and, on
    `publish()`, renamed over EVENTS_FILE (so readers see the old file or the whole new one). After
    that, further events go on being appended to the published file (the handle stays open)."""

    def __init__(self, record: RunRecord, config: dict | None):
        self.RecordWriter, self.Event, self.summary = tensorboard_modules()
        self.record, self.config = record, config or {}
        self.folder = events_dir(record)
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            self.folder.unlink()  # ours to own: never write through a link, never fail on a stray file
        self.folder.mkdir(parents=True, exist_ok=True)
        self.partial = self.folder / f"{PARTIAL_PREFIX}{os.getpid()}-{time.time_ns()}"
        self.fh = open(self.partial, "wb")
        self.writer = self.RecordWriter(self.fh)
        self.start: float | None = None
        self.scalars = 0
        self.published = False
        self.write_event(self.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write_event(self, event) -> None:
        self.writer.write(event.SerializeToString())

    def wall_time(self, row: dict) -> float:
        elapsed, now = _number(row.get("elapsed")), _number(row.get("time"))
        if self.start is None and now is not None and elapsed is not None:
            self.start = now - elapsed
        if self.start is not None and elapsed is not None:
            return self.start + elapsed
        return now if now is not None else time.time()

    def add_summary(self, summary, step: int, wall_time: float) -> None:
        self.write_event(self.Event(wall_time=wall_time, step=step, summary=summary))

    def add_row(self, row: dict) -> None:
        if not usable_row(row):
            return
        wall = self.wall_time(row)
        for tag, value in row_scalars(row):
            self.add_summary(self.summary.scalar(tag, value), row["step"], wall)
            self.scalars += 1

    def add_config(self, wall_time: float) -> None:
        if not self.config:
            return
        hparams = hparams_of(self.config)
        for part in self.summary.hparams(hparams, {f"final/{name}": 0.0 for name in FINAL_METRICS}):
            self.add_summary(part, 0, wall_time)
        self.add_summary(self.summary.text("config", markdown_table(hparams)), 0, wall_time)

    def add_results(self, results: dict | None) -> bool:
        """results.json's test metrics as final/… scalars (at its last step) and a text table."""
        if not isinstance(results, dict):
            return False
        steps = results.get("steps")
        step = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else 0
        seconds = _number(results.get("train_seconds"))
        wall = self.start + seconds if self.start is not None and seconds is not None else time.time()
        found = {name: _number(results.get(name)) for name in FINAL_METRICS}
        found = {name: value for name, value in found.items() if value is not None and math.isfinite(value)}
        for name, value in found.items():
            self.add_summary(self.summary.scalar(f"final/{name}", value), step, wall)
            self.scalars += 1
        shown = {k: results[k] for k in (*FINAL_METRICS, "steps", "total_steps", "train_seconds",
                                         "evaluated_with", "test_images") if k in results}
        if isinstance(results.get("per_class_acc"), dict):
            shown.update({f"acc {name}": acc for name, acc in results["per_class_acc"].items()})
        self.add_summary(self.summary.text("results", markdown_table(shown)), step, wall)
        return bool(found)

    def flush(self) -> None:
        self.fh.flush()

    def publish(self) -> Path:
        """Make the written events the run's event file (atomically), and remove any other event files
        in the folder (older writers' files, leftovers of a killed one)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        target = self.folder / EVENTS_FILE
        os.replace(self.partial, target)
        self.published = True
        now = time.time()
        for path in self.folder.iterdir():
            if path == target or path.is_dir():
                continue
            stale = path.name.startswith(PARTIAL_PREFIX) and now - path.stat().st_mtime > STALE_PARTIAL_S
            if "tfevents" in path.name or stale:
                path.unlink(missing_ok=True)
        return target

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        if not self.published:
            self.partial.unlink(missing_ok=True)


def write_history(record: RunRecord, rows: list[dict]) -> EventFile:
    """A new (unpublished) event file with the config and `rows`."""
    events = EventFile(record, record.config_dict())
    events.start = run_start(rows)
    created = _number(record.status().get("created"))
    events.add_config(events.start if events.start is not None else created or time.time())
    for row in rows:
        events.add_row(row)
    return events


# ---- the conversion (the `tensorboard` command) ---------------------------------------------------

@dataclass
class Conversion:
    """What `convert_run` wrote."""
    run_id: str
    path: Path
    train_rows: int
    eval_rows: int
    scalars: int
    skipped_lines: int
    final_metrics: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.train_rows} train rows", f"{self.eval_rows} evaluations"]
        if self.final_metrics:
            parts.append("final test metrics")
        line = f"{self.run_id}: {self.scalars} scalars ({', '.join(parts)}) → {self.path}"
        if self.skipped_lines:
            line += f"; skipped {self.skipped_lines} damaged metrics.jsonl line{'s' * (self.skipped_lines > 1)}"
        return "; ".join([line, *self.notes])


def convert_run(store: RunStore, run_id: str) -> Conversion:
    """Rewrite <run>/tensorboard/ from the run's record. ConfigError for a bad id or a missing run,
    RunBeingTrained while it trains (its trainer writes the events live), TensorBoardUnavailable."""
    record = store.record(run_id)  # ConfigError for a bad or escaping id
    if not record.exists():
        raise ConfigError(f"run {run_id!r} was not found in {store.root}")
    state = record.status().get("state")
    if state in ACTIVE_STATES:
        raise RunBeingTrained(f"run {run_id} is {state}: its trainer writes the TensorBoard events live "
                              "(convert it after it stops)")
    tensorboard_modules()
    metrics = MetricRows.read(record)
    notes = []
    if not metrics.found:
        notes.append("no metrics.jsonl yet")
    problem = record.problem()
    if problem:
        notes.append(problem)
    events = write_history(record, metrics.rows)
    try:
        final = events.add_results(record.results())
        path = events.publish()
    finally:
        events.close()
    kinds = [r["kind"] for r in metrics.rows]
    return Conversion(run_id, path, kinds.count("train"), kinds.count("eval"), events.scalars, metrics.skipped,
                      final, notes)


# ---- live writing (the trainer) -------------------------------------------------------------------

def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class NoEvents:
    """What the trainer holds when it writes no events."""

    def add(self, row: dict) -> None:
        pass

    def add_results(self, results: dict) -> None:
        pass

    def close(self) -> None:
        pass


class LiveEvents(NoEvents):
    """The trainer's event file: the history rebuilt from metrics.jsonl, then each new row as it is
    written. A write error stops the events (logged once), never the training."""

    def __init__(self, events: EventFile, log: Callable[[str], None]):
        self.events, self.log = events, log

    def _guarded(self, write: Callable[[], None]) -> None:
        if self.events is None:
            return
        try:
            write()
            self.events.flush()
        except Exception as exc:  # disk full, the folder removed under us, ...: the training goes on
            self.log(f"tensorboard: events stopped ({type(exc).__name__}: {exc}); "
                     f"rebuild them later with: python -m cifar_core tensorboard {self.events.record.run_id}")
            self.close()

    def add(self, row: dict) -> None:
        self._guarded(lambda: self.events.add_row(row))

    def add_results(self, results: dict) -> None:
        self._guarded(lambda: self.events.add_results(results))

    def close(self) -> None:
        if self.events is not None:
            try:
                self.events.close()
            except OSError:
                pass
            self.events = None


def live_events(record: RunRecord, log: Callable[[str], None] = _stderr_line) -> NoEvents:
    """The trainer's event writer: <run>/tensorboard/ rebuilt from metrics.jsonl as it is now (so a
    resumed run never repeats a step), ready for the rows to come; NoEvents (after one log line) when
    the tensorboard package is missing, CIFAR_LAB_TENSORBOARD=0, or the folder cannot be written."""
    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return NoEvents()
    events = None
    try:
        events = write_history(record, MetricRows.read(record).rows)
        events.publish()
    except TensorBoardUnavailable:
        log("tensorboard: not installed, no event files written (pip install tensorboard; then "
            f"python -m cifar_core tensorboard {record.run_id} converts the metrics)")
        return NoEvents()
    except Exception as exc:  # an unwritable folder (or a bad config value) must not stop the training
        log(f"tensorboard: no event files written ({type(exc).__name__}: {exc})")
        if events is not None:
            events.close()
        return NoEvents()
    return LiveEvents(events, log)
