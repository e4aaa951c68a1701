"""Imbalance-aware metrics (issue 14): expected calibration error and reliability bins on constructed
cases with known values, the many / medium / few-shot groups rule, and the full report against
scikit-learn's metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from cifar_core.imbalance.metrics import (class_groups, expected_calibration_error, group_accuracies,
                                          imbalance_report, reliability_bins)
from cifar_core.data.split import long_tail_counts, step_counts
from cifar_core.params import ConfigError

CLASSES = [f"c{i}" for i in range(10)]
LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT, ρ = 100


def top_probs(confidences, predicted, num_classes: int = 4) -> np.ndarray:
    """Rows whose top probability is `confidences[i]` on class `predicted[i]`, the rest spread evenly."""
    n = len(confidences)
    probs = np.empty((n, num_classes))
    for i, (conf, cls) in enumerate(zip(confidences, predicted)):
        probs[i] = (1 - conf) / (num_classes - 1)
        probs[i, cls] = conf
    return probs


def test_ece_of_a_constructed_case_equals_its_hand_computed_value():
    # bin (0.6, 0.8] with 5 bins: confidences 0.7, 4 predictions, 2 right -> |0.5 - 0.7| = 0.2
    # bin (0.8, 1.0]: confidences 0.9, 6 predictions, all right -> |1.0 - 0.9| = 0.1
    probs = top_probs([0.7] * 4 + [0.9] * 6, [0] * 10)
    labels = np.array([0, 0, 1, 2] + [0] * 6)
    ece = expected_calibration_error(probs, labels, n_bins=5)
    assert ece == pytest.approx(0.4 * 0.2 + 0.6 * 0.1)


def test_a_perfectly_calibrated_case_has_zero_ece_and_an_overconfident_one_its_gap():
    probs = top_probs([0.75] * 8, [1] * 8)
    calibrated = np.array([1, 1, 1, 1, 1, 1, 0, 2])  # 6 of 8 right at confidence 0.75
    assert expected_calibration_error(probs, calibrated) == pytest.approx(0.0, abs=1e-12)
    wrong = np.zeros(8, dtype=int)  # confident and always wrong: ECE = the confidence
    assert expected_calibration_error(probs, wrong) == pytest.approx(0.75)


def test_reliability_bins_report_edges_counts_confidence_and_accuracy():
    probs = top_probs([0.3, 0.35, 0.6, 1.0], [0, 1, 2, 3])
    labels = np.array([0, 0, 2, 3])
    bins = reliability_bins(probs, labels, n_bins=4)
    assert [(b["lower"], b["upper"]) for b in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [b["count"] for b in bins] == [0, 2, 1, 1]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None  # empty bin
    assert bins[1]["confidence"] == pytest.approx(0.325) and bins[1]["accuracy"] == 0.5
    assert bins[3]["confidence"] == pytest.approx(1.0) and bins[3]["accuracy"] == 1.0  # 1.0 is in the last bin
    # an upper edge belongs to its bin: (lower, upper]
    edge = reliability_bins(top_probs([0.5], [0]), np.array([0]), n_bins=4)
    assert [b["count"] for b in edge] == [0, 1, 0, 0]


def test_groups_rank_by_training_count_top_and_bottom_30_percent():
    groups = class_groups(LT_COUNTS)
    assert groups == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    shuffled = [500, 1000, 700, 800, 600, 900, 550, 650, 750, 950]  # the report's 500..1000 set
    assert class_groups(shuffled) == {"many": [1, 5, 9], "medium": [2, 3, 7, 8], "few": [0, 4, 6]}
    assert class_groups([5000] * 10) is None  # balanced: no head or tail


def test_classes_with_equal_counts_share_a_group():
    step = step_counts(5000, 10, 5)  # 5 classes at 5,000, 5 at 500
    assert class_groups(step) == {"many": [0, 1, 2, 3, 4], "medium": [], "few": [5, 6, 7, 8, 9]}
    lt = long_tail_counts(5000, 100)  # CIFAR-10-LT ρ=100: no ties, 3 / 4 / 3 as before
    assert class_groups(lt) == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    small = long_tail_counts(20, 10)  # ..., 3, 2, 2: a tie inside the few-shot group
    assert class_groups(small) == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    # a tie goes where most of its positions are: 3 of 4 positions (4..7) medium, 1 many
    assert class_groups([9, 8, 7, 7, 7, 7, 3, 2, 1, 0])["many"] == [0, 1]
    # evenly split across a cut-off (positions 2..5: 2 many, 2 medium): medium
    assert class_groups([9, 7, 7, 7, 7, 5, 4, 3, 2, 1])["medium"] == [1, 2, 3, 4, 5, 6]
    shuffled = [50, 500, 500, 5000, 50, 500, 50, 5000, 500, 500]
    groups = class_groups(shuffled)
    assert groups == {"many": [3, 7], "medium": [1, 2, 5, 8, 9], "few": [0, 4, 6]}


def test_group_accuracy_is_the_mean_recall_of_its_classes():
    recall = np.linspace(1.0, 0.1, 10)
    acc = group_accuracies(recall, class_groups(LT_COUNTS))
    assert acc["many"] == pytest.approx(recall[:3].mean())
    assert acc["medium"] == pytest.approx(recall[3:7].mean())
    assert acc["few"] == pytest.approx(recall[7:].mean())
    absent = np.ones(10, dtype=bool)
    absent[7:] = False  # no test image of the few-shot classes
    assert group_accuracies(recall, class_groups(LT_COUNTS), absent)["few"] is None
    assert group_accuracies(recall, None) is None


def test_the_report_matches_sklearn_and_its_own_parts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10)).astype(np.float32)
    logits[np.arange(500), labels] += rng.uniform(0, 3, 500).astype(np.float32)
    report = imbalance_report(logits, labels, LT_COUNTS, CLASSES)
    pred = logits.argmax(1)
    assert report["test_acc"] == pytest.approx((pred == labels).mean())
    assert report["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    recall = recall_score(labels, pred, average=None)
    assert list(report["per_class_recall"].values()) == pytest.approx(list(recall))
    assert report["per_class_acc"] == report["per_class_recall"]
    assert report["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert report["ece"] == pytest.approx(expected_calibration_error(probs, labels), rel=1e-6)
    assert len(report["reliability"]) == report["ece_bins"] == 15
    assert sum(b["count"] for b in report["reliability"]) == 500
    assert report["class_groups"] == {"many": CLASSES[:3], "medium": CLASSES[3:7], "few": CLASSES[7:]}
    assert report["group_acc"]["few"] == pytest.approx(recall[7:].mean())
    assert report["train_counts"] == dict(zip(CLASSES, LT_COUNTS))
    balanced = imbalance_report(logits, labels, [100] * 10, CLASSES)
    assert balanced["class_groups"] is None and balanced["group_acc"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for b in report["reliability"] for v in b.values())


def test_the_report_refuses_mismatched_inputs():
    logits = np.zeros((4, 10), dtype=np.float32)
    with pytest.raises(ConfigError, match="expected \\(N, 10\\)"):
        imbalance_report(logits[:, :5], np.zeros(4, dtype=int), LT_COUNTS, CLASSES)
    with pytest.raises(ConfigError, match="3 labels for 4 rows"):
        imbalance_report(logits, np.zeros(3, dtype=int), LT_COUNTS, CLASSES)
    with pytest.raises(ConfigError, match="NaN"):
        imbalance_report(np.full((4, 10), np.nan), np.zeros(4, dtype=int), LT_COUNTS, CLASSES)
    with pytest.raises(ConfigError, match="9 training counts"):
        imbalance_report(logits, np.zeros(4, dtype=int), LT_COUNTS[:9], CLASSES)
