"""Training objectives: what the loss of a training step is.

The loop hands an objective the model and the step's labeled batch (already augmented) and gets back
a `StepResult`: the loss to minimise, the logits and targets its train accuracy is counted on, and
extra metrics (averaged over the log window into the train rows of metrics.jsonl). It never knows
which objective it runs. An objective can

* set itself up once with the run's record and store (`setup`, before the data is loaded: a
  teacher to distil from is checked and loaded there, so a bad one fails at once);
* draw more images each step, e.g. from the unlabeled pool `prep.unlabeled_x` with
  `draw_unlabeled`, using the step's generator `ctx.rng` (seeded from (seed, step), so a resumed run
  draws the same);
* keep state across steps and checkpoints (`state_dict` / `load_state_dict`).

Entries live in OBJECTIVES, a `params.Registry` like the models' and schedules': the next objectives
(FixMatch, MixMatch) declare their options as `Param`s there, and the app and CLI can list them.
`objective_for(cfg)` picks the run's entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..params import ConfigError, Registry
from ..runs import RunRecord, RunStore
from .distill import EnsembleTeacher, Teacher, distillation_loss, load_teachers
from .prepare import Prepared

OBJECTIVES = Registry("objective")


@dataclass
class RunContext:
    """What an objective may use to set itself up: the run's config, record and store."""

    cfg: RunConfig
    record: RunRecord
    store: RunStore


@dataclass
class LabeledBatch:
    """One step's labeled images, augmented by the run's chain."""

    x_uint8: torch.Tensor      # (N,3,32,32) after the batch hooks (alternating flips), before augmentation
    x_augmented: torch.Tensor  # the chain's output, [0, 1] float
    x: torch.Tensor            # the model input (normalized; channels_last when the run asks)
    y: torch.Tensor            # (N,) int64 labels
    y_soft: torch.Tensor       # (N, C) targets from the chain (mixing augmentations blend them)


@dataclass
class StepContext:
    prep: Prepared
    step: int                 # optimizer steps done before this one
    rng: torch.Generator      # the objective's own draws this step, seeded from (seed, step)
    total_steps: int = 0      # the run's optimizer steps (0: unknown)

    @property
    def progress(self) -> float:
        """The share of training done before this step (0 when the total is unknown)."""
        return self.step / self.total_steps if self.total_steps else 0.0


@dataclass
class StepResult:
    loss: torch.Tensor        # scalar to minimise
    logits: torch.Tensor      # on the labeled batch: train accuracy counts these ...
    targets: torch.Tensor     # ... against these, (N, C) soft or (N,) class labels
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # scalars, logged per window

    def correct(self) -> int:
        labels = self.targets.argmax(1) if self.targets.dim() == 2 else self.targets
        return int((self.logits.argmax(1) == labels).sum().item())

    def metric_values(self) -> dict[str, float]:
        return {name: v.item() if isinstance(v, torch.Tensor) else float(v) for name, v in self.metrics.items()}


class Objective:
    """Base of the registered objectives: override `loss`, and the other hooks where needed."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @classmethod
    def images_per_labeled(cls, cfg: RunConfig) -> float:
        """Images a step trains on per labeled image of its batch, forward-only passes counted as a
        third (the run's duration estimate scales the supervised step by it)."""
        return 1.0

    def setup(self, run: RunContext) -> None:
        """Once per run, before the data is loaded."""

    def attach(self, prep: Prepared) -> None:
        """Once the data is on the device (move own models there, check the unlabeled pool)."""

    def loss(self, model: torch.nn.Module, batch: LabeledBatch, ctx: StepContext) -> StepResult:
        """The step's loss; runs under the run's autocast, the model in train mode."""
        raise NotImplementedError

    def results(self) -> dict:
        """Entries added to results.json."""
        return {}

    def state_dict(self) -> dict:
        """What the checkpoint keeps (under "objective")."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def supervised_loss(prep: Prepared, logits: torch.Tensor, targets: torch.Tensor,
                    ctx: StepContext | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with the balance plan's class weights (deferred ones from their start, by the
    step's progress in `ctx`), logit offsets (Balanced Softmax, logit adjustment), LDAM margins or
    focal exponent, and the run's label smoothing. `targets`: (N,) labels or (N, C) soft targets
    (mixing augmentations blend them); every combination accepts both. `reduction` "none": one loss
    per image (data selection ranks images by it)."""
    logits, smoothing = logits.float(), prep.cfg.label_smoothing
    if prep.logit_offsets is not None:
        logits = logits + prep.logit_offsets
        if smoothing:
            targets, smoothing = smoothed_by_offsets(targets, smoothing, prep.logit_offsets), 0.0
    if prep.ldam_margins is not None:
        logits = ldam_logits(logits, targets, prep.ldam_margins, prep.ldam_scale)
    weight = class_weights_at(prep, ctx)
    if prep.focal_gamma > 0:
        return focal_loss(logits, targets, prep.focal_gamma, weight, smoothing, reduction)
    return F.cross_entropy(logits, targets, weight=weight, label_smoothing=smoothing, reduction=reduction)


def smoothed_by_offsets(targets: torch.Tensor, smoothing: float, offsets: torch.Tensor) -> torch.Tensor:
    """Label smoothing for a loss that adds logit offsets o (Balanced Softmax: the log prior): the
    smoothed mass goes to the classes in proportion to softmax(o), not uniformly. Uniform smoothing
    asks the *offset* softmax for at least ε/K of every class on every image, so the raw logits, the
    ones used at test time, must lift the rarest classes by their whole log-prior gap: on CIFAR-10-LT
    (ρ = 100) with ε = 0.2 the rarest class then outscored the true one on most majority-class images
    (53% test accuracy, 0% recall on the two largest classes). Spread by softmax(o), the smoothed
    targets ask the raw logits for a uniform floor, as plain smoothing does without offsets."""
    soft = targets if targets.dim() == 2 else F.one_hot(targets, offsets.shape[0]).float()
    return soft * (1.0 - smoothing) + smoothing * offsets.softmax(0)


def class_weights_at(prep: Prepared, ctx: StepContext | None) -> torch.Tensor | None:
    """The loss's class weights at this step: the plan's, or its deferred re-weighting (DRW) weights
    once `drw_start` of training is done (Cao et al. 2019: epoch 160 of 200)."""
    if prep.drw_weights is not None and ctx is not None and ctx.progress >= prep.drw_start:
        return prep.drw_weights
    return prep.class_weights


def ldam_logits(logits: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, scale: float) -> torch.Tensor:
    """LDAM (Cao et al. 2019): s · (z - Δ ⊙ t), the true class's logit lowered by its margin Δ_y; with
    soft targets each class's logit is lowered by its margin times its share of the target."""
    soft = targets if targets.dim() == 2 else F.one_hot(targets, logits.shape[1])
    return scale * (logits - margins * soft.to(logits.dtype))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float, weight: torch.Tensor | None = None,
               label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss with soft targets (mixing augmentations blend labels): the mean over the batch
    of -Σ_c w_c · t_c · (1 - p_c)^γ · log p_c. Written here because torchvision's focal loss is the
    sigmoid (one-vs-all) form; with γ = 0 this is exactly F.cross_entropy (a test checks it)."""
    n_classes = logits.shape[1]
    if targets.dim() == 1:
        targets = F.one_hot(targets, n_classes).float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / n_classes
    log_p = F.log_softmax(logits, dim=1)
    terms = -targets * (1.0 - log_p.exp()).pow(gamma) * log_p
    if weight is not None:
        terms = terms * weight
    per_image = terms.sum(dim=1)
    return per_image if reduction == "none" else per_image.mean()


def draw_unlabeled(prep: Prepared, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions into prep.unlabeled_x, uint8 images): `n` draws with replacement, from `rng`."""
    pool = prep.unlabeled_x.shape[0]
    if pool == 0:
        raise ConfigError("this objective needs unlabeled images: set label_budget below the number "
                          "of training images")
    positions = torch.randint(pool, (n,), generator=rng).to(prep.device)
    return positions, prep.unlabeled_x[positions]


@OBJECTIVES.register("supervised", description="cross-entropy on the augmented labeled batch")
class Supervised(Objective):
    def loss(self, model, batch, ctx):
        logits = model(batch.x)
        return StepResult(supervised_loss(ctx.prep, logits, batch.y_soft, ctx), logits, batch.y_soft)


@OBJECTIVES.register("distill", description="(1 - alpha) · cross-entropy + alpha · distillation from a "
                                            "finished run (engine.distill)")
class Distill(Objective):
    teacher: Teacher | EnsembleTeacher

    def setup(self, run):
        self.teacher = load_teachers(run.store, self.cfg.teacher_run, self.cfg.augment, run.record.run_id)
        run.record.update_status(teacher=self.teacher.info)

    def attach(self, prep):
        self.teacher.to(prep.device)

    def loss(self, model, batch, ctx):
        cfg = self.cfg
        logits = model(batch.x)
        ce = supervised_loss(ctx.prep, logits, batch.y_soft, ctx)
        # the teacher sees the same augmented batch
        kd = distillation_loss(cfg.distill, logits.float(), self.teacher.logits(batch.x_augmented, batch.x),
                               cfg.distill_temperature)
        loss = (1 - cfg.distill_alpha) * ce + cfg.distill_alpha * kd
        return StepResult(loss, logits, batch.y_soft, {"distill_loss": kd})

    def results(self):
        cfg = self.cfg
        return {"teacher": {**self.teacher.info, "distill": cfg.distill, "alpha": cfg.distill_alpha,
                            "temperature": cfg.distill_temperature}}


def objective_name(cfg: RunConfig) -> str:
    """The OBJECTIVES entry a run trains with: its `objective`, or the one that distillation or data
    selection (select_keep below 1, engine/selection.py) turn the supervised objective into."""
    if cfg.distill != "none":
        return "distill"
    if cfg.select_keep < 1.0:
        return "proxy_select"
    return cfg.objective


def objective_class(cfg: RunConfig) -> type[Objective]:
    return OBJECTIVES.get(objective_name(cfg)).fn


def objective_for(cfg: RunConfig) -> Objective:
    """The run's objective, built from OBJECTIVES."""
    return OBJECTIVES.build(objective_name(cfg), {}, cfg=cfg)
