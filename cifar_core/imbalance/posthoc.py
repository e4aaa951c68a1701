"""Threshold moving on a finished run's saved logits, no retraining: every method here adds one bias
per class to the logits before the argmax.

- `logit_adjustment` (Menon et al. 2021, "Long-tail learning via logit adjustment"): subtract
  τ · log(prior), the prior being the training set's class shares; τ = 1 is the Bayes-optimal
  correction for balanced error when the model learned the training prior; τ = 0 changes nothing.
- `tuned_biases`: per-class biases chosen on the validation split to maximise its balanced accuracy
  (coordinate ascent over a grid, deterministic), then applied to the test logits. Needs a run with
  a validation split (val_size > 0).

`bundle` below is a run's logits as `RunRecord.read_logits()` returns them: test_logits,
test_labels, val_logits, val_labels, train_counts.
"""
from __future__ import annotations

import numpy as np

from ..params import ConfigError, Param, Registry
from .metrics import check_logits, imbalance_report

POSTHOC = Registry("threshold-moving method")
NO_VALIDATION = ("this run has no validation split, so per-class thresholds cannot be tuned (tuning them on "
                 "the test set would report a score fitted to it): train with val_size > 0 to tune them; "
                 "logit adjustment needs only the training counts and works on this run")


def log_prior(train_counts) -> np.ndarray:
    """log of each class's share of the training set (a class with no image gets log(1e-12), as the
    logit-adjusted loss does)."""
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.sum() <= 0 or (counts < 0).any():
        raise ConfigError("training counts must be non-negative, one per class, and not all zero")
    return np.log(np.maximum(counts / counts.sum(), 1e-12))


def adjust_logits(logits: np.ndarray, train_counts, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment: logits - τ · log(prior)."""
    return np.asarray(logits) - tau * log_prior(train_counts)


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `labels` (sklearn's balanced_accuracy_score)."""
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def _class_scores(logits: np.ndarray, labels: np.ndarray, recall_weights: np.ndarray, biases: np.ndarray,
                  c: int, grid: np.ndarray) -> np.ndarray:
    """Balanced accuracy for each value of class c's bias in `grid`, the other biases fixed.
    `recall_weights` (N, classes present): one-hot labels over each class's support, so a row of
    correct flags times it is the per-class recall.

    Hand-written (no library tunes per-class offsets for balanced accuracy): with the other classes'
    best score m_i and choice a_i, image i goes to c exactly when logit_ic + b > m_i (>= when c
    comes first, as argmax breaks ties), so one comparison per (grid value, image) scores the whole
    grid at once."""
    others = logits + biases
    others[:, c] = -np.inf
    best_other, other_choice = others.max(axis=1), others.argmax(axis=1)
    threshold = best_other - logits[:, c]
    to_c = (grid[:, None] > threshold[None, :]) | ((grid[:, None] == threshold[None, :])
                                                  & (c < other_choice)[None, :])
    correct = np.where(to_c, labels[None, :] == c, (other_choice == labels)[None, :])
    return (correct.astype(np.float64) @ recall_weights).mean(axis=1)


def tune_biases(val_logits: np.ndarray, val_labels: np.ndarray, span: float = 4.0, step: float = 0.1,
                passes: int = 3) -> np.ndarray:
    """Per-class additive biases that maximise the balanced accuracy of `val_logits`: coordinate ascent,
    class by class, over the grid -span..span in `step`s, for up to `passes` passes (stops early when a
    pass changes nothing). Ties keep the bias nearest to its current value, so the result is
    deterministic and never scores below no biases. ConfigError without validation images."""
    logits = np.asarray(val_logits, dtype=np.float64)
    labels = np.asarray(val_labels, dtype=np.int64)
    if logits.ndim == 2 and logits.shape[0] == 0:
        raise ConfigError(NO_VALIDATION)
    check_logits(logits, labels, logits.shape[1] if logits.ndim == 2 else 0)
    half = int(round(span / step))
    grid = np.arange(-half, half + 1) * step
    support = np.bincount(labels, minlength=logits.shape[1])
    present = support > 0
    recall_weights = np.eye(logits.shape[1])[labels][:, present] / support[present]
    biases = np.zeros(logits.shape[1])
    for _ in range(passes):
        changed = False
        for c in range(logits.shape[1]):
            scores = _class_scores(logits, labels, recall_weights, biases, c, grid)
            ties = np.flatnonzero(scores >= scores.max() - 1e-12)
            pick = grid[ties[np.argmin(np.abs(grid[ties] - biases[c]))]]
            changed |= bool(pick != biases[c])
            biases[c] = pick
        if not changed:
            break
    return biases


@POSTHOC.register("none", description="The logits as the run saved them.")
def no_adjustment(bundle: dict) -> np.ndarray:
    return np.zeros(bundle["test_logits"].shape[1])


@POSTHOC.register("logit_adjustment", params=(
    Param("tau", "float", 1.0, 0.0, 2.0,
          help="τ: subtract τ · log(training class share) from the logits; 1 = the Bayes-optimal correction "
               "for balanced accuracy, 0 = none."),
), description="Post-hoc logit adjustment (Menon et al. 2021): logits - τ · log prior.")
def logit_adjustment(bundle: dict, tau: float) -> np.ndarray:
    return -tau * log_prior(bundle["train_counts"])


@POSTHOC.register("tuned_biases", params=(
    Param("span", "float", 4.0, 0.5, 20.0, help="Each class's bias is searched in -span..span (logit units)."),
    Param("step", "float", 0.1, 0.01, 1.0, help="Grid step of the search."),
    Param("passes", "int", 3, 1, 10, help="Passes of coordinate ascent over the classes."),
), description="Per-class biases tuned on the validation split for balanced accuracy, applied to the test "
               "logits (needs a validation split).")
def tuned_biases(bundle: dict, span: float, step: float, passes: int) -> np.ndarray:
    if step > span:
        raise ConfigError(f"tuned_biases: step {step} is larger than span {span}")
    return tune_biases(bundle["val_logits"], bundle["val_labels"], span, step, passes)


def method_biases(name: str, params: dict | None, bundle: dict) -> np.ndarray:
    """The per-class biases method `name` adds to the logits (validated params)."""
    return POSTHOC.build(name, params, bundle=bundle)


def before_after(bundle: dict, name: str, params: dict | None, classes: list[str]) -> dict:
    """The test report (metrics.imbalance_report) without and with method `name`: {"method", "params",
    "biases" (by class), "before", "after", "val_balanced_acc" ((before, after), None without a
    validation split)}."""
    params = POSTHOC.validate(name, params)
    biases = method_biases(name, params, bundle)
    counts = bundle["train_counts"]
    test_logits, test_labels = bundle["test_logits"], bundle["test_labels"]
    before = imbalance_report(test_logits, test_labels, counts, classes)
    after = imbalance_report(test_logits.astype(np.float64) + biases, test_labels, counts, classes)
    val_logits, val_labels = bundle["val_logits"], bundle["val_labels"]
    val = None
    if len(val_labels):
        k = val_logits.shape[1]
        val = (balanced_accuracy(val_logits.argmax(1), val_labels, k),
               balanced_accuracy((val_logits + biases).argmax(1), val_labels, k))
    return {"method": name, "params": params, "biases": dict(zip(classes, map(float, biases))),
            "before": before, "after": after, "val_balanced_acc": val}
