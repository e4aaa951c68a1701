"""A run's data on its device, split, balancing plan and augmentation chain, built from its config;
the epoch order and the model input made from them.

A balancing strategy that synthesises images (SMOTE) returns them with the plan; they are appended
to the training images after the labeled pool (training images only: never evaluated), and the split
summary says how many. Strategies that measure distances in a finished run's feature space get the
features computed here (engine.features), from the run named by their `feature_run` parameter.

A run with a `label_set` (an active-learning round) trains on exactly that label set's images with
its labels (a person's may differ from CIFAR-10's); the file is <runs>/.active/<loop>/round-<k>.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..augment import AugmentChain
from ..config import RunConfig, parse_label_set
from ..data import (CIFAR_MEAN, CIFAR_STD, NUM_CLASSES, Split, build_split, load_cifar10, per_class_subset,
                    to_device_tensors)
from ..data.split import with_label_set
from ..devices import resolve_device
from ..imbalance import BalancePlan, build_balance_plan
from ..imbalance.strategies import feature_run_of
from ..params import ConfigError
from ..runs import RunStore, read_json_object
from .features import run_features
from .rng import EPOCH_ORDER, INIT_SAMPLE, seeded_generator


@dataclass
class Prepared:
    """Everything a run needs, built from its config."""

    cfg: RunConfig
    device: torch.device
    train_x: torch.Tensor        # uint8 (N,3,32,32) on device: the labeled pool, then `synthetic` new images
    train_y: torch.Tensor        # int64 (N,) on device
    unlabeled_x: torch.Tensor    # uint8 (M,3,32,32) on device: the split's unlabeled images (M=0: no label budget)
    unlabeled_y: torch.Tensor    # int64 (M,) on device: their true labels, for monitoring pseudo-labels only
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_split: str              # "val" or "test"
    test_x: torch.Tensor
    test_y: torch.Tensor
    epoch_indices: np.ndarray    # positions into train_x used each epoch (after resampling)
    sample_weights: torch.Tensor | None
    class_weights: torch.Tensor | None
    logit_offsets: torch.Tensor | None   # (C,) added to the logits by the training loss only
    focal_gamma: float                   # > 0: the training loss is the focal loss
    chain: AugmentChain
    mean: torch.Tensor
    std: torch.Tensor
    data_origin: str
    split_summary: dict
    synthetic: int = 0                          # the last `synthetic` of train_x are synthesised (SMOTE)
    ldam_margins: torch.Tensor | None = None    # (C,) LDAM margins of the true class (training loss only)
    ldam_scale: float = 1.0                     # LDAM's s
    drw_weights: torch.Tensor | None = None     # (C,) class weights from drw_start of training on
    drw_start: float = 1.0                      # fraction of the training steps

    @property
    def labeled_counts(self) -> np.ndarray:
        """Per-class counts of the labeled training images, before balancing (synthetic ones left out)."""
        real = self.train_y[:self.train_y.shape[0] - self.synthetic]
        return torch.bincount(real, minlength=NUM_CLASSES).cpu().numpy()


def run_split(cfg: RunConfig, y_train, store: RunStore | None = None,
              label_set: tuple[np.ndarray, np.ndarray] | None = None) -> Split:
    """The training split a run of `cfg` uses (pool, validation hold-out, imbalance, label budget or
    label set): what `prepare` trains on and what `python -m cifar_core split` prints. `store`: the runs
    root a label set is read from (default: the default runs root), unless `label_set` holds it read."""
    split = build_split(y_train, {
        "subset": cfg.subset, "subset_size": cfg.subset_size, "per_class": cfg.per_class,
        "imbalance": cfg.imbalance, "imbalance_params": cfg.imbalance_params,
        "val_size": cfg.val_size, "label_budget": cfg.label_budget}, cfg.seed)
    if not cfg.label_set:
        return split
    indices, _ = label_set or read_label_set(store or RunStore(), cfg.label_set, len(y_train))
    return with_label_set(split, y_train, indices)


ACTIVE_DIR = ".active"  # <runs>/.active/<loop id>/: an active-learning loop's manifest and label sets


def label_set_path(store: RunStore, label_set: str) -> Path:
    """The file of a label_set "LOOP/ROUND" in a runs root: <runs>/.active/LOOP/round-ROUND.json."""
    loop_id, round_number = parse_label_set(label_set)
    return store.root / ACTIVE_DIR / loop_id / f"round-{round_number}.json"


def read_label_set(store: RunStore, label_set: str, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the training set, their labels) of a label set; ConfigError when its file is missing
    or damaged (not JSON, no index and label lists of equal length, an index out of range or repeated, a
    label that is not a class)."""
    path = label_set_path(store, label_set)
    data, why = read_json_object(path)
    if data is None:
        raise ConfigError(f"label_set {label_set}: " + (why or f"no label set file {path} (the active-learning "
                                                               "loop writes it before it queues the round's run)"))
    try:
        indices, labels = (np.asarray(data.get(key)) for key in ("indices", "labels"))
    except ValueError:  # ragged lists
        indices = labels = np.zeros((0, 0))
    damaged = label_set_problem(indices, labels, n_train)
    if damaged:
        raise ConfigError(f"label_set {label_set}: {path} is damaged: {damaged}")
    return indices.astype(np.int64), labels.astype(np.int64)


def label_set_problem(indices: np.ndarray, labels: np.ndarray, n_train: int) -> str | None:
    """What is wrong with a label set's arrays, or None."""
    if any(a.ndim != 1 or (a.size and a.dtype.kind not in "iu") for a in (indices, labels)):
        return "its 'indices' and 'labels' must be lists of whole numbers"
    if not indices.size:
        return "it labels no image"
    if len(indices) != len(labels):
        return f"{len(indices)} indices but {len(labels)} labels"
    if indices.min() < 0 or indices.max() >= n_train:
        return f"an index outside the {n_train} training images"
    if len(np.unique(indices)) != len(indices):
        return "an image is listed twice"
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        return f"a label outside the classes 0..{NUM_CLASSES - 1}"
    return None


def training_labels(y_train: np.ndarray, label_set: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The training set's labels as a run learns them: CIFAR-10's, except those of its label set."""
    if label_set is None:
        return y_train
    indices, labels = label_set
    relabeled = np.array(y_train, dtype=np.int64)
    relabeled[indices] = labels
    return relabeled


def split_counts(split: Split) -> dict:
    """Per-class counts of a split, labeled by class name: labeled, unlabeled and validation."""
    def per_class(counts) -> dict[str, int]:
        return {name: int(n) for name, n in zip(split.classes, counts)}

    labeled = split.labeled_counts
    unlabeled = split.train_counts - labeled
    summary = split.summary()
    return {"labeled": per_class(labeled), "unlabeled": per_class(unlabeled),
            "validation": per_class(split.val_counts),
            "totals": {"labeled": int(labeled.sum()), "unlabeled": int(unlabeled.sum()),
                       "validation": int(split.val_counts.sum())},
            "imbalance_ratio": summary["imbalance_ratio"], "seed": split.seed, "spec": summary["spec"],
            "notes": summary["notes"]}


def balance_features(cfg: RunConfig, images: torch.Tensor, store: RunStore | None) -> np.ndarray | None:
    """A finished run's features of `images` when the run's balancing strategy measures distances in
    them (space=features), else None; ConfigError naming the parameter when that run cannot give them."""
    run_id = feature_run_of(cfg.balance, cfg.balance_params)
    if run_id is None:
        return None
    return run_features(store or RunStore(), run_id, images, f"{cfg.balance}.feature_run")


def with_synthetic(pool: torch.Tensor, pool_y: np.ndarray, plan: BalancePlan) -> tuple[torch.Tensor, np.ndarray]:
    """The pool's images (on its device) and labels, followed by the plan's synthetic ones."""
    if not plan.synthetic:
        return pool, pool_y
    return (torch.cat([pool, to_device_tensors(plan.synthetic_x, pool.device)]),
            np.concatenate([pool_y, plan.synthetic_y]))


def optional_tensor(values: np.ndarray | None, device: torch.device | None = None) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(values, device=device)


def prepare(cfg: RunConfig, data_source: str | None = None, store: RunStore | None = None) -> Prepared:
    """`store`: the runs root a feature-space strategy's `feature_run` is looked up in (default: the
    default runs root)."""
    device = resolve_device(cfg.device)
    arrays = load_cifar10(data_source)
    label_set = read_label_set(store or RunStore(), cfg.label_set, len(arrays.y_train)) if cfg.label_set else None
    split = run_split(cfg, arrays.y_train, store, label_set)
    labeled = split.labeled_idx
    pool_x, pool_y = arrays.x_train[labeled], training_labels(arrays.y_train, label_set)[labeled]
    pool = to_device_tensors(pool_x, device)
    plan = build_balance_plan(cfg.balance, cfg.balance_params, pool_y, cfg.seed, NUM_CLASSES,
                              x=pool_x, features=balance_features(cfg, pool, store))
    test_x, test_y = arrays.x_test, arrays.y_test
    if cfg.test_size:
        keep = per_class_subset(test_y, cfg.test_size // NUM_CLASSES, seed=0)
        test_x, test_y = test_x[keep], test_y[keep]
    if len(split.val_idx):
        eval_x, eval_y, eval_split = arrays.x_train[split.val_idx], arrays.y_train[split.val_idx], "val"
    else:
        eval_x, eval_y, eval_split = test_x, test_y, "test"
    as_labels = lambda y: torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
    chain = AugmentChain(cfg.augment)
    if any(getattr(op, "needs_fit", False) for op in chain.ops):
        chain.fit(pool.float().div_(255))  # on the real images only
    train_x, train_y_np = with_synthetic(pool, pool_y, plan)
    summary = {**split.summary(), "n_synthetic": plan.synthetic,
               "synthetic_per_class": np.bincount(train_y_np[len(pool_y):], minlength=NUM_CLASSES).tolist()}
    return Prepared(
        cfg=cfg, device=device, train_x=train_x, train_y=as_labels(train_y_np),
        unlabeled_x=to_device_tensors(arrays.x_train[split.unlabeled_idx], device),
        unlabeled_y=as_labels(arrays.y_train[split.unlabeled_idx]),
        eval_x=to_device_tensors(eval_x, device), eval_y=as_labels(eval_y), eval_split=eval_split,
        test_x=to_device_tensors(test_x, device), test_y=as_labels(test_y),
        epoch_indices=plan.indices,
        sample_weights=optional_tensor(plan.sample_weights),
        class_weights=optional_tensor(plan.class_weights, device),
        logit_offsets=optional_tensor(plan.logit_offsets, device),
        focal_gamma=plan.focal_gamma,
        chain=chain,
        mean=torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
        std=torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1),
        data_origin=arrays.origin, split_summary=summary, synthetic=plan.synthetic,
        ldam_margins=optional_tensor(plan.ldam_margins, device), ldam_scale=plan.ldam_scale,
        drw_weights=optional_tensor(plan.drw_weights, device), drw_start=plan.drw_start)


def normalize(prep: Prepared, x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1] float -> model input. Chains that standardize themselves skip mean/std."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if prep.chain.normalizes:
        return x
    return (x - prep.mean) / prep.std


def model_input(prep: Prepared, x: torch.Tensor) -> torch.Tensor:
    """A training batch (uint8 or augmented [0,1] float) as the model takes it: normalized, and in
    channels_last when the run asks for it."""
    x = normalize(prep, x)
    if prep.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def init_from_training_images(model: torch.nn.Module, prep: Prepared) -> None:
    """Models that initialise from data (fastnet's whitening) see 5,000 of the run's training images,
    the same ones for every model of a run."""
    init = getattr(model, "init_from_data", None)
    if callable(init):
        pick = torch.randperm(prep.train_x.shape[0], generator=seeded_generator(prep.cfg.seed, INIT_SAMPLE))[:5000]
        init(normalize(prep, prep.train_x[pick.to(prep.device)]))


def epoch_order(prep: Prepared, seed: int, epoch: int) -> torch.Tensor:
    """Positions into prep.train_x for `epoch`, on the device: a permutation of the epoch's images,
    or draws with replacement by the balance plan's sample weights. Depends on (seed, epoch) only."""
    gen = seeded_generator(seed, EPOCH_ORDER, epoch)
    n = len(prep.epoch_indices)
    if prep.sample_weights is not None:
        picks = torch.multinomial(prep.sample_weights, n, replacement=True, generator=gen)
    else:
        picks = torch.randperm(n, generator=gen)
    return torch.as_tensor(prep.epoch_indices)[picks].to(prep.device)


def eval_transform(prep: Prepared, x_uint8: torch.Tensor) -> torch.Tensor:
    """Evaluation input: only the chain's deterministic normalizers (ZCA, standardization)."""
    x = x_uint8.float().div_(255)
    for op in prep.chain.ops:
        if getattr(op, "normalizes", False):
            x, _, _ = op(x, None, torch.Generator().manual_seed(0))
    return normalize(prep, x)
