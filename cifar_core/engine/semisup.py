"""Semi-supervised objectives: learn from the labeled batch and from the unlabeled pool that
`label_budget` leaves (`prep.unlabeled_x`, uint8 on the device).

Each step draws μ·B unlabeled images (`ssl_unlabeled_ratio` times the labeled batch) from the step's
generator, so a resumed run draws the same, and augments them on the device with the project's
augmentation chain:

* pseudo_label (Lee 2013, with a confidence threshold): cross-entropy on a weak view of the
  unlabeled images, towards the model's own (detached) prediction where it is confident (≥ τ);
* fixmatch (Sohn et al. 2020): the pseudo-label comes from the weak view (flip + pad-crop) where it is
  confident; cross-entropy on a strong view (RandAugment + Cutout) of the same images;
* flexmatch (Zhang et al. 2021): FixMatch with a threshold per class, τ · M(β_c), β_c how many pool
  images are confidently predicted as class c (curriculum pseudo-labelling); the latest confident
  prediction of every pool image is the objective's state, kept in checkpoints;
* mixmatch (Berthelot et al. 2019): labels guessed by averaging the predictions of K weak views and
  sharpening them (temperature T), MixUp of labeled and unlabeled images together, an L2 loss on the
  unlabeled part.

fixmatch and flexmatch run the labeled batch and both views in one forward pass, as the paper does; with
`ssl_weak_pass` "separate" the weak view goes first through a pass without gradients: about a third less
compute a step, but BatchNorm normalizes the weak images on their own, and on the CPU benchmark that made
the pseudo-labels far worse (bench/README.md), so the paper's joint pass is the default.

The unlabeled loss weight grows linearly over the first `ssl_rampup` of training. Live metrics (train
rows of metrics.jsonl): unlabeled_loss, unlabeled_weight, mask_rate (share of the unlabeled images
trained on), pseudo_acc (accuracy of those images' pseudo-labels against their true labels,
`prep.unlabeled_y`: monitoring only, never in a loss; absent from a step that trains on none),
flexmatch's threshold_mean. results.json gets `pseudo_labels`: running totals over the whole run
(checkpointed, so a resumed run counts on), per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import AugmentChain
from ..augment.base import draw_beta
from ..config import RunConfig
from ..data import CLASSES, NUM_CLASSES
from ..params import ConfigError
from .objectives import OBJECTIVES, LabeledBatch, Objective, StepContext, StepResult, draw_unlabeled, supervised_loss
from .prepare import Prepared, model_input

# FixMatch's views. Weak: a random 4-pixel reflect-padded crop and a horizontal flip.
WEAK_VIEW = ({"name": "random_crop", "params": {"padding": 4, "pad_mode": "reflect"}, "p": 1.0},
             {"name": "hflip", "params": {}, "p": 0.5})
# Strong: the weak view, RandAugment (2 ops; FixMatch draws each op's magnitude at random, the
# project's op takes one: bin 15 of 30 is the middle of that range) and one 16-pixel Cutout hole.
STRONG_VIEW = WEAK_VIEW + ({"name": "rand_augment", "params": {"num_ops": 2, "magnitude": 15}, "p": 1.0},
                           {"name": "cutout", "params": {"size": 16}, "p": 1.0})


def view_input(prep: Prepared, chain: AugmentChain, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A view of uint8 images as the model takes it: `chain`'s augmentation, then the run chain's
    normalizing steps (ZCA, standardization: the model was trained behind them), then model_input."""
    x, _, _ = chain(images, None, gen)
    for op in prep.chain.ops:
        if op.normalizes:
            x, _, _ = op(x, None, gen)
    return model_input(prep, x)


def pseudo_accuracy(pseudo_labels: torch.Tensor, mask: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor | None:
    """The share of the masked images whose pseudo-label is their true label; None when none is masked."""
    if not bool(mask.any()):
        return None
    return (pseudo_labels[mask] == true_labels[mask]).float().mean()


def flexmatch_thresholds(predictions: torch.Tensor, num_classes: int, threshold: float) -> torch.Tensor:
    """FlexMatch's per-class thresholds τ · M(β_c), M(x) = x / (2 − x) (the convex mapping).
    `predictions`: each pool image's latest confident prediction, -1 for one never confidently
    predicted. β_c = σ_c / max(max_c σ_c, unused), σ_c the images predicted as class c: with the
    warm-up, the unused images count in the normalizer, so thresholds rise only as the pool gets used."""
    counts = torch.bincount(predictions + 1, minlength=num_classes + 1).float()  # [unused, σ_0, σ_1, ...]
    unused, sigma = counts[0], counts[1:]
    beta = sigma / torch.maximum(sigma.max(), unused).clamp(min=1.0)
    return threshold * beta / (2.0 - beta)


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening: p^(1/T), renormalized over the classes."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def mixmatch_mix(x: torch.Tensor, targets: torch.Tensor, lam: float,
                 partners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of every image (and target) with its partner: λ' · a + (1 − λ') · b, λ' = max(λ, 1 − λ), so
    each mix stays closer to its own image (and the labeled part stays mostly labeled). Hand-written:
    the augment registry's mixup mixes within a chain's batch, here labeled and unlabeled images mix
    with the guessed labels as targets."""
    lam = max(lam, 1.0 - lam)
    return (lam * x + (1.0 - lam) * x[partners],
            lam * targets + (1.0 - lam) * targets[partners])


class PseudoLabelTotals:
    """Running totals of the pseudo-labels trained on (on the device: no sync per step)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(NUM_CLASSES, dtype=torch.int64, device=device)   # pseudo-labels per class
        self.correct = torch.zeros(NUM_CLASSES, dtype=torch.int64, device=device)  # ... that were right
        self.seen = torch.zeros((), dtype=torch.int64, device=device)              # unlabeled images drawn

    def add(self, pseudo_labels: torch.Tensor, mask: torch.Tensor, true_labels: torch.Tensor) -> None:
        kept = pseudo_labels[mask]
        self.counts += torch.bincount(kept, minlength=NUM_CLASSES)
        self.correct += torch.bincount(kept[kept == true_labels[mask]], minlength=NUM_CLASSES)
        self.seen += mask.shape[0]

    def summary(self) -> dict:
        counts, correct = self.counts.tolist(), self.correct.tolist()
        masked, seen = sum(counts), int(self.seen)
        return {"scope": "running totals over the run's steps",
                "images": seen, "masked": masked,
                "mask_rate": masked / seen if seen else None,
                "pseudo_acc": sum(correct) / masked if masked else None,
                "per_class_counts": dict(zip(CLASSES, counts)),
                "per_class_acc": {name: (c / n if n else None) for name, c, n in zip(CLASSES, correct, counts)}}

    def state_dict(self) -> dict:
        return {"counts": self.counts, "correct": self.correct, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        for name in ("counts", "correct", "seen"):
            setattr(self, name, state[name].to(getattr(self, name).device))


class SemiSupervised(Objective):
    """What the semi-supervised objectives share: unlabeled draws, the ramped weight, the monitoring."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.weak = AugmentChain(list(WEAK_VIEW))
        self.totals = PseudoLabelTotals()

    def attach(self, prep):
        if prep.unlabeled_x.shape[0] == 0:
            raise ConfigError(f"objective {self.cfg.objective} needs unlabeled images: set label_budget below the "
                              "number of training images (e.g. --label-budget 250 or 4000)")
        self.totals = PseudoLabelTotals(prep.device)

    def draw(self, batch: LabeledBatch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions into the pool, uint8 images, their true labels): μ times the labeled batch."""
        positions, images = draw_unlabeled(ctx.prep, self.cfg.ssl_unlabeled_ratio * batch.x.shape[0], ctx.rng)
        return positions, images, ctx.prep.unlabeled_y[positions]

    def ramped(self, weight: float, ctx: StepContext) -> float:
        """`weight` times the linear ramp-up over the first ssl_rampup of training."""
        rampup = self.cfg.ssl_rampup
        return weight * min(1.0, ctx.progress / rampup) if rampup else weight

    def monitor(self, pseudo_labels: torch.Tensor, mask: torch.Tensor, true_labels: torch.Tensor) -> dict:
        """The step's mask_rate and pseudo_acc; adds them to the running totals."""
        self.totals.add(pseudo_labels, mask, true_labels)
        metrics = {"mask_rate": mask.float().mean()}
        accuracy = pseudo_accuracy(pseudo_labels, mask, true_labels)
        if accuracy is not None:
            metrics["pseudo_acc"] = accuracy
        return metrics

    def results(self):
        return {"pseudo_labels": self.totals.summary()}

    def state_dict(self):
        return {"totals": self.totals.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.totals.load_state_dict(state["totals"])


class Thresholded(SemiSupervised):
    """Cross-entropy towards confident pseudo-labels of the weak view, on the trained view (the weak
    view itself, or a strong one), all three batches in one forward pass (BatchNorm sees them together)."""

    strong: AugmentChain | None = None  # None: train on the weak view
    views = 1  # unlabeled views in the forward pass: the weak one (and the strong one)

    @classmethod
    def images_per_labeled(cls, cfg):
        if cls.views == 2 and cfg.ssl_weak_pass == "separate":  # the weak view only forward, a third
            return 1.0 + cfg.ssl_unlabeled_ratio * (1.0 + 1.0 / 3.0)
        return 1.0 + cls.views * cfg.ssl_unlabeled_ratio

    def thresholds(self, pseudo_labels: torch.Tensor) -> torch.Tensor | float:
        """Each image's threshold, by its pseudo-label."""
        return self.cfg.ssl_threshold

    def observe(self, positions: torch.Tensor, confidence: torch.Tensor, pseudo_labels: torch.Tensor) -> None:
        """After the step's mask: keep what the objective tracks across steps."""

    def forward(self, model, labeled_x: torch.Tensor, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """[labeled logits, weak view's, (strong view's)]: one pass over all of them, or with
        ssl_weak_pass separate the weak view first in a pass of its own without gradients."""
        if len(views) == 2 and self.cfg.ssl_weak_pass == "separate":
            with torch.no_grad():
                weak = model(views[0])
            labeled, strong = model(torch.cat([labeled_x, views[1]])).split([labeled_x.shape[0], views[1].shape[0]])
            return [labeled, weak, strong]
        logits = model(torch.cat([labeled_x, *views]))
        return list(logits.split([labeled_x.shape[0]] + [view.shape[0] for view in views]))

    def loss(self, model, batch, ctx):
        prep = ctx.prep
        positions, images, true_labels = self.draw(batch, ctx)
        views = [view_input(prep, self.weak, images, ctx.rng)]
        if self.strong is not None:
            views.append(view_input(prep, self.strong, images, ctx.rng))
        labeled, *unlabeled = self.forward(model, batch.x, views)
        confidence, pseudo_labels = unlabeled[0].detach().float().softmax(1).max(1)
        mask = confidence >= self.thresholds(pseudo_labels)
        per_image = F.cross_entropy(unlabeled[-1].float(), pseudo_labels, reduction="none")
        unlabeled_loss = (per_image * mask).mean()
        self.observe(positions, confidence, pseudo_labels)
        weight = self.ramped(self.cfg.ssl_weight, ctx)
        loss = supervised_loss(prep, labeled, batch.y_soft, ctx) + weight * unlabeled_loss
        metrics = {"unlabeled_loss": unlabeled_loss, "unlabeled_weight": weight,
                   **self.monitor(pseudo_labels, mask, true_labels)}
        return StepResult(loss, labeled, batch.y_soft, metrics)


@OBJECTIVES.register("pseudo_label", description="cross-entropy on the labeled batch + ssl_weight · cross-entropy "
                                                 "towards the model's own confident (≥ ssl_threshold) predictions "
                                                 "on a weak view of unlabeled images (Lee 2013)")
class PseudoLabel(Thresholded):
    pass


@OBJECTIVES.register("fixmatch", description="FixMatch (Sohn et al. 2020): confident pseudo-labels of a weak view "
                                             "(flip + crop) train a strong view (RandAugment + Cutout)")
class FixMatch(Thresholded):
    views = 2

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.strong = AugmentChain(list(STRONG_VIEW))


@OBJECTIVES.register("flexmatch", description="FlexMatch (Zhang et al. 2021): FixMatch with per-class thresholds "
                                              "that follow how many pool images each class confidently claims")
class FlexMatch(FixMatch):
    predictions: torch.Tensor  # (M,) each pool image's latest confident prediction, -1: none yet

    def attach(self, prep):
        super().attach(prep)
        self.predictions = torch.full((prep.unlabeled_x.shape[0],), -1, dtype=torch.int64, device=prep.device)

    def class_thresholds(self) -> torch.Tensor:
        return flexmatch_thresholds(self.predictions, NUM_CLASSES, self.cfg.ssl_threshold)

    def thresholds(self, pseudo_labels):
        self.step_thresholds = self.class_thresholds()
        return self.step_thresholds[pseudo_labels]

    def observe(self, positions, confidence, pseudo_labels):
        # the learning effect counts predictions above the fixed τ (the paper's σ_c). An image drawn
        # twice in a step keeps the larger class index: a scatter with one deterministic winner (a plain
        # index assignment leaves the winner undefined on CUDA, and a resumed run must match).
        confident = confidence >= self.cfg.ssl_threshold
        self.predictions.scatter_reduce_(0, positions[confident], pseudo_labels[confident], reduce="amax",
                                         include_self=False)

    def loss(self, model, batch, ctx):
        result = super().loss(model, batch, ctx)
        result.metrics["threshold_mean"] = self.step_thresholds.mean()
        return result

    def results(self):
        out = super().results()
        out["pseudo_labels"]["class_thresholds"] = dict(zip(CLASSES, self.class_thresholds().tolist()))
        return out

    def state_dict(self):
        return {**super().state_dict(), "predictions": self.predictions}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state:
            self.predictions = state["predictions"].to(self.predictions.device)


@OBJECTIVES.register("mixmatch", description="MixMatch (Berthelot et al. 2019): labels guessed from K weak views, "
                                             "sharpened, MixUp of labeled and unlabeled images, L2 loss on the "
                                             "unlabeled part")
class MixMatch(SemiSupervised):
    @classmethod
    def images_per_labeled(cls, cfg):
        guesses = cfg.mixmatch_k * cfg.ssl_unlabeled_ratio  # forward-only label guesses, then trained on
        return 1.0 + guesses + guesses / 3

    def guess_labels(self, model: torch.nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
        """The sharpened mean of the model's predictions on the K views (no gradient through it)."""
        with torch.no_grad():
            probs = model(torch.cat(views)).float().softmax(1)
        mean = probs.view(len(views), -1, probs.shape[1]).mean(0)
        return sharpen(mean, self.cfg.mixmatch_temperature)

    def loss(self, model, batch, ctx):
        cfg, prep = self.cfg, ctx.prep
        _, images, true_labels = self.draw(batch, ctx)
        views = [view_input(prep, self.weak, images, ctx.rng) for _ in range(cfg.mixmatch_k)]
        guessed = self.guess_labels(model, views)
        n_labeled = batch.x.shape[0]
        x = torch.cat([batch.x, *views])
        targets = torch.cat([batch.y_soft.float(), guessed.repeat(cfg.mixmatch_k, 1)])
        lam = float(draw_beta(ctx.rng, 1, cfg.mixmatch_alpha)) if cfg.mixmatch_alpha > 0 else 1.0
        partners = torch.randperm(x.shape[0], generator=ctx.rng).to(x.device)
        mixed_x, mixed_targets = mixmatch_mix(x, targets, lam, partners)
        if cfg.channels_last:
            mixed_x = mixed_x.contiguous(memory_format=torch.channels_last)
        labeled, unlabeled = model(mixed_x).split([n_labeled, x.shape[0] - n_labeled])
        unlabeled_loss = F.mse_loss(unlabeled.float().softmax(1), mixed_targets[n_labeled:])
        weight = self.ramped(cfg.mixmatch_weight, ctx)
        loss = supervised_loss(prep, labeled, mixed_targets[:n_labeled], ctx) + weight * unlabeled_loss
        every = torch.ones_like(true_labels, dtype=torch.bool)  # no threshold: every guess is trained on
        metrics = {"unlabeled_loss": unlabeled_loss, "unlabeled_weight": weight,
                   **self.monitor(guessed.argmax(1), every, true_labels)}
        return StepResult(loss, labeled, mixed_targets[:n_labeled], metrics)
