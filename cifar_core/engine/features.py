"""Features of a finished run: its model's penultimate features (what its classifier head sees) of
given images, for the balancing strategies that measure distances in a learnt space (SMOTE and
cluster oversampling with space=features).

The run must be completed in the same runs root and is loaded by distillation's loader
(`distill.load_teacher`: the one checkpoint reader's rule for finished runs, `last.pt` else
`best.pt`, the weights its evaluation used, frozen in eval mode). Each image is given to that model
as the run's own evaluation gave it: through the run's fitted normalizing steps when its chain has
them (ZCA, per-image standardization), else standardized by the CIFAR mean and std.

Every problem (no such run, not finished, no readable checkpoint, no recognisable classifier head)
is a ConfigError that names the parameter which chose the run, so the run that asked fails before
it trains.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import CIFAR_MEAN, CIFAR_STD
from ..models import penultimate_features
from ..params import ConfigError
from ..runs import RunStore
from .checkpoints import finished_source
from .distill import Teacher, load_teacher

__all__ = ["check_feature_run", "load_feature_model", "run_features"]

FEATURE_BATCH = 500  # images per forward pass


def check_feature_run(store: RunStore, run_id: str, field: str) -> None:
    """ConfigError naming `field` unless `run_id` is a completed run of `store` with a checkpoint."""
    finished_source(store, run_id, field, "take features from itself", "take features")


def load_feature_model(store: RunStore, run_id: str, field: str) -> Teacher:
    """The finished run's model with its input normalization (distill's loader, asked as for a
    student without normalizing steps: the model then gets the run's own normalizers applied to
    [0, 1] images, or the mean/std standardization its chain relied on)."""
    check_feature_run(store, run_id, field)
    try:
        return load_teacher(store, run_id, student_augment=[])
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from None


def model_input(model: Teacher, x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the input the finished run's evaluation gave its model."""
    x = x_uint8.float().div_(255)
    if model.input_kind == "own":
        for op in model.normalizers:
            x, _, _ = op(x, None, None)
        return x
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def run_features(store: RunStore, run_id: str, images: torch.Tensor, field: str = "feature_run") -> np.ndarray:
    """(N, D) float32: the penultimate features of the finished run `run_id` for uint8 `images`
    (N, 3, H, W), computed on the images' device."""
    model = load_feature_model(store, run_id, field).to(images.device)
    parts = []
    try:
        for start in range(0, images.shape[0], FEATURE_BATCH):
            x = model_input(model, images[start:start + FEATURE_BATCH])
            parts.append(penultimate_features(model.model, x.contiguous(memory_format=torch.channels_last)).cpu())
    except ConfigError as exc:  # no classifier head to read the features from
        raise ConfigError(f"{field}: run {run_id}: {exc}") from None
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(parts).numpy().astype(np.float32)
