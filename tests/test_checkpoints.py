"""The shipped checkpoints (checkpoints/*.onnx): usable, within the size budget, and as accurate as
their model cards say, recomputed with onnxruntime on a fixed slice of the real test set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifar_core.serve.inference import CHECKPOINTS_DIR, Classifier, inspect_model

SHIPPED = sorted(CHECKPOINTS_DIR.glob("*.onnx"))
BUDGET_BYTES = 25 * 2**20
SLICE = slice(0, 1000)  # the first 1,000 images of the CIFAR-10 test set
TOLERANCE = 0.015       # 1.5 points


def test_a_model_ships():
    assert SHIPPED, "checkpoints/ holds no .onnx model: the Classify page would start empty"


def test_shipped_files_fit_the_budget():
    total = sum(p.stat().st_size for p in CHECKPOINTS_DIR.glob("*") if p.is_file())
    assert total <= BUDGET_BYTES, f"checkpoints/ holds {total / 2**20:.1f} MB (budget 25 MB)"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_checkpoint_matches_its_card(path: Path, cifar):
    card, error = inspect_model(path)
    assert error is None, error
    assert card and card.get("file", {}).get("bytes") == path.stat().st_size, "card does not describe this file"
    evaluation = card["evaluation"]
    assert card["architecture"]["family"] in ("cnn", "transformer")
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff_batch_n"] <= 1e-4
    for key in ("command", "config", "data"):
        assert card["training"][key], key
    classifier = Classifier(path)
    pred = np.concatenate([classifier.predict(chunk).probs.argmax(1)
                           for chunk in np.array_split(cifar.x_test[SLICE], 4)])
    acc = float((pred == cifar.y_test[SLICE]).mean())
    assert acc == pytest.approx(evaluation["onnxruntime_first_1000_acc"], abs=1e-9)
    quantized = "quantization" in card
    if quantized:
        assert card["quantization"]["agreement"]["top1_agreement"] >= 0.97
    if not quantized and "chosen_at_export" not in card["test_time_augmentation"]:
        # the file computes what the run evaluated: onnxruntime must reproduce PyTorch's test accuracy
        assert evaluation["onnxruntime_test_acc"] == pytest.approx(evaluation["test_acc"], abs=0.002)
    assert abs(acc - evaluation["onnxruntime_test_acc"]) <= TOLERANCE, (acc, evaluation["onnxruntime_test_acc"])
