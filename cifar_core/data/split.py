"""Subsets of the training set: random and per-class subsets, imbalance profiles, label budgets
and the validation split."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..params import ConfigError, Param, Registry
from .load import CLASSES, NUM_CLASSES


# --------------------------------------------------------------------------------------------
# Subsets (indices into the training set)
# --------------------------------------------------------------------------------------------

def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise ConfigError(f"labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _n_classes(y: np.ndarray, num_classes: int | None = None) -> int:
    if num_classes:
        return int(num_classes)
    return max(NUM_CLASSES, int(y.max()) + 1 if y.size else 0)


def _class_name(c: int) -> str:
    return CLASSES[c] if 0 <= c < NUM_CLASSES else f"class {c}"


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(int(seed))


def _by_class(y: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Positions of each class in y, ascending."""
    order = np.argsort(y, kind="stable")
    bounds = np.searchsorted(y[order], np.arange(n_classes + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_classes)]


def random_subset(y, n: int, seed: int) -> np.ndarray:
    """n distinct random positions of y (sorted)."""
    y = _labels(y)
    n = int(n)
    if n < 1 or n > len(y):
        raise ConfigError(f"subset size {n} must be between 1 and the {len(y)} images available")
    return np.sort(_rng(seed).choice(len(y), size=n, replace=False)).astype(np.int64)


def per_class_subset(y, n_per_class: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Exactly n_per_class random positions of each class (sorted)."""
    y = _labels(y)
    n = int(n_per_class)
    if n < 1:
        raise ConfigError(f"images per class must be at least 1, got {n}")
    rng = _rng(seed)
    groups = _by_class(y, _n_classes(y, num_classes))
    short = [f"{_class_name(c)} ({len(g)})" for c, g in enumerate(groups) if len(g) < n]
    if short:
        raise ConfigError(f"{n} images per class requested, but some classes have fewer: {', '.join(short)}")
    return np.sort(np.concatenate([rng.choice(g, size=n, replace=False) for g in groups])).astype(np.int64)


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer `total` proportionally to weights (largest remainder)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        order = np.lexsort((np.arange(len(exact)), -(exact - out)))  # biggest remainder, then lowest class
        out[order[:rest]] += 1
    return out


def train_val_split(indices, y, val_size, seed: int,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of `indices` (into y) into (train_idx, val_idx), both sorted.

    val_size: a count (int >= 1) or a fraction in (0, 1). Each class contributes to validation in
    proportion to its share of `indices` (largest-remainder rounding, so the total is exact).
    """
    y = _labels(y)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if isinstance(val_size, float) and not float(val_size).is_integer():
        if not 0 < val_size < 1:
            raise ConfigError(f"validation fraction {val_size} must be between 0 and 1")
        val_size = int(round(val_size * n))
    val_size = int(val_size)
    if val_size < 1 or val_size >= n:
        raise ConfigError(f"validation size {val_size} must be at least 1 and smaller than the "
                          f"{n} images it is taken from")
    labels = y[indices]
    groups = _by_class(labels, _n_classes(y, num_classes))
    quota = _allocate(val_size, np.array([len(g) for g in groups]))
    rng = _rng(seed)
    val = [indices[rng.choice(g, size=q, replace=False)] for g, q in zip(groups, quota) if q]
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(indices, val_idx)  # sorted, unique
    return train_idx.astype(np.int64), val_idx


# --------------------------------------------------------------------------------------------
# Imbalance generators: fn(y, seed, **params) -> sorted positions of y to keep
# --------------------------------------------------------------------------------------------

IMBALANCE = Registry("imbalance")


def _take_counts(y: np.ndarray, counts, rng: np.random.Generator, name: str) -> np.ndarray:
    groups = _by_class(y, len(counts))
    keep = []
    for c, (g, k) in enumerate(zip(groups, counts)):
        k = int(k)
        if k > len(g):
            raise ConfigError(f"{name}: {_class_name(c)} needs {k} images but only {len(g)} are available "
                              f"(use a larger subset or smaller counts)")
        if k:
            keep.append(rng.choice(g, size=k, replace=False))
    if not keep:
        raise ConfigError(f"{name}: the profile keeps no images at all")
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _fit_n_max(n_max: int, factors: np.ndarray, available: np.ndarray) -> int:
    """Largest n <= n_max with floor(n * factor_c) <= available_c for all classes."""
    with np.errstate(divide="ignore"):
        limit = np.where(factors > 0, np.floor(available / np.maximum(factors, 1e-300) + 1e-9), np.inf)
    return int(min(n_max, limit.min()))


def _profile_counts(n_max: int, factors: np.ndarray) -> np.ndarray:
    return np.floor(n_max * factors + 1e-9).astype(np.int64)


def _long_tail_factors(num_classes: int, imbalance_ratio: float) -> np.ndarray:
    c = np.arange(num_classes)
    return float(imbalance_ratio) ** (-c / max(num_classes - 1, 1))


def _step_factors(num_classes: int, imbalance_ratio: float, minority_classes: int) -> np.ndarray:
    factors = np.ones(num_classes)
    if minority_classes:
        factors[num_classes - minority_classes:] = 1.0 / float(imbalance_ratio)
    return factors


def long_tail_counts(n_max: int, imbalance_ratio: float, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """CIFAR-10-LT profile: n_c = floor(n_max * rho^(-c/(C-1))), class 0 the largest."""
    return _profile_counts(int(n_max), _long_tail_factors(num_classes, imbalance_ratio))


def step_counts(n_max: int, imbalance_ratio: float, minority_classes: int,
                num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Step profile: the last `minority_classes` classes get floor(n_max / rho), the others n_max."""
    return _profile_counts(int(n_max), _step_factors(num_classes, imbalance_ratio, minority_classes))


@IMBALANCE.register("none", description="Keep the pool as it is (balanced CIFAR-10).")
def imbalance_none(y, seed: int = 0) -> np.ndarray:
    return np.arange(len(_labels(y)), dtype=np.int64)


@IMBALANCE.register(
    "report_random",
    params=(Param("low", "int", 500, 1, 5000, help="fewest images a class may get"),
            Param("high", "int", 1000, 1, 5000, help="most images a class may get")),
    description="Each class keeps a seeded random count drawn uniformly in [low, high] "
                "(the source report's setup; its draw gave 7,527 images).")
def imbalance_report_random(y, seed: int = 0, low: int = 500, high: int = 1000) -> np.ndarray:
    y = _labels(y)
    if low > high:
        raise ConfigError(f"report_random: low {low} is greater than high {high}")
    rng = _rng(seed)
    n_classes = _n_classes(y)
    available = np.bincount(y, minlength=n_classes)
    if available.min() < high:
        c = int(available.argmin())
        raise ConfigError(f"report_random: {_class_name(c)} has only {available[c]} images in the pool, "
                          f"fewer than high={high}; lower high or use a larger subset")
    counts = rng.integers(low, high + 1, size=n_classes)
    return _take_counts(y, counts, rng, "report_random")


@IMBALANCE.register(
    "long_tail",
    params=(Param("imbalance_ratio", "float", 100.0, 1, 1000, help="rho = largest / smallest class",
                  log=True),
            Param("n_max", "int", 5000, 1, 5000, help="images of the largest class (class 0); lowered "
                  "automatically, keeping the ratio, when the pool holds fewer")),
    description="CIFAR-10-LT exponential profile n_c = n_max * rho^(-c/(C-1)).")
def imbalance_long_tail(y, seed: int = 0, imbalance_ratio: float = 100.0, n_max: int = 5000) -> np.ndarray:
    y = _labels(y)
    n_classes = _n_classes(y)
    factors = _long_tail_factors(n_classes, imbalance_ratio)
    n_eff = _fit_n_max(int(n_max), factors, np.bincount(y, minlength=n_classes))
    return _take_counts(y, _profile_counts(n_eff, factors), _rng(seed), "long_tail")


@IMBALANCE.register(
    "step",
    params=(Param("imbalance_ratio", "float", 100.0, 1, 1000, help="rho = majority / minority size",
                  log=True),
            Param("minority_classes", "int", 5, 0, NUM_CLASSES - 1,
                  help="how many classes (the last ones) are minority classes"),
            Param("n_max", "int", 5000, 1, 5000, help="images of each majority class; lowered "
                  "automatically, keeping the ratio, when the pool holds fewer")),
    description="Step imbalance: the last minority_classes classes get n_max / rho images, the rest n_max.")
def imbalance_step(y, seed: int = 0, imbalance_ratio: float = 100.0, minority_classes: int = 5,
                   n_max: int = 5000) -> np.ndarray:
    y = _labels(y)
    n_classes = _n_classes(y)
    if not 0 <= minority_classes < n_classes:
        raise ConfigError(f"step: minority_classes must be between 0 and {n_classes - 1}")
    factors = _step_factors(n_classes, imbalance_ratio, minority_classes)
    n_eff = _fit_n_max(int(n_max), factors, np.bincount(y, minlength=n_classes))
    return _take_counts(y, _profile_counts(n_eff, factors), _rng(seed), "step")


# --------------------------------------------------------------------------------------------
# Partial labels
# --------------------------------------------------------------------------------------------

def label_budget(y, indices, k: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Boolean mask over `indices`: k labeled images, k / C per class, chosen at random."""
    y = _labels(y)
    indices = np.asarray(indices, dtype=np.int64)
    n_classes = _n_classes(y, num_classes)
    k = int(k)
    if k < n_classes or k % n_classes:
        raise ConfigError(f"label budget {k} must be a positive multiple of {n_classes} "
                          f"(the same number of labels per class)")
    if k > len(indices):
        raise ConfigError(f"label budget {k} is larger than the {len(indices)} training images")
    per = k // n_classes
    groups = _by_class(y[indices], n_classes)
    short = [f"{_class_name(c)} ({len(g)})" for c, g in enumerate(groups) if len(g) < per]
    if short:
        raise ConfigError(f"label budget {k} needs {per} images per class, but some classes have "
                          f"fewer: {', '.join(short)}")
    rng = _rng(seed)
    mask = np.zeros(len(indices), dtype=bool)
    for g in groups:
        mask[rng.choice(g, size=per, replace=False)] = True
    return mask


def with_label_set(split: "Split", y_train, indices) -> "Split":
    """`split` with exactly `indices` (positions in the training set, e.g. an active-learning round's
    label set) labeled in place of a label budget; the rest of its training pool unlabeled.
    ConfigError when one of them is not in the split's training pool."""
    y = _labels(y_train)
    indices = np.asarray(indices, dtype=np.int64)
    outside = indices[~np.isin(indices, split.train_idx)]
    if len(outside):
        raise ConfigError(f"label set: {len(outside)} of its {len(indices)} images are not in this run's training "
                          f"pool (the first: training image {int(outside[0])}); the label set was drawn from "
                          "another subset, validation hold-out or imbalance profile")
    mask = np.isin(split.train_idx, indices)
    return replace(split, labeled_mask=mask,
                   labeled_counts=np.bincount(y[split.train_idx[mask]], minlength=len(split.train_counts)),
                   notes=[*split.notes, f"labeled: the {int(mask.sum())} images of an active-learning label set"])


# --------------------------------------------------------------------------------------------
# Split = subset -> validation hold-out -> imbalance -> label budget
# --------------------------------------------------------------------------------------------

def split_params() -> tuple[Param, ...]:
    """Declared keys of a build_split spec (besides imbalance_params, a dict checked against
    the chosen IMBALANCE entry). A function, so entries registered later appear as choices."""
    return (
        Param("subset", "choice", "full", choices=("full", "random", "per_class"),
              help="which training images form the pool"),
        Param("subset_size", "int", 10000, 1, 50000, help="pool size for subset=random"),
        Param("per_class", "int", 1000, 1, 5000, help="images per class for subset=per_class"),
        Param("imbalance", "choice", "none", choices=tuple(IMBALANCE.names()),
              help="how the training pool is made imbalanced (an IMBALANCE entry)"),
        Param("val_size", "int", 0, 0, 49999, help="validation images held out of the pool, "
              "stratified, before imbalance (0 = none)"),
        Param("label_budget", "int", 0, 0, 50000, help="labeled training images, balanced per "
              "class (0 = all labeled)"),
    )


SPLIT_PARAMS = split_params()  # as declared at import; validate_split_spec uses split_params()


def validate_split_spec(spec: dict | None) -> dict:
    """Fill defaults and check a build_split spec; returns a new dict (imbalance_params filled)."""
    spec = dict(spec or {})
    declared = split_params()
    known = {p.name for p in declared} | {"imbalance_params"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"split: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    out = {p.name: p.validate(spec.get(p.name, p.default), "split") for p in declared}
    params = spec.get("imbalance_params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"split.imbalance_params: expected a mapping, got {params!r}")
    out["imbalance_params"] = IMBALANCE.validate(out["imbalance"], params)
    return out


@dataclass
class Split:
    train_idx: np.ndarray     # sorted indices into the training set
    val_idx: np.ndarray       # sorted indices into the training set, disjoint from train_idx
    labeled_mask: np.ndarray  # bool over train_idx
    spec: dict = field(default_factory=dict)
    seed: int = 0
    classes: tuple[str, ...] = CLASSES
    train_counts: np.ndarray = field(default=None, repr=False)
    val_counts: np.ndarray = field(default=None, repr=False)
    labeled_counts: np.ndarray = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def labeled_idx(self) -> np.ndarray:
        return self.train_idx[self.labeled_mask]

    @property
    def unlabeled_idx(self) -> np.ndarray:
        return self.train_idx[~self.labeled_mask]

    def summary(self) -> dict:
        train = [int(v) for v in self.train_counts]
        val = [int(v) for v in self.val_counts]
        lab = [int(v) for v in self.labeled_counts]
        nonzero = [v for v in train if v]
        return {
            "classes": list(self.classes),
            "n_train": len(self.train_idx), "n_val": len(self.val_idx),
            "n_labeled": int(self.labeled_mask.sum()),
            "n_unlabeled": int((~self.labeled_mask).sum()),
            "train_per_class": train, "val_per_class": val, "labeled_per_class": lab,
            "imbalance_ratio": (max(nonzero) / min(nonzero)) if nonzero else None,
            "per_class": [{"class": name, "train": t, "val": v, "labeled": l, "unlabeled": t - l}
                          for name, t, v, l in zip(self.classes, train, val, lab)],
            "spec": dict(self.spec), "seed": self.seed, "notes": list(self.notes),
        }


def _stage_seed(seed: int, stage: int) -> int:
    """Independent seeds for the stages of build_split, all derived from one seed."""
    return int(np.random.SeedSequence([int(seed), stage]).generate_state(1)[0])


def build_split(y_train, spec: dict | None, seed: int) -> Split:
    """Pool (full / random / per_class) -> stratified validation hold-out (before imbalance, so
    validation stays balanced) -> imbalance on the rest -> label budget."""
    y = _labels(y_train)
    spec = validate_split_spec(spec)
    n_classes = _n_classes(y)
    notes = []
    if spec["subset"] == "full":
        pool = np.arange(len(y), dtype=np.int64)
    elif spec["subset"] == "random":
        if spec["subset_size"] > len(y):
            raise ConfigError(f"split.subset_size {spec['subset_size']} is larger than the "
                              f"{len(y)} training images available")
        pool = random_subset(y, spec["subset_size"], _stage_seed(seed, 1))
    else:
        pool = per_class_subset(y, spec["per_class"], _stage_seed(seed, 1), n_classes)

    if spec["val_size"]:
        if spec["val_size"] >= len(pool):
            raise ConfigError(f"split.val_size {spec['val_size']} must be smaller than the pool "
                              f"of {len(pool)} images")
        rest, val_idx = train_val_split(pool, y, spec["val_size"], _stage_seed(seed, 2), n_classes)
    else:
        rest, val_idx = pool, np.zeros(0, dtype=np.int64)

    keep = IMBALANCE.build(spec["imbalance"], spec["imbalance_params"], y=y[rest],
                           seed=_stage_seed(seed, 3))
    train_idx = np.sort(rest[keep]).astype(np.int64)
    train_counts = np.bincount(y[train_idx], minlength=n_classes)
    n_max = spec["imbalance_params"].get("n_max")
    if n_max is not None and train_counts.max() < n_max:
        notes.append(f"{spec['imbalance']}: the pool holds fewer than n_max={n_max} images of a class, "
                     f"so n_max was lowered to {int(train_counts.max())} (the ratio is kept)")

    if spec["label_budget"]:
        mask = label_budget(y, train_idx, spec["label_budget"], _stage_seed(seed, 4), n_classes)
    else:
        mask = np.ones(len(train_idx), dtype=bool)
    return Split(train_idx=train_idx, val_idx=val_idx, labeled_mask=mask, spec=spec, seed=int(seed),
                 classes=CLASSES if n_classes == NUM_CLASSES else tuple(map(_class_name, range(n_classes))),
                 train_counts=train_counts,
                 val_counts=np.bincount(y[val_idx], minlength=n_classes),
                 labeled_counts=np.bincount(y[train_idx[mask]], minlength=n_classes), notes=notes)
