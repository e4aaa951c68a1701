"""Self-supervised pretext objectives: what a run learns from images alone, for a later run to start from
(`init_run`; engine/init_from.py then re-initialises the classifier head, which learned the pretext).

rotation (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"): every image of the step is shown at 0°, 90°, 180° and 270° (all four in the same batch, as
in the paper) and the model learns which rotation it sees. The images of a step are the labeled batch,
its labels ignored (with label_budget 0 that is every training image, so an epoch is a pass over the
training set), and with a label budget as many images again drawn from the unlabeled pool, each through
the run's augmentation chain as the labeled batch was. The rotation comes after the augmentation, on the
model input (a rotation by a multiple of 90° commutes with the per-channel normalization).

The model's own classifier head is the rotation classifier: its first 4 outputs are the rotation logits
and the other outputs are ignored. The first 4 rows of a linear layer are a 4-output linear layer on the
same features, so this is exactly a separate linear rotation head, and no model needs a change.

A pretext run's 10-way test accuracy is meaningless (the head learned rotations). Its results.json says
so (`pretext`, `pretext_note`) and adds what does measure it: `rotation_test_acc`, the rotation accuracy
on the test images, and `linear_probe`, a logistic regression (scikit-learn) fitted on the frozen
penultimate features of up to PROBE_IMAGES labeled training images and scored on the test images.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..models import penultimate_features
from .objectives import OBJECTIVES, Objective, StepResult, draw_unlabeled
from .prepare import Prepared, eval_transform, model_input
from .rng import seeded_generator
from .tricks import autocast_context

__all__ = ["ROTATIONS", "PROBE_IMAGES", "rotate_four", "rotation_accuracy", "linear_probe", "Rotation"]

ROTATIONS = 4          # 0°, 90°, 180°, 270° counter-clockwise: target k is a rotation by k × 90°
PROBE_IMAGES = 5000    # at most this many labeled training images fit the linear probe (a seeded draw)
PROBE_DRAWS = 90       # (seed, PROBE_DRAWS): which labeled images the probe fits on when there are more
FEATURE_BATCH = 1000
PRETEXT_NOTE = ("a self-supervised pretext run: its head learned to predict rotations, so test_acc and the "
                "other 10-class metrics are meaningless; rotation_test_acc and linear_probe measure it, and "
                "a run initialised from it (init_run) re-initialises the head")


def rotate_four(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4N, C, H, W) images and (4N,) targets: all N square images at 0°, then all at 90°, 180°, 270°
    (torch.rot90, counter-clockwise), image i at rotation k being row k·N + i; the memory format kept."""
    n = x.shape[0]
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    if x.is_contiguous(memory_format=torch.channels_last):
        rotated = rotated.contiguous(memory_format=torch.channels_last)
    targets = torch.arange(ROTATIONS, device=x.device).repeat_interleave(n)
    return rotated, targets


def rotation_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rotation classifier's logits: the first ROTATIONS outputs of the model's head."""
    return model(x)[:, :ROTATIONS].float()


@OBJECTIVES.register("rotation", description="self-supervised pretext (Gidaris et al. 2018): predict the "
                                             "rotation (0/90/180/270°) of every image, labels ignored")
class Rotation(Objective):
    pretext = "rotation"

    @classmethod
    def images_per_labeled(cls, cfg):
        return ROTATIONS * (2.0 if cfg.label_budget or cfg.label_set else 1.0)  # as many unlabeled as labeled

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model: torch.nn.Module | None = None  # the trained model, for the final measurements
        self.prep: Prepared | None = None
        self.record = None

    def setup(self, run):
        self.record = run.record
        run.record.update_status(pretext=self.pretext)

    def attach(self, prep):
        self.prep = prep

    def loss(self, model, batch, ctx):
        self.model = model
        images = [batch.x]
        n_labeled = batch.x.shape[0]
        if ctx.prep.unlabeled_x.shape[0]:
            _, unlabeled = draw_unlabeled(ctx.prep, n_labeled, ctx.rng)
            images.append(model_input(ctx.prep, ctx.prep.chain(unlabeled, None, ctx.rng)[0]))
        x = torch.cat(images) if len(images) > 1 else batch.x
        rotated, targets = rotate_four(x)
        logits = rotation_logits(model, rotated)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
        rotation_acc = (logits.detach().argmax(1) == targets).float().mean()
        # train_acc counts one prediction per labeled image (the loop divides by the labeled batch):
        # image i at rotation i mod 4, an unbiased share of the rotation predictions
        picked = torch.arange(n_labeled, device=x.device)
        picked = (picked % ROTATIONS) * x.shape[0] + picked
        return StepResult(loss, logits[picked], targets[picked], {"rotation_acc": rotation_acc})

    def results(self):
        out = {"pretext": self.pretext, "pretext_note": PRETEXT_NOTE}
        if self.model is None or self.prep is None:  # no step trained in this process
            return out
        model = getattr(self.model, "module", self.model)  # unwrap DistributedDataParallel
        was_training = model.training
        try:
            out["rotation_test_acc"] = rotation_accuracy(model, self.prep, self.prep.test_x)
            out["linear_probe"] = linear_probe(model, self.prep)
        finally:
            model.train(was_training)
        if self.cfg.ema_decay:
            out["linear_probe"]["weights"] = "the trained weights (not the EMA that init_run loads)"
        if self.record is not None:
            self.record.update_status(rotation_test_acc=out["rotation_test_acc"],
                                      linear_probe_acc=out["linear_probe"]["test_acc"])
        return out


def _batches(prep: Prepared, x_uint8: torch.Tensor):
    """Evaluation inputs of `x_uint8` in batches (the chain's normalizers only, as evaluation gives them)."""
    for start in range(0, x_uint8.shape[0], FEATURE_BATCH):
        x = eval_transform(prep, x_uint8[start:start + FEATURE_BATCH])
        yield x.contiguous(memory_format=torch.channels_last) if prep.cfg.channels_last else x


@torch.no_grad()
def rotation_accuracy(model: torch.nn.Module, prep: Prepared, x_uint8: torch.Tensor) -> float:
    """The share of rotations the model names right over the 4 rotations of every image (eval mode)."""
    model.eval()
    correct = total = 0
    for x in _batches(prep, x_uint8):
        rotated, targets = rotate_four(x)
        with autocast_context(prep.cfg, prep.device):
            logits = rotation_logits(model, rotated)
        correct += int((logits.argmax(1) == targets).sum().item())
        total += targets.shape[0]
    return correct / max(1, total)


@torch.no_grad()
def frozen_features(model: torch.nn.Module, prep: Prepared, x_uint8: torch.Tensor) -> np.ndarray:
    """(N, D) float32 penultimate features (what the head sees) of uint8 images, in eval mode."""
    model.eval()
    parts = []
    for x in _batches(prep, x_uint8):
        with autocast_context(prep.cfg, prep.device):
            parts.append(penultimate_features(model, x).cpu())
    return torch.cat(parts).numpy().astype(np.float32)


def linear_probe(model: torch.nn.Module, prep: Prepared) -> dict:
    """Fit a logistic regression on the frozen features of the run's labeled training images (at most
    PROBE_IMAGES, a seeded draw; synthetic ones left out), standardized; score it on the test images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.time()
    n_real = prep.train_x.shape[0] - prep.synthetic
    picked = torch.arange(n_real)
    if n_real > PROBE_IMAGES:
        picked = torch.randperm(n_real, generator=seeded_generator(prep.cfg.seed, PROBE_DRAWS))[:PROBE_IMAGES]
    picked = picked.to(prep.device)
    train_features = frozen_features(model, prep, prep.train_x[picked])
    train_labels = prep.train_y[picked].cpu().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_features, train_labels)
    test_acc = float(probe.score(frozen_features(model, prep, prep.test_x), prep.test_y.cpu().numpy()))
    return {"test_acc": test_acc, "train_images": int(picked.shape[0]), "features": int(train_features.shape[1]),
            "classifier": "scikit-learn StandardScaler + LogisticRegression (C=1, lbfgs)",
            "seconds": round(time.time() - started, 2)}
