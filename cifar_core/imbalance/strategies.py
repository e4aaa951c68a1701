"""Class-imbalance strategies: how the training loop draws samples or weighs the loss.

Random over/under-sampling come from imbalanced-learn (resampling indices once, as the classic
methods do); the weighted sampler draws a fresh with-replacement epoch from per-sample weights
(torch.utils.data.WeightedRandomSampler semantics) with torch.multinomial, so it runs on the
device-resident dataset without a DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..params import Param, Registry

BALANCING = Registry("balancing strategy")


@dataclass
class BalancePlan:
    indices: np.ndarray                  # positions into the labeled training pool, used every epoch
    sample_weights: np.ndarray | None = None   # per position in `indices`: draw epochs by weight
    class_weights: np.ndarray | None = None    # per class: weights of the cross-entropy


def inverse_frequency(y: np.ndarray, num_classes: int, power: float = 1.0) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, (counts.sum() / (num_classes * np.maximum(counts, 1))) ** power, 0.0)
    return weights


@BALANCING.register("none", description="Plain uniform shuffling.")
def no_balancing(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)))


@BALANCING.register("weighted_sampler", params=(
    Param("power", "float", 1.0, 0.0, 2.0, help="Weights ∝ (1/class count)^power; 1 = balanced."),
), description="Draw each epoch with replacement, sample weight ∝ 1/class frequency.")
def weighted_sampler(y: np.ndarray, seed: int, num_classes: int, power: float) -> BalancePlan:
    per_class = inverse_frequency(y, num_classes, power)
    return BalancePlan(indices=np.arange(len(y)), sample_weights=per_class[y])


@BALANCING.register("class_weighted_loss", params=(
    Param("power", "float", 1.0, 0.0, 2.0, help="Class weight ∝ (1/class count)^power."),
), description="Cross-entropy weighted by inverse class frequency.")
def class_weighted_loss(y: np.ndarray, seed: int, num_classes: int, power: float) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)),
                       class_weights=inverse_frequency(y, num_classes, power).astype(np.float32))


def _imblearn_resample(sampler, y: np.ndarray) -> np.ndarray:
    positions = np.arange(len(y)).reshape(-1, 1)
    resampled, _ = sampler.fit_resample(positions, y)
    return np.sort(resampled.ravel())


@BALANCING.register("random_oversample", description="Repeat minority images until every class "
                    "matches the largest (imbalanced-learn RandomOverSampler).")
def random_oversample(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    from imblearn.over_sampling import RandomOverSampler
    return BalancePlan(indices=_imblearn_resample(RandomOverSampler(random_state=seed), y))


@BALANCING.register("random_undersample", description="Drop majority images until every class "
                    "matches the smallest (imbalanced-learn RandomUnderSampler).")
def random_undersample(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    from imblearn.under_sampling import RandomUnderSampler
    return BalancePlan(indices=_imblearn_resample(RandomUnderSampler(random_state=seed), y))


def build_balance_plan(name: str, params: dict | None, y: np.ndarray, seed: int,
                       num_classes: int = 10) -> BalancePlan:
    return BALANCING.build(name, params, y=np.asarray(y, dtype=np.int64), seed=seed,
                           num_classes=num_classes)
