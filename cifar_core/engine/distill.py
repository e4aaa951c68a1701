"""Knowledge distillation from a finished run: the teacher, its checks, and the losses.

The teacher is any completed run in the same runs root. Its best checkpoint (else its last) is loaded
with ``torch.load(weights_only=True)``; when the run kept an EMA of its weights, the EMA weights are
the ones it was evaluated with, so they teach. The teacher sees exactly the augmented batch the
student sees (after the same mean/std or per-image standardization), in eval mode, without gradients.

Losses (DeiT, Touvron et al. 2021), combined by the trainer as
``(1 - alpha) * true-label loss + alpha * distillation loss``:

* hard: cross-entropy to the teacher's top class (with alpha 0.5, DeiT's plain average);
* soft: KL(teacher || student) of the temperature-softened distributions, times T² so that its
  gradients keep their scale when T changes (Hinton et al. 2015).

No distillation token: the distillation target is applied to the student's one classifier output.
That works for every student (CNNs too), keeps a distilled model the same architecture as a plain one
(so the two compare at equal parameters and export the same way), and a token unused in plain
training would be a parameter without gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import AUGMENTATIONS, AugmentChain
from ..models import count_params, create_model
from ..params import ConfigError
from ..runs import RunRecord, RunStore

CHECKPOINT_ORDER = ("best", "last")


def _normalizers(augment: list) -> list[str]:
    """Names of the chain's normalizing steps (they replace the engine's mean/std normalization)."""
    names = []
    for step in augment or []:
        name = step["name"] if isinstance(step, dict) else step
        if "normalize" in AUGMENTATIONS.get(name).tags:
            names.append(name)
    return names


def teacher_checkpoint(record: RunRecord) -> str | None:
    """'best' or 'last' (the first that exists), or None."""
    return next((which for which in CHECKPOINT_ORDER if record.checkpoint_path(which).exists()), None)


def teacher_candidates(store: RunStore) -> list[dict]:
    """Completed runs with a checkpoint, newest first: [{run_id, name, model, test_acc}]."""
    out = []
    for record in store.records():
        status = record.status()
        if status.get("state") != "completed" or teacher_checkpoint(record) is None:
            continue
        config = record.config_dict() or {}
        out.append({"run_id": record.run_id, "name": config.get("name", ""), "model": config.get("model", "?"),
                    "test_acc": status.get("test_acc")})
    return sorted(out, key=lambda c: c["run_id"], reverse=True)


def check_teacher_run(store: RunStore, run_id: str, student_run_id: str | None = None) -> RunRecord:
    """The teacher's record, or ConfigError saying why it cannot teach (missing, unfinished, no
    checkpoint, itself)."""
    record = store.record(run_id)  # ConfigError for ids that are not plain names
    if run_id == student_run_id:
        raise ConfigError(f"teacher_run {run_id}: a run cannot be its own teacher")
    if not record.exists():
        raise ConfigError(f"teacher_run {run_id}: no such run in {store.root} (the teacher must be a "
                          "completed run in the same runs folder)")
    state = record.state()
    if state != "completed":
        raise ConfigError(f"teacher_run {run_id} is {state}, not completed: distil only from a finished run")
    if teacher_checkpoint(record) is None:
        raise ConfigError(f"teacher_run {run_id} has no checkpoint (best.pt or last.pt) to load")
    return record


def _teacher_weights(ckpt: dict) -> tuple[dict, str]:
    """The state dict the teacher run was evaluated with: its EMA when it kept one."""
    ema = ckpt.get("ema")
    if ema:
        prefix = "module."
        return {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}, "ema"
    return ckpt["model"], "model"


def _teacher_input_kind(run_id: str, teacher_norm: list[str], student_norm: list[str]) -> str:
    """'same': the student's input as it is; 'per_image': standardize the augmented [0, 1] batch."""
    if "zca" in teacher_norm:
        raise ConfigError(f"teacher_run {run_id} was trained with zca whitening fitted on its own training "
                          "images; distillation from such a run is not supported")
    if teacher_norm == student_norm:
        return "same"
    if not student_norm and teacher_norm == ["per_image_standardization"]:
        return "per_image"
    raise ConfigError(f"teacher_run {run_id} normalizes its inputs differently (teacher: "
                      f"{', '.join(teacher_norm) or 'mean/std'}; student: {', '.join(student_norm) or 'mean/std'}): "
                      "use the same normalizing steps in both chains")


_PER_IMAGE = AugmentChain(["per_image_standardization"]).ops[0]


@dataclass
class Teacher:
    model: nn.Module
    input_kind: str  # "same" | "per_image"
    info: dict       # recorded in the run's status.json and results.json

    def to(self, device) -> "Teacher":
        # channels_last: the teacher only runs forward passes, and convolutions run ~1.4x faster in it
        # on the CPU (oneDNN) as on CUDA; layers without 4-D weights are unaffected
        self.model.to(device, memory_format=torch.channels_last)
        return self

    @torch.no_grad()
    def logits(self, x_augmented: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
        """Teacher logits for the batch the student saw: x_augmented in [0, 1] (before the engine's
        normalization), x_student the student's input."""
        if self.input_kind == "per_image":
            x_student, _, _ = _PER_IMAGE(x_augmented, None, None)
        return self.model(x_student.contiguous(memory_format=torch.channels_last)).float()


def load_teacher(store: RunStore, run_id: str, student_augment: list,
                 student_run_id: str | None = None) -> Teacher:
    """Check the teacher run, build its model from the checkpoint's model_name/model_params, load the
    weights it was evaluated with, and freeze it in eval mode (on the CPU; move it with .to)."""
    record = check_teacher_run(store, run_id, student_run_id)
    which = teacher_checkpoint(record)
    config = record.config_dict() or {}
    input_kind = _teacher_input_kind(run_id, _normalizers(config.get("augment")), _normalizers(student_augment))
    ckpt = torch.load(record.checkpoint_path(which), map_location="cpu", weights_only=True)
    try:
        model = create_model(ckpt["model_name"], ckpt["model_params"])
        state, weights = _teacher_weights(ckpt)
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"teacher_run {run_id}: its {which}.pt does not load as a model: {exc}") from None
    model.eval().requires_grad_(False)
    info = {"run_id": run_id, "checkpoint": f"{which}.pt", "weights": weights, "step": ckpt.get("step"),
            "model": ckpt["model_name"], "model_params": ckpt["model_params"], "params": count_params(model),
            "test_acc": record.status().get("test_acc")}
    return Teacher(model, input_kind, info)


def distillation_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """hard: CE to the teacher's argmax; soft: T² · KL(softmax(t/T) || softmax(s/T)), batch mean."""
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(1))
    if kind == "soft":
        log_student = F.log_softmax(student_logits / temperature, dim=1)
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return kl * temperature ** 2
    raise ConfigError(f"distill: unknown kind {kind!r} (choose from: hard, soft)")
