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
    logit_offsets: np.ndarray | None = None    # per class: added to the logits in the training loss only
    focal_gamma: float = 0.0                   # > 0: focal loss (1 - p)^gamma instead of cross-entropy


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


def class_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=num_classes).astype(np.float64)


def effective_number_weights(y: np.ndarray, num_classes: int, beta: float) -> np.ndarray:
    """Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples": w_c ∝ (1 - β) /
    (1 - β^n_c), normalised so the weights of the classes present sum to their number."""
    counts = class_counts(y, num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return weights * present.sum() / weights.sum()


def log_prior(y: np.ndarray, num_classes: int) -> np.ndarray:
    """log of each class's share of the training labels (a class with no image gets log(1e-12))."""
    counts = class_counts(y, num_classes)
    return np.log(np.maximum(counts / counts.sum(), 1e-12))


@BALANCING.register("effective_number_loss", params=(
    Param("beta", "float", 0.999, 0.9, 0.99999,
          help="β of the effective number (1 - β^n) / (1 - β); → 1 approaches inverse frequency."),
), description="Cross-entropy weighted by the inverse effective number of samples (Cui et al. 2019).")
def effective_number_loss(y: np.ndarray, seed: int, num_classes: int, beta: float) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)),
                       class_weights=effective_number_weights(y, num_classes, beta).astype(np.float32))


@BALANCING.register("focal_loss", params=(
    Param("gamma", "float", 2.0, 0.5, 5.0, help="Focusing exponent: (1 - p)^γ down-weights easy images."),
), description="Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^γ.")
def focal_loss(y: np.ndarray, seed: int, num_classes: int, gamma: float) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)), focal_gamma=float(gamma))


@BALANCING.register("balanced_softmax", description="Balanced Softmax (Ren et al. 2020): train on "
                    "logits + log class prior, predict with the plain logits.")
def balanced_softmax(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)), logit_offsets=log_prior(y, num_classes).astype(np.float32))


@BALANCING.register("logit_adjusted_loss", params=(
    Param("tau", "float", 1.0, 0.0, 3.0, help="τ: the loss sees logits + τ · log prior (τ = 1 is Balanced Softmax)."),
), description="Logit-adjusted cross-entropy (Menon et al. 2021): logits + τ · log prior while training.")
def logit_adjusted_loss(y: np.ndarray, seed: int, num_classes: int, tau: float) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)),
                       logit_offsets=(tau * log_prior(y, num_classes)).astype(np.float32))


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
