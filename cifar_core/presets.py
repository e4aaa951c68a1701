"""Named starting points for training runs: plain dicts of RunConfig fields.

Used by the app's Train page (the "Preset" chooser, `?preset=NAME`) and available to studies. Every
preset is a *partial* config: fields it does not name keep RunConfig's defaults. `preset(name)`
returns a fresh copy, so callers may change it freely.

The trick ablation follows the source report: each step adds one trick to the previous one, on a
small random subset so that every step finishes in a few minutes on a CPU.
"""
from __future__ import annotations

import copy

from .params import ConfigError

# "No tricks": no augmentation, no weight decay, constant LR, no dropout, no clipping, no smoothing.
NO_TRICKS: dict = {
    "augment": [], "weight_decay": 0.0, "schedule": "none", "schedule_params": {},
    "label_smoothing": 0.0, "grad_clip": "none", "ema_decay": 0.0, "tta_flip": False,
}

REPORT_BASELINE: dict = {
    "name": "report baseline", "model": "resnet18", "model_params": {},
    "subset": "random", "subset_size": 10000, "val_size": 1000,
    "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "batch_size": 128,
    "epochs": 20, **NO_TRICKS,
}

FAST: dict = {
    "name": "fast", "model": "fastnet", "model_params": {"width": 1.0},
    "subset": "full", "val_size": 0, "epochs": 10, "batch_size": 512,
    "optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "onecycle", "schedule_params": {"warmup_fraction": 0.2, "start_factor": 0.1,
                                                "final_factor": 0.0},
    "label_smoothing": 0.2, "tta_flip": True, "grad_clip": "none", "ema_decay": 0.0,
    "augment": [{"name": "random_crop", "params": {"padding": 2, "pad_mode": "reflect"}, "p": 1.0},
                {"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}],
}

TINY: dict = {
    "name": "tiny", "model": "fastnet", "model_params": {"width": 0.5},
    "subset": "per_class", "per_class": 20, "val_size": 100, "epochs": 1, "batch_size": 100,
    "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "onecycle", "schedule_params": {}, "label_smoothing": 0.1,
    "grad_clip": "none", "ema_decay": 0.0, "tta_flip": False, "log_every": 1,
    "augment": [{"name": "random_crop", "params": {"padding": 4}, "p": 1.0},
                {"name": "hflip", "params": {}, "p": 1.0}],
}

# The cumulative trick ablation: (label, changes to the previous step).
ABLATION_BASE: dict = {
    "name": "ablation 0", "model": "resnet18", "model_params": {},
    "subset": "random", "subset_size": 2000, "val_size": 200, "epochs": 8, "batch_size": 64,
    "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, **NO_TRICKS,
}
ABLATION_STEPS: list[tuple[str, dict]] = [
    ("ablation 0: baseline", {}),
    ("ablation 1: + random crop & flip", {
        "augment": [{"name": "random_crop", "params": {"padding": 4}, "p": 1.0},
                    {"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}]}),
    ("ablation 2: + rotation", {"augment": "+rotation"}),
    ("ablation 3: + weight decay", {"weight_decay": 5e-4}),
    ("ablation 4: + LR decay (inverse-time)", {"schedule": "inverse_time",
                                               "schedule_params": {"decay_rate": 0.1, "per_step": False}}),
    ("ablation 5: + dropout", {"model_params": {"dropout": 0.3}}),
    ("ablation 6: + gradient clipping", {"grad_clip": "norm", "clip_max_norm": 1.0, "clip_norm_type": "2"}),
]
_ROTATION = {"name": "rotation", "params": {"degrees": 15.0}, "p": 1.0}


def ablation_presets() -> dict[str, dict]:
    """The cumulative ablation as {label: config dict}, in order (each step includes the previous ones)."""
    out: dict[str, dict] = {}
    current = copy.deepcopy(ABLATION_BASE)
    for i, (label, changes) in enumerate(ABLATION_STEPS):
        changes = copy.deepcopy(changes)
        if changes.get("augment") == "+rotation":
            changes["augment"] = current["augment"] + [dict(_ROTATION)]
        current = {**current, **changes, "name": f"ablation {i}"}
        out[label] = copy.deepcopy(current)
    return out


def presets() -> dict[str, dict]:
    """All presets, {name: partial RunConfig dict}, in the order a chooser should list them."""
    out = {"report baseline": REPORT_BASELINE, "fast": FAST, "tiny (smoke test)": TINY}
    out.update(ablation_presets())
    return copy.deepcopy(out)


def preset(name: str) -> dict:
    """A fresh copy of one preset; ConfigError naming the choices if unknown."""
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset {name!r} (choose from: {', '.join(table)})")
    return table[name]
