"""Cost-sensitive losses of the balancing registry: effective-number weights, focal loss, Balanced
Softmax and the logit-adjusted loss (issue 14), checked against their definitions and in a real run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_core.engine.objectives import focal_loss
from cifar_core.imbalance import BALANCING, build_balance_plan

Y = np.array([0] * 80 + [1] * 15 + [2] * 5)


def test_effective_number_weights_follow_cui_et_al():
    plan = build_balance_plan("effective_number_loss", {"beta": 0.99}, Y, seed=0, num_classes=3)
    raw = np.array([(1 - 0.99) / (1 - 0.99 ** n) for n in (80, 15, 5)])
    assert np.allclose(plan.class_weights, raw / raw.sum() * 3, rtol=1e-6)
    assert plan.class_weights[2] > plan.class_weights[1] > plan.class_weights[0]


def test_balanced_softmax_and_logit_adjustment_offset_by_the_log_prior():
    prior = np.log(np.array([80, 15, 5]) / 100)
    bs = build_balance_plan("balanced_softmax", {}, Y, seed=0, num_classes=3)
    la = build_balance_plan("logit_adjusted_loss", {"tau": 0.5}, Y, seed=0, num_classes=3)
    assert np.allclose(bs.logit_offsets, prior, atol=1e-6)
    assert np.allclose(la.logit_offsets, 0.5 * prior, atol=1e-6)
    assert bs.class_weights is None and bs.focal_gamma == 0


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_downweights_easy_images():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=gen) * 3
    soft = torch.softmax(torch.randn(16, 10, generator=gen), dim=1)
    weight = torch.rand(10, generator=gen) + 0.5
    for targets in (soft, torch.arange(16) % 10):
        ce = F.cross_entropy(logits, targets if targets.dim() == 2 else F.one_hot(targets, 10).float(),
                             weight=weight, label_smoothing=0.1)
        assert torch.allclose(focal_loss(logits, targets, 0.0, weight, 0.1), ce, atol=1e-6)
    easy = torch.tensor([[8.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([0])
    ratio_easy = focal_loss(easy, target, 2.0) / F.cross_entropy(easy, target)
    ratio_hard = focal_loss(hard, target, 2.0) / F.cross_entropy(hard, target)
    assert ratio_easy < 1e-6 and math.isclose(float(ratio_hard), 0.25, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["effective_number_loss", "focal_loss", "balanced_softmax", "logit_adjusted_loss"])
def test_each_loss_is_a_declared_registry_entry(name):
    assert name in BALANCING.names()
    assert BALANCING.get(name).description


def test_balanced_softmax_trains_and_evaluates_with_plain_logits(tmp_path, cifar_npz):
    from cifar_core.config import RunConfig
    from cifar_core.engine import train_run
    from cifar_core.runs import RunStore

    cfg = RunConfig.from_dict({
        "model": "fastnet", "model_params": {"width": 0.25}, "subset": "per_class", "per_class": 40,
        "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 10}, "val_size": 0,
        "test_size": 200, "epochs": 1, "batch_size": 64, "balance": "balanced_softmax",
        "device": "cpu", "precision": "fp32"})
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz), progress=False)
    assert record.status()["state"] == "completed", record.status().get("error")
    results = record.results()
    assert 0.0 <= results["test_acc"] <= 1.0
