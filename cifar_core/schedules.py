"""Learning-rate schedules: each returns a multiplier of the base LR as a function of progress.

A schedule is built from the total number of optimizer steps and steps per epoch, and maps a step
index to a factor. Epoch-based formulas (step decay, the report's inverse-time decay) use the
fractional epoch step / steps_per_epoch, so they behave the same at any batch size.
"""
from __future__ import annotations

import math
from typing import Callable

from .params import Param, Registry

SCHEDULES = Registry("LR schedule")

Factor = Callable[[int], float]


@SCHEDULES.register("none", description="Constant learning rate.")
def constant(total_steps: int, steps_per_epoch: int) -> Factor:
    return lambda step: 1.0


@SCHEDULES.register("step", params=(
    Param("step_epochs", "int", 30, 1, 1000, help="Multiply the LR by gamma every this many epochs."),
    Param("gamma", "float", 0.1, 0.0, 1.0),
), description="Step decay: LR × gamma every step_epochs epochs.")
def step_decay(total_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float) -> Factor:
    return lambda step: gamma ** (step // (step_epochs * steps_per_epoch))


@SCHEDULES.register("cosine", params=(
    Param("warmup_epochs", "float", 0.0, 0.0, 100.0),
    Param("final_factor", "float", 0.0, 0.0, 1.0, help="LR at the end as a fraction of the base LR."),
), description="Linear warm-up, then cosine annealing to final_factor × LR.")
def cosine(total_steps: int, steps_per_epoch: int, warmup_epochs: float, final_factor: float) -> Factor:
    warmup = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@SCHEDULES.register("onecycle", params=(
    Param("warmup_fraction", "float", 0.25, 0.0, 0.9, help="Fraction of training spent rising to the peak."),
    Param("start_factor", "float", 0.1, 0.0, 1.0),
    Param("final_factor", "float", 0.0, 0.0, 1.0),
), description="One-cycle: linear warm-up to the peak LR, then linear decay.")
def onecycle(total_steps: int, steps_per_epoch: int, warmup_fraction: float, start_factor: float,
             final_factor: float) -> Factor:
    peak = max(1, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < peak:
            return start_factor + (1 - start_factor) * step / peak
        progress = min(1.0, (step - peak) / max(1, total_steps - peak))
        return 1 + (final_factor - 1) * progress
    return factor


@SCHEDULES.register("inverse_time", params=(
    Param("decay_rate", "float", 0.1, 0.0, 100.0, help="α = α0 / (1 + decay_rate · epoch)"),
    Param("per_step", "bool", False, help="Use the fractional epoch instead of whole epochs."),
), description="The report's decay: α = α0 / (1 + decay_rate · epoch).")
def inverse_time(total_steps: int, steps_per_epoch: int, decay_rate: float, per_step: bool) -> Factor:
    def factor(step: int) -> float:
        epoch = step / steps_per_epoch if per_step else step // steps_per_epoch
        return 1.0 / (1.0 + decay_rate * epoch)
    return factor


def build_schedule(name: str, params: dict | None, total_steps: int, steps_per_epoch: int) -> Factor:
    return SCHEDULES.build(name, params, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
