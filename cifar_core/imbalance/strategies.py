"""Class-imbalance strategies: how the training loop draws samples or weighs the loss.

Random over/under-sampling, SMOTE, cluster-based oversampling and EasyEnsemble members come from
imbalanced-learn (resampling once, as the classic methods do); the weighted, class-balanced and
square-root samplers draw a fresh with-replacement epoch from per-sample weights
(torch.utils.data.WeightedRandomSampler semantics) with torch.multinomial, so they run on the
device-resident dataset without a DataLoader. The cost-sensitive losses (class weights, focal, logit
offsets, LDAM margins with deferred re-weighting) are numbers the engine's training loss reads.

Entries tagged `NEEDS_IMAGES` also get the pool's images (`x`, uint8 NHWC) and, when their `space`
parameter is "features", `features` (N, D): a finished run's penultimate features of those images,
computed by the engine (engine.features), as this layer cannot load runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..params import ConfigError, Param, Registry, validate_id

NEEDS_IMAGES = "images"  # tag: the builder also takes x (the pool's images) and features (or None)


@dataclass
class BalancingRegistry(Registry):
    """The registry, plus each entry's checks between its parameters (run by `validate`, so the
    config's validation, the form and the CLI report them before a run is queued)."""

    checks: dict[str, Callable[[dict], None]] = field(default_factory=dict)

    def check(self, name: str):
        def decorator(fn: Callable[[dict], None]) -> Callable[[dict], None]:
            self.checks[name] = fn
            return fn
        return decorator

    def validate(self, name: str, values: dict | None) -> dict:
        values = super().validate(name, values)
        if name in self.checks:
            self.checks[name](values)
        return values

    def build(self, name: str, values: dict | None = None, **extra):
        return self.get(name).fn(**self.validate(name, values), **extra)


BALANCING = BalancingRegistry("balancing strategy")


@dataclass
class BalancePlan:
    indices: np.ndarray                  # positions into the training pool (+ synthetic images), used every epoch
    sample_weights: np.ndarray | None = None   # per position in `indices`: draw epochs by weight
    class_weights: np.ndarray | None = None    # per class: weights of the cross-entropy
    logit_offsets: np.ndarray | None = None    # per class: added to the logits in the training loss only
    focal_gamma: float = 0.0                   # > 0: focal loss (1 - p)^gamma instead of cross-entropy
    synthetic_x: np.ndarray | None = None      # uint8 (S, H, W, 3): new training images, after the pool's
    synthetic_y: np.ndarray | None = None      # (S,) their labels
    ldam_margins: np.ndarray | None = None     # per class: LDAM margin subtracted from the true-class logit
    ldam_scale: float = 1.0                    # LDAM's s: the loss sees s · (logits - margins)
    drw_weights: np.ndarray | None = None      # per class: class weights from `drw_start` of training on
    drw_start: float = 1.0                     # fraction of the training steps after which drw_weights apply

    @property
    def synthetic(self) -> int:
        return 0 if self.synthetic_y is None else len(self.synthetic_y)


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


# ---- sampling by class power (Kang et al. 2020) -------------------------------------------------

def class_power_weights(y: np.ndarray, num_classes: int, q: float) -> np.ndarray:
    """Per-image weights that draw class j with probability n_j^q / Σ_i n_i^q (Kang et al. 2020,
    "Decoupling representation and classifier"), images uniformly within their class: n_j^(q - 1)."""
    counts = class_counts(y, num_classes)
    per_class = np.where(counts > 0, np.maximum(counts, 1) ** (q - 1.0), 0.0)
    return per_class[y]


@BALANCING.register("class_balanced_sampling", description="Each epoch draws classes with equal "
                    "probability (n^0), images uniformly within a class (Kang et al. 2020).")
def class_balanced_sampling(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)), sample_weights=class_power_weights(y, num_classes, 0.0))


@BALANCING.register("square_root_sampling", description="Each epoch draws class j with probability "
                    "∝ √n_j, between instance and class-balanced sampling (Kang et al. 2020).")
def square_root_sampling(y: np.ndarray, seed: int, num_classes: int) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)), sample_weights=class_power_weights(y, num_classes, 0.5))


# ---- EasyEnsemble ------------------------------------------------------------------------------

def ensemble_member_state(seed: int, member: int) -> int:
    """The RandomUnderSampler random state of ensemble member `member` of a run seeded `seed`."""
    return int(np.random.SeedSequence([int(seed), int(member)]).generate_state(1)[0])


@BALANCING.register("easy_ensemble_member", params=(
    Param("members", "int", 5, 2, 100, help="k: how many balanced under-samples the ensemble has."),
    Param("member", "int", 0, 0, 99, help="Which of them this run trains on (0 … k - 1)."),
), description="One member of an EasyEnsemble (Liu et al. 2009): the member-th of k balanced random "
               "under-samples, each with its own random state; k runs, logits averaged.")
def easy_ensemble_member(y: np.ndarray, seed: int, num_classes: int, members: int, member: int) -> BalancePlan:
    from imblearn.under_sampling import RandomUnderSampler
    sampler = RandomUnderSampler(random_state=ensemble_member_state(seed, member))
    return BalancePlan(indices=_imblearn_resample(sampler, y))


@BALANCING.check("easy_ensemble_member")
def _check_member(values: dict) -> None:
    if values["member"] >= values["members"]:
        raise ConfigError(f"easy_ensemble_member.member: {values['member']} is not below members = "
                          f"{values['members']} (members are numbered 0 … {values['members'] - 1})")


# ---- LDAM with deferred re-weighting (Cao et al. 2019) -----------------------------------------

def ldam_margins(y: np.ndarray, num_classes: int, max_margin: float) -> np.ndarray:
    """Δ_c ∝ n_c^(-1/4), scaled so that the largest (the rarest class's) is `max_margin`; 0 for a
    class with no image (it is never a true class)."""
    counts = class_counts(y, num_classes)
    present = counts > 0
    margins = np.zeros(num_classes)
    margins[present] = counts[present] ** -0.25
    return margins * (max_margin / margins.max())


# Defaults for plain linear heads: the reference (kaidic/LDAM-DRW) pairs s = 30 with a cosine
# classifier, whose logits lie in [-1, 1] (its 0.5 margin is 15 units after scaling). Our heads'
# logits are unbounded and their scale is learnt by the head's weights, so s = 1 (a larger s would
# only sharpen an already free scale, like a higher learning rate on it) and the margins are in
# logit units: 1.0 is about the top-two gap of a moderately confident prediction, enough to favour
# the rare classes' decision regions without dominating the loss.
@BALANCING.register("ldam_drw", params=(
    Param("max_margin", "float", 1.0, 0.0, 10.0, help="The rarest class's margin in logit units; "
          "margins ∝ n^(-1/4)."),
    Param("scale", "float", 1.0, 0.1, 64.0, help="s: the loss sees s · (logits - margins). 1 for plain "
          "heads (the reference's 30 is for cosine logits in [-1, 1])."),
    Param("drw_start", "float", 0.8, 0.0, 1.0, help="Fraction of training after which the class weights "
          "switch to effective-number weights (0.8: epoch 160 of 200, as the paper); 1 = never."),
    Param("beta", "float", 0.9999, 0.9, 0.99999, help="β of the deferred effective-number weights."),
), description="LDAM loss (Cao et al. 2019): the true-class logit minus a margin ∝ n^(-1/4); after "
               "drw_start of training, deferred re-weighting by effective numbers.")
def ldam_drw(y: np.ndarray, seed: int, num_classes: int, max_margin: float, scale: float, drw_start: float,
             beta: float) -> BalancePlan:
    return BalancePlan(indices=np.arange(len(y)),
                       ldam_margins=ldam_margins(y, num_classes, max_margin).astype(np.float32),
                       ldam_scale=float(scale),
                       drw_weights=effective_number_weights(y, num_classes, beta).astype(np.float32),
                       drw_start=float(drw_start))


# ---- image-space resampling: SMOTE and cluster-based oversampling ------------------------------

SPACE_PARAMS = (
    Param("space", "choice", "pixels", choices=("pixels", "features"),
          help="pixels: distances between raw images; features: between a finished run's penultimate "
               "features of them (semantically close images)."),
    Param("feature_run", "str", "", help="space=features: the id of a completed run in the same runs "
          "folder whose model gives the features."),
)


def feature_run_of(name: str, params: dict | None) -> str | None:
    """The run whose features the strategy `name` needs (space=features), else None."""
    values = BALANCING.validate(name, params)
    return values["feature_run"] if values.get("space") == "features" else None


def _check_feature_space(name: str) -> Callable[[dict], None]:
    def check(values: dict) -> None:
        if values["space"] != "features":
            return
        if not values["feature_run"]:
            raise ConfigError(f"{name}.feature_run: space=features needs the id of a completed run (its "
                              "model's features of the training images choose the neighbours)")
        try:
            validate_id(values["feature_run"], "run id")
        except ConfigError as exc:
            raise ConfigError(f"{name}.feature_run: {exc}") from None
    return check


def _space_features(name: str, space: str, features: np.ndarray | None, n: int) -> np.ndarray | None:
    """The features the strategy measures distances in: None for space=pixels."""
    if space == "pixels":
        return None
    if features is None or len(features) != n:
        raise ConfigError(f"{name}: space=features needs the features of every training image")
    return np.asarray(features, dtype=np.float32)


def _smote_table(x: np.ndarray, features: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(rows SMOTE sees, the weight of the pixel columns in them). With features, the rows are the
    features (scaled to unit std) followed by the pixels times a weight that keeps the pixels' whole
    distance below 1e-6: imbalanced-learn's SMOTE then picks neighbours by the features alone, and,
    as it interpolates every column of a row with one step, blends the pixels of those same two
    images with the same step. This keeps SMOTE itself (no re-implementation, no private API) at the
    cost of carrying the pixel columns through its neighbour search."""
    pixels = x.reshape(len(x), -1).astype(np.float32)
    if features is None:
        return pixels, 1.0
    feats = np.asarray(features, dtype=np.float32)
    feats = feats / max(float(feats.std()), 1e-12)
    weight = 1e-6 / (255.0 * np.sqrt(pixels.shape[1]))
    return np.hstack([feats, pixels * np.float32(weight)]), weight


@BALANCING.register("smote", params=(
    Param("k_neighbors", "int", 5, 1, 50, help="Neighbours of the same class a new image may blend with "
          "(capped at the smallest class's size - 1)."),
    *SPACE_PARAMS,
), tags=(NEEDS_IMAGES,), description="SMOTE (imbalanced-learn): new images for every smaller class, "
   "each a pixel blend of an image and one of its k same-class neighbours (SMOTE on pixels makes blends); "
   "with space=features the neighbours are chosen by a finished run's features, the images still blended.")
def smote(y: np.ndarray, seed: int, num_classes: int, k_neighbors: int, space: str, feature_run: str,
          x: np.ndarray, features: np.ndarray | None) -> BalancePlan:
    from imblearn.over_sampling import SMOTE

    counts = class_counts(y, num_classes)
    short = (counts > 0) & (counts < counts.max())
    if not short.any():
        return BalancePlan(indices=np.arange(len(y)))
    smallest = int(counts[short].min())
    if smallest < 2:
        raise ConfigError(f"smote: class {int(np.flatnonzero(short & (counts == smallest))[0])} has one image; "
                          "SMOTE needs two images of a class to blend")
    table, weight = _smote_table(x, _space_features("smote", space, features, len(y)))
    sampler = SMOTE(k_neighbors=min(k_neighbors, smallest - 1), random_state=seed)
    resampled, labels = sampler.fit_resample(table, y)
    blends = resampled[len(y):, -x[0].size:] / np.float32(weight)
    synthetic_x = np.clip(np.rint(blends), 0, 255).astype(np.uint8).reshape(-1, *x.shape[1:])
    return BalancePlan(indices=np.arange(len(labels)), synthetic_x=synthetic_x,
                       synthetic_y=np.asarray(labels[len(y):], dtype=np.int64))


BALANCING.check("smote")(_check_feature_space("smote"))


def pooled_pixels(x: np.ndarray, factor: int = 4) -> np.ndarray:
    """(N, H/f · W/f · 3) float32: the images averaged over f×f blocks (8×8×3 = 192 numbers for
    CIFAR), so that k-means on pixels runs 16× faster and clusters by colour and layout, not noise."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


@BALANCING.register("cluster_oversample", params=(
    Param("clusters", "int", 4, 1, 50, help="k-means clusters per class (a class with fewer images gets "
          "one per image)."),
    *SPACE_PARAMS,
), tags=(NEEDS_IMAGES,), description="Cluster-based oversampling: k-means within each class (on 4×4-"
   "pooled pixels, or a finished run's features), then every cluster of every class repeated to the size "
   "of the largest (imbalanced-learn RandomOverSampler; real images only, no synthesis).")
def cluster_oversample(y: np.ndarray, seed: int, num_classes: int, clusters: int, space: str,
                       feature_run: str, x: np.ndarray, features: np.ndarray | None) -> BalancePlan:
    from imblearn.over_sampling import RandomOverSampler
    from sklearn.cluster import KMeans

    points = _space_features("cluster_oversample", space, features, len(y))
    points = pooled_pixels(x) if points is None else points
    groups = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = min(clusters, len(members))
        found = (KMeans(n_clusters=k, random_state=seed).fit_predict(points[members]) if k > 1
                 else np.zeros(len(members), dtype=np.int64))
        groups[members] = c * clusters + found
    if len(np.unique(groups)) < 2:
        return BalancePlan(indices=np.arange(len(y)))
    with warnings.catch_warnings():  # many cluster ids per image read to imbalanced-learn like a regression target
        warnings.filterwarnings("ignore", message=".*could represent a regression problem.*")
        return BalancePlan(indices=_imblearn_resample(RandomOverSampler(random_state=seed), groups))


BALANCING.check("cluster_oversample")(_check_feature_space("cluster_oversample"))


def build_balance_plan(name: str, params: dict | None, y: np.ndarray, seed: int, num_classes: int = 10,
                       x: np.ndarray | None = None, features: np.ndarray | None = None) -> BalancePlan:
    """The plan of strategy `name` for labels `y`; entries that resample images (NEEDS_IMAGES) also
    need the pool's images `x` (uint8 NHWC) and, with space=features, their `features`."""
    extra = {}
    if NEEDS_IMAGES in BALANCING.get(name).tags:
        if x is None:
            raise ConfigError(f"balancing strategy {name} needs the training images")
        extra = {"x": np.asarray(x), "features": features}
    return BALANCING.build(name, params, y=np.asarray(y, dtype=np.int64), seed=seed,
                           num_classes=num_classes, **extra)


def planned_epoch_images(name: str, params: dict | None, y: np.ndarray, seed: int, num_classes: int = 10) -> int:
    """Images per epoch of strategy `name` from the labels alone (for duration estimates): exact for
    every entry but cluster_oversample, whose clusters need the images: it is counted as if each
    class's clusters were equal, a lower bound (unequal k-means clusters are filled to the largest)."""
    y = np.asarray(y, dtype=np.int64)
    if NEEDS_IMAGES not in BALANCING.get(name).tags:
        return len(build_balance_plan(name, params, y, seed, num_classes).indices)
    counts = class_counts(y, num_classes)
    return int((counts > 0).sum() * counts.max())
