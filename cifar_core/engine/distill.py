"""Knowledge distillation from a finished run: the teacher, its checks, and the losses.

The teacher is any completed run in the same runs root, read through the one checkpoint reader
(`checkpoints.read_checkpoint`) with its rule for finished runs: `last.pt`, the weights its test report
measured, else `best.pt` (the teacher info records which file, the weights and why a file was skipped).
Those are the weights the run was evaluated with: its EMA when it kept one. The teacher sees exactly
the augmented batch the student sees, in eval mode, without gradients: as the student's input when
both chains normalize the same way, else, when the student's chain has no normalizing step, the
augmented [0, 1] batch with the teacher's own normalizers applied (per-image standardization, or
its ZCA whitening as fitted on its training images and saved in its checkpoint).

Losses (DeiT, Touvron et al. 2021), combined by the trainer as
``(1 - alpha) * true-label loss + alpha * distillation loss``:

* hard: cross-entropy to the teacher's top class (with alpha 0.5, DeiT's plain average);
* soft: KL(teacher || student) of the temperature-softened distributions, times T² so that its
  gradients keep their scale when T changes (Hinton et al. 2015).

Several runs can teach together (`teacher_run` "a,b,c", an ensemble teacher): each member gets its own
input as above, and the mean of their logits is the teacher's output, for both losses. An ensemble of
independently trained networks is more accurate than any of them (three `wide muon` runs: 95.30% against
94.85–94.98%, bench/README.md), which is what a student taught by it can learn from (the wide student of
those three did not gain there); each member adds a forward pass to every training step.

No distillation token: the distillation target is applied to the student's one classifier output.
That works for every student (CNNs too), keeps a distilled model the same architecture as a plain one
(so the two compare at equal parameters and export the same way), and a token unused in plain
training would be a parameter without gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import AUGMENTATIONS
from ..config import teacher_ids
from ..models import count_params
from ..params import ConfigError
from ..runs import RunRecord, RunStore
from .checkpoints import FINISHED_ORDER, CheckpointError, finished_source, read_checkpoint, weights_sources

__all__ = ["Teacher", "EnsembleTeacher", "load_teacher", "load_teachers", "check_teacher_run",
           "check_teacher_runs", "teacher_candidates", "teacher_input_kind", "distillation_loss"]


def _normalizers(augment: list) -> list[str]:
    """Names of the chain's normalizing steps (they replace the engine's mean/std normalization)."""
    names = []
    for step in augment or []:
        name = step["name"] if isinstance(step, dict) else step
        if "normalize" in AUGMENTATIONS.get(name).tags:
            names.append(name)
    return names


def teacher_candidates(store: RunStore) -> list[dict]:
    """Completed runs with a checkpoint, newest first: [{run_id, name, model, test_acc}]."""
    return [{"run_id": record.run_id, "name": config.get("name", ""), "model": config.get("model", "?"),
             "test_acc": status.get("test_acc")} for record, status, config in weights_sources(store)]


def check_teacher_run(store: RunStore, run_id: str, student_run_id: str | None = None) -> RunRecord:
    """The teacher's record, or ConfigError saying why it cannot teach (missing, unfinished, no
    checkpoint, itself)."""
    return finished_source(store, run_id, "teacher_run", "be its own teacher", "distil", student_run_id)


def check_teacher_runs(store: RunStore, teacher_run: str, student_run_id: str | None = None) -> list[RunRecord]:
    """The records of every run `teacher_run` names (one, or an ensemble's), each checked as a teacher."""
    return [check_teacher_run(store, run_id, student_run_id) for run_id in teacher_ids(teacher_run)]


def teacher_input_kind(run_id: str, teacher_norm: list[str], student_norm: list[str]) -> str:
    """'same': the student's input as it is; 'own': the teacher's own normalizers applied to the
    augmented [0, 1] batch (possible only when the student's chain has no normalizing step, so that
    the batch it is handed is still [0, 1])."""
    if teacher_norm and not student_norm:
        return "own"
    if teacher_norm == student_norm and "zca" not in teacher_norm:
        return "same"
    if teacher_norm == student_norm:
        raise ConfigError(f"teacher_run {run_id} and this run both whiten with zca, each fitted on its own "
                          "training images, so the student's whitened batch is not the teacher's input: "
                          "distil into a student without a normalizing step (the teacher then applies its "
                          "own zca)")
    raise ConfigError(f"teacher_run {run_id} normalizes its inputs differently (teacher: "
                      f"{', '.join(teacher_norm) or 'mean/std'}; student: {', '.join(student_norm) or 'mean/std'}): "
                      "use the same normalizing steps in both chains, or none in the student's")


@dataclass
class Teacher:
    model: nn.Module
    input_kind: str  # "same" | "own"
    info: dict       # recorded in the run's status.json and results.json
    normalizers: list = field(default_factory=list)  # with "own": the teacher's fitted normalizing ops

    def to(self, device) -> "Teacher":
        # channels_last: the teacher only runs forward passes, and convolutions run ~1.4x faster in it
        # on the CPU (oneDNN) as on CUDA; layers without 4-D weights are unaffected
        self.model.to(device, memory_format=torch.channels_last)
        return self

    @torch.no_grad()
    def logits(self, x_augmented: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
        """Teacher logits for the batch the student saw: x_augmented the chain's output (in [0, 1]
        when the student's chain does not normalize), x_student the student's input."""
        x = x_student
        if self.input_kind == "own":
            x = x_augmented
            for op in self.normalizers:
                x, _, _ = op(x, None, None)
        return self.model(x.contiguous(memory_format=torch.channels_last)).float()


def load_teacher(store: RunStore, run_id: str, student_augment: list,
                 student_run_id: str | None = None) -> Teacher:
    """Check the teacher run, read its checkpoint (last.pt, else best.pt), build its model with the
    weights it was evaluated with (and, for 'own' input, its fitted normalizers), and freeze it in
    eval mode (on the CPU; move it with .to)."""
    record = check_teacher_run(store, run_id, student_run_id)
    augment = (record.config_dict() or {}).get("augment")
    input_kind = teacher_input_kind(run_id, _normalizers(augment), _normalizers(student_augment))
    try:
        ckpt = read_checkpoint(record, FINISHED_ORDER)
        model = ckpt.build_model()
        normalizers = ckpt.normalizers(augment) if input_kind == "own" else []
    except CheckpointError as exc:
        raise CheckpointError(f"teacher_run {run_id} cannot teach: {exc}") from None
    model.requires_grad_(False)
    info = {"run_id": run_id, "checkpoint": ckpt.path.name, "weights": ckpt.evaluation_weights()[1],
            "fallback": ckpt.fallback, "step": ckpt.step, "model": ckpt.model_name,
            "model_params": ckpt.model_params, "params": count_params(model),
            "input": "+".join(["augmented batch"] + [op.name for op in normalizers]) if normalizers
                     else "the student's input",
            "test_acc": record.status().get("test_acc")}
    return Teacher(model, input_kind, info, normalizers)


@dataclass
class EnsembleTeacher:
    """Several finished runs teaching as one: the mean of the members' logits, each given its own input."""
    members: list[Teacher]
    info: dict  # the members' infos under "runs", recorded like a single teacher's

    def to(self, device) -> "EnsembleTeacher":
        for member in self.members:
            member.to(device)
        return self

    @torch.no_grad()
    def logits(self, x_augmented: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
        return torch.stack([member.logits(x_augmented, x_student) for member in self.members]).mean(0)


def load_teachers(store: RunStore, teacher_run: str, student_augment: list,
                  student_run_id: str | None = None) -> Teacher | EnsembleTeacher:
    """The teacher `teacher_run` names: one run's (`load_teacher`), or, for several comma-separated ids,
    an ensemble of them. Every member is checked before any is read, so a bad one fails at once."""
    run_ids = teacher_ids(teacher_run)
    check_teacher_runs(store, teacher_run, student_run_id)
    if len(run_ids) == 1:
        return load_teacher(store, run_ids[0], student_augment, student_run_id)
    members = [load_teacher(store, run_id, student_augment, student_run_id) for run_id in run_ids]
    info = {"run_id": ",".join(run_ids), "ensemble": len(members), "combine": "mean of the members' logits",
            "params": sum(member.info["params"] for member in members),
            "runs": [member.info for member in members]}
    return EnsembleTeacher(members, info)


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
