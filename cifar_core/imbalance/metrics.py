"""Imbalance-aware evaluation from logits: accuracy, balanced accuracy, macro-F1, per-class recall,
many / medium / few-shot group accuracies, expected calibration error with its reliability bins, and
the confusion matrix. numpy and scikit-learn only (no torch), so the app can recompute it from a
run's saved logits.

Class groups. The usual many (> 100 images) / medium / few (< 20) cut-offs of ImageNet-LT mean
nothing on CIFAR-10 (CIFAR-10-LT ρ=100 has 5,000..50 images per class, the report's set 500..1,000),
so the groups here are by rank: with the classes sorted by training count (largest first), the top
30% of the rank positions are "many", the bottom 30% "few", the rest "medium" (3 / 4 / 3 of the ten
CIFAR-10 classes). Classes with equal counts always share a group: they share one rank, the mean of
the positions they span, so a tie goes to the group that holds most of its positions, and to "medium"
when it straddles a cut-off evenly (a step profile of 5 classes at 5,000 and 5 at 500 is 5 many and
5 few). On a balanced training set (all counts equal) there are no groups: None.
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from ..params import ConfigError

ECE_BINS = 15
GROUP_SHARE = 0.3  # of the classes, by training count: the top share is "many", the bottom share "few"
GROUPS = ("many", "medium", "few")


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of (N, C) logits, in float64."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lower, upper] over [0, 1] (the first also holds 0): for each, its
    edges, how many predictions fall in it, their mean confidence (the top probability) and their
    accuracy (None for an empty bin)."""
    # sklearn's calibration_curve is binary only and torchmetrics would need torch here: the
    # multiclass top-label binning of Guo et al. (2017) is a few lines of numpy
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    return [{"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": int(counts[i]),
             "confidence": float(conf_sum[i] / counts[i]) if counts[i] else None,
             "accuracy": float(correct_sum[i] / counts[i]) if counts[i] else None}
            for i in range(n_bins)]


def calibration_error(bins: list[dict]) -> float:
    """ECE of reliability bins: Σ (bin count / N) · |bin accuracy - bin mean confidence|."""
    total = sum(b["count"] for b in bins)
    if not total:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017) of top-label confidences in `n_bins` equal-width bins."""
    return calibration_error(reliability_bins(probs, labels, n_bins))


def class_groups(train_counts, share: float = GROUP_SHARE) -> dict[str, list[int]] | None:
    """{"many", "medium", "few"}: class indices grouped by training count rank (see the module
    docstring); None when all counts are equal (a balanced set has no head or tail)."""
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.size == 0 or np.all(counts == counts[0]):
        return None
    larger = (counts[None, :] > counts[:, None]).sum(axis=1)
    equal = (counts[None, :] == counts[:, None]).sum(axis=1)
    rank = larger + (equal + 1) / 2  # 1 = the largest count; equal counts share the mean of their positions
    edge = max(1, int(round(share * counts.size)))
    # the half-way points between the last position of a group and the first of the next
    many, few = rank < edge + 0.5, rank > counts.size - edge + 0.5
    return {"many": np.flatnonzero(many).tolist(), "medium": np.flatnonzero(~many & ~few).tolist(),
            "few": np.flatnonzero(few).tolist()}


def group_accuracies(recall: np.ndarray, groups: dict[str, list[int]] | None,
                     present: np.ndarray | None = None) -> dict[str, float | None] | None:
    """Each group's accuracy: the mean recall of its classes (those present in the test labels when
    `present` is given; None for a group with none)."""
    if groups is None:
        return None
    recall = np.asarray(recall, dtype=np.float64)
    present = np.ones(recall.size, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    out = {}
    for name in GROUPS:
        members = [c for c in groups.get(name, []) if present[c]]
        out[name] = float(recall[members].mean()) if members else None
    return out


def prediction_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class recall (as per_class_acc too) and the
    confusion matrix (rows: true class) of hard predictions."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 recall_score)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    per_class = dict(zip(classes, map(float, recall)))
    return {"test_acc": float(accuracy_score(y_true, y_pred)),
            "balanced_acc": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "per_class_acc": per_class, "per_class_recall": dict(per_class),
            "confusion_matrix": cm.tolist(), "classes": list(classes)}


def check_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """ConfigError unless `logits` is (N, num_classes) and finite and `labels` are N class indices."""
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ConfigError(f"logits have shape {logits.shape}: expected (N, {num_classes})")
    if labels.shape != (logits.shape[0],):
        raise ConfigError(f"{labels.shape[0] if labels.ndim else 0} labels for {logits.shape[0]} rows of logits")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must be class indices 0..{num_classes - 1}")
    if not np.isfinite(logits).all():
        raise ConfigError("the logits hold NaN or infinite values")


def imbalance_report(logits: np.ndarray, labels: np.ndarray, train_counts, classes: list[str],
                     n_bins: int = ECE_BINS) -> dict:
    """The full report of a classifier's logits on labeled images: prediction_metrics, plus `ece` and
    its `reliability` bins (`ece_bins` of them), `train_counts` by class, `class_groups` (class names
    by group, None for a balanced training set) and `group_acc` (many / medium / few accuracy)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    check_logits(logits, labels, len(classes))
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.shape != (len(classes),):
        raise ConfigError(f"{counts.size} training counts for {len(classes)} classes")
    report = prediction_metrics(labels, logits.argmax(axis=1), classes)
    bins = reliability_bins(probabilities(logits), labels, n_bins)
    groups = class_groups(counts)
    recall = np.array([report["per_class_recall"][name] for name in classes])
    present = np.bincount(labels, minlength=len(classes)) > 0
    report.update(ece=calibration_error(bins), ece_bins=n_bins, reliability=bins,
                  train_counts=dict(zip(classes, map(int, counts))),
                  class_groups=None if groups is None else {g: [classes[c] for c in groups[g]] for g in GROUPS},
                  group_acc=group_accuracies(recall, groups, present))
    return report
