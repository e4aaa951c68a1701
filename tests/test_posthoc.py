"""Threshold moving on saved logits (issue 14): post-hoc logit adjustment and per-class biases tuned on
the validation split, on constructed classifiers whose answer is known; and the logits.npz a real
tiny run saves (shapes, its argmax reproducing results.json), read back and refused when damaged."""
from __future__ import annotations

import numpy as np
import pytest

from cifar_core.imbalance.metrics import imbalance_report
from cifar_core.imbalance.posthoc import (POSTHOC, adjust_logits, balanced_accuracy, before_after, log_prior,
                                          tune_biases)
from cifar_core.params import ConfigError

CLASSES = [f"c{i}" for i in range(10)]
COUNTS = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])  # CIFAR-10-LT, ρ = 100


def prior_biased(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels scored by a classifier that learned the long-tailed training prior: a noisy
    signal for the true class plus log(prior), so it over-predicts the head classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n), labels] += 2.0
    return (logits + log_prior(COUNTS)).astype(np.float32), labels.astype(np.int64)


def bundle(val: bool = True) -> dict:
    test_logits, test_labels = prior_biased(5000, seed=1)
    val_logits, val_labels = prior_biased(2000, seed=2) if val else (np.zeros((0, 10), np.float32),
                                                                    np.zeros(0, np.int64))
    return {"test_logits": test_logits, "test_labels": test_labels, "val_logits": val_logits,
            "val_labels": val_labels, "train_counts": COUNTS}


def test_tau_zero_changes_nothing():
    data = bundle()
    assert np.array_equal(adjust_logits(data["test_logits"], COUNTS, 0.0), data["test_logits"])
    result = before_after(data, "logit_adjustment", {"tau": 0.0}, CLASSES)
    assert result["after"]["confusion_matrix"] == result["before"]["confusion_matrix"]
    assert result["after"]["ece"] == pytest.approx(result["before"]["ece"])
    assert set(result["biases"].values()) == {0.0}


def test_logit_adjustment_undoes_a_learned_prior():
    data = bundle()
    result = before_after(data, "logit_adjustment", {"tau": 1.0}, CLASSES)
    before, after = result["before"], result["after"]
    assert after["balanced_acc"] > before["balanced_acc"] + 0.15
    assert after["group_acc"]["few"] > before["group_acc"]["few"] + 0.3  # the tail gains most
    # the biases are -τ·log prior: the rarest class gets the largest one
    biases = np.array(list(result["biases"].values()))
    assert np.allclose(biases, -log_prior(COUNTS)) and biases.argmax() == 9
    assert result["val_balanced_acc"][1] > result["val_balanced_acc"][0]


def test_tuned_biases_raise_validation_balanced_accuracy_deterministically():
    data = bundle()
    first = tune_biases(data["val_logits"], data["val_labels"])
    again = tune_biases(data["val_logits"], data["val_labels"])
    assert np.array_equal(first, again)
    before = balanced_accuracy(data["val_logits"].argmax(1), data["val_labels"], 10)
    after = balanced_accuracy((data["val_logits"] + first).argmax(1), data["val_labels"], 10)
    assert after > before + 0.15
    # they recover the prior's correction up to a constant: the tail's biases exceed the head's
    assert first[7:].mean() - first[:3].mean() > 2.0
    result = before_after(data, "tuned_biases", {}, CLASSES)
    assert result["val_balanced_acc"] == pytest.approx((before, after))
    assert result["after"]["balanced_acc"] > result["before"]["balanced_acc"] + 0.15  # it carries to the test set


def test_tuned_biases_never_score_below_no_biases_on_validation():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 300)
    logits = rng.normal(size=(300, 10))  # no signal at all: whatever is tuned must not lose
    biases = tune_biases(logits, labels, span=2.0, step=0.5, passes=2)
    assert balanced_accuracy((logits + biases).argmax(1), labels, 10) >= balanced_accuracy(logits.argmax(1), labels, 10)


def test_without_a_validation_split_tuning_is_refused_and_logit_adjustment_works():
    data = bundle(val=False)
    with pytest.raises(ConfigError, match="no validation split.*logit adjustment") as err:
        before_after(data, "tuned_biases", {}, CLASSES)
    assert "val_size" in str(err.value)
    result = before_after(data, "logit_adjustment", {"tau": 1.0}, CLASSES)
    assert result["val_balanced_acc"] is None
    assert result["after"]["balanced_acc"] > result["before"]["balanced_acc"]


def test_methods_are_declared_and_their_params_validated():
    assert POSTHOC.names() == ["none", "logit_adjustment", "tuned_biases"]
    assert POSTHOC.get("logit_adjustment").param("tau").default == 1.0
    with pytest.raises(ConfigError, match="tau"):
        before_after(bundle(), "logit_adjustment", {"tau": -1}, CLASSES)
    with pytest.raises(ConfigError, match="unknown threshold-moving method"):
        before_after(bundle(), "bayes", {}, CLASSES)


# ---- the logits a real run saves ------------------------------------------------------------------
def tiny_run(tmp_path, cifar_npz, run_id: str, **changes):
    from cifar_core.config import RunConfig
    from cifar_core.engine import train_run
    from cifar_core.runs import RunStore

    cfg = RunConfig.from_dict({
        "model": "fastnet", "model_params": {"width": 0.25}, "subset": "per_class", "per_class": 20,
        "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 10}, "val_size": 100,
        "test_size": 200, "epochs": 1, "batch_size": 64, "device": "cpu", "precision": "fp32", **changes})
    record = train_run(cfg, RunStore(tmp_path), run_id=run_id, data_source=str(cifar_npz))
    assert record.state() == "completed", record.status().get("error")
    return record


def test_a_run_saves_logits_that_reproduce_its_results(tmp_path, cifar_npz):
    record = tiny_run(tmp_path, cifar_npz, "with-val", tta_flip=True)
    saved = record.read_logits()
    results = record.results()
    assert saved["test_logits"].shape == (200, 10) and saved["test_logits"].dtype == np.float32
    assert saved["test_labels"].shape == (200,) and saved["test_labels"].dtype == np.int64
    assert saved["val_logits"].shape == (100, 10) and saved["val_labels"].shape == (100,)
    assert saved["train_counts"].dtype == np.int64 and saved["train_counts"].sum() == record.status()["train_images"]
    assert saved["train_counts"][0] > saved["train_counts"][9]  # long-tailed
    assert float((saved["test_logits"].argmax(1) == saved["test_labels"]).mean()) == results["test_acc"]
    assert results["train_counts"] == dict(zip(results["classes"], saved["train_counts"].tolist()))
    again = imbalance_report(saved["test_logits"], saved["test_labels"], saved["train_counts"], results["classes"])
    for key in ("balanced_acc", "macro_f1", "ece", "group_acc", "confusion_matrix"):
        assert again[key] == results[key], key
    assert results["class_groups"]["few"] == results["classes"][7:]
    assert record.status()["ece"] == results["ece"]
    # the final evaluation's validation accuracy is the saved validation logits' accuracy
    last_eval = [row for row in record.read_metrics() if row["kind"] == "eval"][-1]
    assert last_eval["val_acc"] == pytest.approx(float((saved["val_logits"].argmax(1) == saved["val_labels"]).mean()))
    result = before_after(saved, "tuned_biases", {"step": 0.5}, results["classes"])
    assert result["val_balanced_acc"][1] >= result["val_balanced_acc"][0]

    no_val = tiny_run(tmp_path, cifar_npz, "no-val", val_size=0)
    empty = no_val.read_logits()
    assert empty["val_logits"].shape == (0, 10) and empty["val_labels"].shape == (0,)
    assert float((empty["test_logits"].argmax(1) == empty["test_labels"]).mean()) == no_val.results()["test_acc"]
    with pytest.raises(ConfigError, match="no validation split"):
        before_after(empty, "tuned_biases", {}, results["classes"])


def test_damaged_or_wrong_logits_files_are_clear_errors(tmp_path):
    from cifar_core.config import RunConfig
    from cifar_core.runs import RunStore

    record = RunStore(tmp_path).create(RunConfig().validated(), run_id="r")
    assert record.read_logits() is None  # none saved (yet)
    good = bundle()
    record.write_logits(**good)
    back = record.read_logits()
    assert set(back) == set(good) and np.array_equal(back["test_logits"], good["test_logits"])
    data = record.logits_path.read_bytes()
    record.logits_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="logits.npz of run r is unreadable"):
        record.read_logits()
    record.logits_path.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError, match="unreadable"):
        record.read_logits()
    for change, message in ((dict(test_logits=good["test_logits"].astype(np.float64)), "float64, expected float32"),
                            (dict(val_labels=good["val_labels"][:5]), "do not match"),
                            (dict(test_labels=good["test_labels"] + 10), "class indices"),
                            (dict(train_counts=COUNTS[:9]), "do not match")):
        np.savez(record.logits_path, **{**good, **change})
        with pytest.raises(ConfigError, match=message):
            record.read_logits()
    np.savez(record.logits_path, **{k: v for k, v in good.items() if k != "train_counts"})
    with pytest.raises(ConfigError, match="lacks train_counts"):
        record.read_logits()
    with pytest.raises(ConfigError, match="unknown array"):
        record.write_logits(**good, extra=np.zeros(3))
