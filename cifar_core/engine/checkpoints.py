"""The one reader and writer of run checkpoints (`last.pt`, `best.pt`).

A checkpoint holds what resuming needs (model, optimizer, EMA, scaler, lookahead, step, timing, the
global RNG states) and what evaluating needs without the data: the weights the run is evaluated with
(EMA when kept), the fitted normalizers (ZCA's mean and matrix) and the test-time views. Export, distillation and resume
all read through `read_checkpoint`; files load with ``weights_only=True``.

Which file: `last.pt` first, and `best.pt` when `last.pt` is missing or damaged (the checkpoint then
says why, `fallback`). A finished run is represented by the weights its test report measured,
`last.pt`. Resume can fall back too: `best.pt` holds the whole training state at its step, and
every batch derives from (seed, epoch/step), so training on from it is exact.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from ..augment import AugmentChain
from ..models import create_model
from ..params import ConfigError
from ..runs import RunRecord, RunStore, atomic_write_bytes

__all__ = ["CHECKPOINT_FORMAT", "RESUME_ORDER", "FINISHED_ORDER", "CheckpointError", "Checkpoint",
           "write_checkpoint", "read_checkpoint", "normalizer_states", "restore_normalizers",
           "has_finished_checkpoint", "finished_source", "weights_sources"]

CHECKPOINT_FORMAT = 3  # 1: before normalizers/tta/eval_weights were saved; 2: before the RNG states
RESUME_ORDER = ("last", "best")
FINISHED_ORDER = ("last", "best")


class CheckpointError(ConfigError):
    """No usable checkpoint: the message names each file tried and why it could not be used."""


def normalizer_states(chain: AugmentChain) -> list[dict]:
    """The chain's deterministic normalizing steps as {name, params, state} (state: the fit, if any)."""
    out = []
    for spec, op in zip(chain.specs, chain.ops):
        if getattr(op, "normalizes", False):
            state = op.state_dict() if getattr(op, "needs_fit", False) else None
            out.append({"name": spec["name"], "params": dict(spec["params"]), "state": state})
    return out


def restore_normalizers(entries: list[dict]) -> list:
    """Ops from `normalizer_states` output, fitted again from their saved state (no data needed)."""
    chain = AugmentChain([{"name": e["name"], "params": e["params"]} for e in entries])
    for entry, op in zip(entries, chain.ops):
        if entry.get("state") is not None:
            op.load_state_dict(entry["state"])
    return list(chain.ops)


def write_checkpoint(record: RunRecord, which: str, state: dict) -> Path:
    """Write `state` (plus the format number) atomically as the run's `which`.pt."""
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    path = record.checkpoint_path(which)
    atomic_write_bytes(path, buffer.getvalue())
    return path


@dataclass
class Checkpoint:
    which: str              # "last" or "best"
    path: Path
    data: dict
    fallback: str | None = None  # why a preferred file was skipped, when one was

    @property
    def step(self) -> int:
        return int(self.data.get("step", 0))

    @property
    def model_name(self) -> str:
        return self.data["model_name"]

    @property
    def model_params(self) -> dict:
        return dict(self.data.get("model_params") or {})

    def evaluation_weights(self) -> tuple[dict, str]:
        """(state dict, "ema" | "model"): the weights the run was evaluated with."""
        ema = self.data.get("ema")
        if ema:
            # AveragedModel keeps the averaged network under "module." plus an n_averaged counter
            return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}, "ema"
        return self.data["model"], "model"

    def build_model(self) -> torch.nn.Module:
        """The network with its evaluation weights, in eval mode, on the CPU."""
        model = create_model(self.model_name, self.model_params)
        state, _ = self.evaluation_weights()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: the weights do not fit {self.model_name}: {exc}") from None
        return model.eval()

    def normalizers(self, augment: list | None = None) -> list:
        """Fitted evaluation normalizers. Checkpoints from before format 2 saved none: their chain's
        normalizers are rebuilt from `augment` when none needs a fit, else CheckpointError."""
        if self.data.get("normalizers") is not None:
            return restore_normalizers(self.data["normalizers"])
        ops = [op for op in AugmentChain(augment or []).ops if getattr(op, "normalizes", False)]
        if any(getattr(op, "needs_fit", False) for op in ops):
            raise CheckpointError(f"{self.path} was written before checkpoints kept the fitted ZCA "
                                  "whitening; train the run again to export or distil from it")
        return ops

    def tta(self, flip: bool = False, translate: bool = False) -> tuple[bool, bool]:
        """(flip, translate) views the run evaluated with (the given defaults for old checkpoints)."""
        saved = self.data.get("tta")
        if saved is None:
            return flip, translate
        return bool(saved.get("flip")), bool(saved.get("translate"))


def first_line(exc: Exception) -> str:
    """An exception's message cut to its first line (torch's unpickling errors run to a page of advice,
    part of it, weights_only=False, wrong for files we did not write)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _load(path: Path, map_location) -> dict:
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError("not a checkpoint of this lab (no model weights inside)")
    return data


def read_checkpoint(record: RunRecord, order: tuple[str, ...] = FINISHED_ORDER,
                    map_location="cpu") -> Checkpoint:
    """The first usable checkpoint of `order`; CheckpointError naming every file tried otherwise."""
    problems = []
    for which in order:
        path = record.checkpoint_path(which)
        if not path.exists():
            problems.append(f"{path} does not exist")
            continue
        try:
            data = _load(path, map_location)
        except Exception as exc:  # truncated, foreign or corrupt file: say which and why
            problems.append(f"{path} is unreadable ({type(exc).__name__}: {first_line(exc)})")
            continue
        return Checkpoint(which, path, data, fallback="; ".join(problems) or None)
    raise CheckpointError(f"run {record.run_id}: no usable checkpoint: " + "; ".join(problems))


def has_finished_checkpoint(record: RunRecord) -> bool:
    """Whether a file the reader would try for a finished run exists (existence only: listings and form
    checks stay cheap; reading it names a damaged file)."""
    return any(record.checkpoint_path(which).exists() for which in FINISHED_ORDER)


def finished_source(store: RunStore, run_id: str, field: str, own: str, use: str,
                    this_run: str | None = None) -> RunRecord:
    """The record of a completed run with weights that config field `field` names (a teacher, an init
    run, a feature run), or ConfigError saying why it cannot serve: `this_run` itself (`own`: what a run
    cannot be of itself), missing, unfinished (`use`: what is done only from a finished run), no
    checkpoint."""
    record = store.record(run_id)  # ConfigError for ids that are not plain names
    if run_id == this_run:
        raise ConfigError(f"{field} {run_id}: a run cannot {own}")
    if not record.exists():
        raise ConfigError(f"{field} {run_id}: no such run in {store.root} (it must be a completed run in the "
                          "same runs folder)")
    state = record.state()
    if state != "completed":
        raise ConfigError(f"{field} {run_id} is {state}, not completed: {use} only from a finished run")
    if not has_finished_checkpoint(record):
        files = " or ".join(f"{which}.pt" for which in FINISHED_ORDER)
        raise ConfigError(f"{field} {run_id} has no checkpoint ({files}) to load")
    return record


def weights_sources(store: RunStore) -> list[tuple[RunRecord, dict, dict]]:
    """(record, status, config) of every completed run with a checkpoint, newest first: what the
    teacher, init-run and feature-run pickers list."""
    out = []
    for record in store.records():
        status = record.status()
        if status.get("state") == "completed" and has_finished_checkpoint(record):
            out.append((record, status, record.config_dict() or {}))
    return sorted(out, key=lambda source: source[0].run_id, reverse=True)
