"""The Imbalance page's library half: the training set a profile gives, finished runs side by side on
the imbalance metrics, and threshold moving on one run's saved logits.

Everything here reads run records (results.json, logits.npz) or computes a split; nothing trains.
Threshold moving is `imbalance.posthoc` applied to `RunRecord.read_logits()`, so a slider move costs
one pass over 10,000 × 10 logits and never retrains.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import RunConfig
from ..data import CLASSES
from ..engine.init_from import init_candidates
from ..engine.prepare import run_split, split_counts
from ..imbalance import POSTHOC, before_after
from ..params import ConfigError
from ..runs import RunRecord, RunStore, final_metrics

# The columns of the side-by-side table, in order: (final_metrics key, label).
COMPARE_COLUMNS = (("test_acc", "accuracy"), ("balanced_acc", "balanced acc"), ("macro_f1", "macro-F1"),
                   ("many_acc", "many-shot"), ("medium_acc", "medium-shot"), ("few_acc", "few-shot"),
                   ("ece", "ECE"))


def profile_counts(imbalance: str, imbalance_params: dict | None, seed: int, y_train,
                   subset: str = "full", val_size: int = 0) -> dict:
    """Per-class counts (labeled, unlabeled, validation) of the training set an imbalance profile gives,
    exactly as a run with these fields would train on (`python -m cifar_core split`)."""
    cfg = RunConfig.from_dict({"subset": subset, "imbalance": imbalance,
                               "imbalance_params": imbalance_params or {}, "seed": seed,
                               "val_size": val_size})
    return split_counts(run_split(cfg, y_train))


@dataclass
class FinishedRun:
    run_id: str
    name: str
    balance: str
    imbalance: str
    has_logits: bool
    has_validation: bool
    has_checkpoint: bool   # weights to start from: a cRT source
    metrics: dict


def finished_runs(store: RunStore) -> list[FinishedRun]:
    """Completed runs with a results.json, newest first, with their final metrics and whether their
    logits were saved (threshold moving needs them; runs from before logits were saved have none) and
    whether a checkpoint is there to re-train its classifier from."""
    with_weights = {c["run_id"] for c in init_candidates(store)}
    out = []
    for record in store.records():
        status = record.status()
        if status.get("state") != "completed":
            continue
        results = record.results()
        if not isinstance(results, dict):
            continue
        config = record.config_dict() or {}
        out.append(FinishedRun(
            run_id=record.run_id, name=str(config.get("name") or config.get("model") or ""),
            balance=str(config.get("balance", "none")), imbalance=str(config.get("imbalance", "none")),
            has_logits=record.logits_path.is_file(), has_validation=bool(config.get("val_size")),
            has_checkpoint=record.run_id in with_weights,
            metrics=final_metrics(status, results)))
    return sorted(out, key=lambda r: r.run_id, reverse=True)


def comparison_rows(runs: list[FinishedRun]) -> list[dict]:
    """One row per run: run, name, imbalance, balancing and the COMPARE_COLUMNS (None where missing)."""
    rows = []
    for run in runs:
        row = {"run": run.run_id, "name": run.name, "imbalance": run.imbalance, "balancing": run.balance}
        row.update({label: run.metrics.get(key) for key, label in COMPARE_COLUMNS})
        rows.append(row)
    return rows


def run_logits(record: RunRecord) -> dict[str, np.ndarray]:
    """A finished run's saved logits; ConfigError saying why there are none."""
    bundle = record.read_logits()
    if bundle is None:
        raise ConfigError(f"run {record.run_id} has no saved logits (logits.npz): it finished before runs "
                          "saved them, or it has not finished; train it again to move its thresholds")
    return bundle


def threshold_moving(store: RunStore, run_id: str, method: str, params: dict | None = None) -> dict:
    """`imbalance.before_after` on run `run_id`'s saved test logits: the report before and after the
    method's per-class biases (see `imbalance.posthoc`)."""
    POSTHOC.get(method)  # ConfigError for an unknown method, before reading anything
    return before_after(run_logits(store.record(run_id)), method, params, list(CLASSES))


AS_TRAINED, MOVED = "as trained", "thresholds moved"  # the two series of a threshold-moving chart


def recall_before_after(moved: dict) -> dict[str, dict[str, float]]:
    """{AS_TRAINED: {class: recall}, MOVED: {class: recall}} for a per-class chart of a
    `threshold_moving` result."""
    return {AS_TRAINED: dict(moved["before"]["per_class_recall"]),
            MOVED: dict(moved["after"]["per_class_recall"])}


def centred_biases(moved: dict) -> dict[str, float]:
    """The method's per-class biases minus their mean: adding one constant to every logit changes no
    prediction, so only these differences matter."""
    biases = moved["biases"]
    mean = float(np.mean(list(biases.values())))
    return {name: value - mean for name, value in biases.items()}
