"""Live metrics of a run for the pages: incremental reads, cached per browser session.

Each session keeps one `LiveMetrics` per (runs root, run id) in `st.session_state`, so a refresh
parses only the bytes appended to metrics.jsonl since the previous refresh. Rows are kept as
column lists (cheap to append, cheap to turn into a DataFrame); the DataFrames are rebuilt only
when new rows arrived, and `downsample` thins them for plotting.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from cifar_core.runs import FINAL_STATES, UNFINISHED_STATES, MetricsReader, RunRecord

TRAIN_COLS = ("step", "epoch", "train_loss", "train_acc", "lr", "grad_norm", "images_per_s",
              "elapsed", "time")
EVAL_COLS = ("step", "epoch", "val_loss", "val_acc", "elapsed", "time")
MAX_POINTS = 2000          # per plotted series
MAX_CACHED_RUNS = 64       # readers kept per session (Compare shows up to 50 runs at once)
_SESSION_KEY = "_live_metrics_cache"


class RunDeleted(Exception):
    """The run's folder no longer exists (deleted while it was being viewed)."""

    def __init__(self, run_id: str):
        super().__init__(f"Run {run_id} was deleted: its folder is no longer in the runs root.")
        self.run_id = run_id


def _num(value) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class LiveMetrics:
    """Incrementally-read train/eval rows of one run's metrics.jsonl."""

    path: Path
    reader: MetricsReader = None  # type: ignore[assignment]
    train: dict = field(default_factory=lambda: {c: [] for c in TRAIN_COLS})
    eval: dict = field(default_factory=lambda: {c: [] for c in EVAL_COLS})
    version: int = 0           # bumps whenever rows were added or reset
    _inode: int | None = None
    _frames: tuple | None = None
    _frames_version: int = -1

    def __post_init__(self):
        self.path = Path(self.path)
        if self.reader is None:
            self.reader = MetricsReader(self.path)

    @property
    def bad_lines(self) -> int:
        return self.reader.bad_lines

    @property
    def n_rows(self) -> int:
        return len(self.train["step"]) + len(self.eval["step"])

    def _reset(self) -> None:
        self.reader = MetricsReader(self.path)
        self.train = {c: [] for c in TRAIN_COLS}
        self.eval = {c: [] for c in EVAL_COLS}
        self.version += 1

    def refresh(self) -> int:
        """Read what was appended since the last call; returns the number of new rows."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            # metrics.jsonl replaced (a resume rewrites it atomically) or removed: read it afresh
            if self._inode is not None:
                self._reset()
            self._inode = inode
        before = self.reader.offset
        new = self.reader.read_new()
        if self.reader.offset < before:  # the file shrank: the reader started again from 0
            self.train = {c: [] for c in TRAIN_COLS}
            self.eval = {c: [] for c in EVAL_COLS}
            self.version += 1
        # the rows live on as columns only (one copy per run, not two)
        self.reader.rows = []
        for row in new:
            kind = row.get("kind")
            if kind == "train":
                cols = self.train
            elif kind == "eval":
                cols = self.eval
            else:
                continue
            for name, values in cols.items():
                values.append(_num(row.get(name)))
        if new:
            self.version += 1
        return len(new)

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, eval) DataFrames at full resolution, rebuilt only when rows were added."""
        if self._frames is None or self._frames_version != self.version:
            train = pd.DataFrame({c: np.asarray(v, dtype=float) for c, v in self.train.items()})
            evl = pd.DataFrame({c: np.asarray(v, dtype=float) for c, v in self.eval.items()})
            self._frames = (train, evl)
            self._frames_version = self.version
        return self._frames

    def latest(self, kind: str = "train") -> dict:
        cols = self.train if kind == "train" else self.eval
        if not cols["step"]:
            return {}
        return {name: values[-1] for name, values in cols.items()}


def thin_index(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `max_points` of n rows: every k-th row, always keeping the last one."""
    if n <= max_points:
        return np.arange(n)
    k = math.ceil(n / max_points)
    idx = np.arange(0, n, k)
    if idx[-1] != n - 1:
        idx = np.append(idx[:-1] if len(idx) >= max_points else idx, n - 1)
    return idx


def downsample(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most `max_points` rows of df (see thin_index)."""
    return df if len(df) <= max_points else df.iloc[thin_index(len(df), max_points)]


def _cache() -> OrderedDict:
    cache = st.session_state.get(_SESSION_KEY)
    if not isinstance(cache, OrderedDict):
        cache = OrderedDict()
        st.session_state[_SESSION_KEY] = cache
    return cache


def _key(record: RunRecord) -> tuple[str, str]:
    return (str(record.root.resolve()), record.run_id)


def forget(record: RunRecord) -> None:
    """Drop a run's cached reader (after a delete)."""
    _cache().pop(_key(record), None)


def live_metrics(record: RunRecord) -> LiveMetrics:
    """The session's LiveMetrics of this run, refreshed with whatever was appended.

    Raises RunDeleted when the run folder is gone.
    """
    cache = _cache()
    key = _key(record)
    if not record.path.is_dir():
        cache.pop(key, None)
        raise RunDeleted(record.run_id)
    live = cache.get(key)
    if live is None or live.path != record.metrics_path:
        live = LiveMetrics(record.metrics_path)
        cache[key] = live
    cache.move_to_end(key)
    while len(cache) > MAX_CACHED_RUNS:
        cache.popitem(last=False)
    live.refresh()
    return live


def run_frames(record: RunRecord) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(train rows, eval rows, unreadable lines skipped) of a run, read incrementally."""
    live = live_metrics(record)
    train, evl = live.frames()
    return train, evl, live.bad_lines


# ---- run summaries for tables and pickers ------------------------------------------------------
ACTIVE = UNFINISHED_STATES
FINISHED = FINAL_STATES
_CONFIG_CACHE: dict[tuple, dict] = {}


def config_summary(record: RunRecord) -> dict:
    """{"config": dict | None, "model": str, "tricks": str, "error": str | None} of a run's config.json,
    cached by file modification time."""
    try:
        st_ = record.config_path.stat()
        key = (str(record.config_path), st_.st_mtime_ns, st_.st_size)
    except FileNotFoundError:
        return {"config": None, "model": "?", "tricks": "", "name": "",
                "error": "config.json is missing"}
    hit = _CONFIG_CACHE.get(key)
    if hit is not None:
        return hit
    data = record.config_dict()
    out = {"config": data if isinstance(data, dict) else None, "model": "?", "tricks": "", "name": "",
           "error": None}
    if not isinstance(data, dict):
        out["error"] = "config.json is unreadable (not valid JSON)"
    else:
        out["model"] = str(data.get("model", "?"))
        out["name"] = str(data.get("name") or "")
        try:
            from cifar_core.config import RunConfig
            out["tricks"] = ", ".join(RunConfig.from_dict(data, validate=False).key_tricks())
        except Exception as exc:  # an older or hand-edited config: show the rest anyway
            out["tricks"] = "?"
            out["error"] = f"config.json does not match this version: {exc}"
    if len(_CONFIG_CACHE) > 2000:
        _CONFIG_CACHE.clear()
    _CONFIG_CACHE[key] = out
    return out


def run_label(run_id: str, summary: dict | None = None) -> str:
    """A short unique label: the run's name (or model) and the id's random suffix."""
    summary = summary or {}
    base = summary.get("name") or summary.get("model") or ""
    suffix = run_id.rsplit("-", 1)[-1] if "-" in run_id else run_id
    return f"{base} · {suffix}" if base and base != "?" else run_id


def run_summaries(store) -> list[dict]:
    """One dict per run (newest first): run_id, record, status, state, config summary fields."""
    out = []
    for record in store.records():
        status = record.status()
        conf = config_summary(record)
        created = status.get("created")
        if not isinstance(created, (int, float)):
            try:
                created = record.config_path.stat().st_mtime
            except OSError:
                created = 0.0
        out.append({"run_id": record.run_id, "record": record, "status": status,
                    "state": status.get("state", "unknown") if status else "unknown",
                    "created": float(created), **conf})
    out.sort(key=lambda s: (s["created"], s["run_id"]), reverse=True)
    return out
