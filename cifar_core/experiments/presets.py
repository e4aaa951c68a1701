"""Named starting points for training runs: plain dicts of RunConfig fields.

Used by the app's Train page (the "Preset" chooser, `?preset=NAME`) and available to studies. Every
preset is a *partial* config: fields it does not name keep RunConfig's defaults. `preset(name)`
returns a fresh copy, so callers may change it freely.

The trick ablation follows the source report: each step adds one trick to the previous one, on a
small random subset so that every step finishes in a few minutes on a CPU.
"""
from __future__ import annotations

import copy

from ..params import ConfigError

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

# The airbench94 recipe in this engine's terms (its ideas are public; hyperparameters converted
# from its summed-loss convention to mean-loss SGD: lr 11.5/(1024·(1+1/(1-0.85)))·1024 = 1.5,
# coupled weight decay 0.0153·1024/7851/1.5 = 1.33e-3): patch-whitened fastnet, batch 1024, Nesterov
# SGD momentum 0.85, norm/bias LR ×64, triangular one-cycle 0.2 → 1 → 0.07, label smoothing 0.2,
# crop (2 px reflect) + alternating flips, lookahead every 5 steps, test-time flip + 1-pixel
# translations, evaluation only at the end. bf16 autocast and channels_last: on a CPU with AVX-512 BF16
# the step runs 2.5x faster than fp32 (bench/README.md), which buys 15 epochs instead of airbench's
# 10: 94.15% in 25.9 min on the dev box's 2 cores.
FAST: dict = {
    "name": "fast", "model": "fastnet", "model_params": {"width": 1.0, "whiten": True, "dropout": 0.0},
    "subset": "full", "val_size": 0, "test_size": 0, "epochs": 15, "eval_every": 15, "log_every": 5,
    "batch_size": 1024, "optimizer": "sgd", "lr": 1.5, "momentum": 0.85, "nesterov": True,
    "weight_decay": 1.33e-3, "bias_lr_scale": 64.0,
    "schedule": "onecycle", "schedule_params": {"warmup_fraction": 0.23, "start_factor": 0.2,
                                                "final_factor": 0.07},
    "label_smoothing": 0.2, "tta_flip": True, "tta_translate": True, "grad_clip": "none", "ema_decay": 0.0,
    "lookahead_every": 5, "lookahead_decay": 0.95, "alternating_flip": True,
    "precision": "bf16", "channels_last": True,
    "augment": [{"name": "random_crop", "params": {"padding": 2, "pad_mode": "reflect"}, "p": 1.0}],
}

# airbench94_muon (Keller Jordan: 94.01% mean in 8 epochs, 2.6 s on an A100) in this engine's terms: Muon
# on fastnet's conv filters (lr 0.24, momentum 0.6, Nesterov; the whitening conv frozen) and Nesterov SGD
# (momentum 0.85) for the head and the BN biases; batch 2000, 8 epochs, the LR falling linearly from its
# peak to 0 without warm-up, label smoothing 0.2, crop (2 px reflect) + alternating flips, test-time flip
# + 1-pixel translations, no lookahead. The SGD numbers converted from its summed loss and 1/256 head
# scale to our mean loss and fastnet's 1/9 (both heads start at the same effective scale): head lr
# 0.67·2000·81/65536 = 1.66, BN biases 0.053·2000 = 106 = 1.66 × 64, weight decay 0.004/1.66 = 2.4e-3
# (the same per-step shrink lr·wd); Muon's lr needs no conversion (its step ignores the gradient's
# scale). Differences: its BN biases are decayed too (this engine never decays 1-D parameters) and its
# whitening bias trains for 3 epochs (fastnet's `whiten_bias_epochs` 3 does that; it changed nothing
# measurable on the CPU, so it stays 0). bf16 + channels_last as in `fast`.
# For the 2-core CPU (bench/README.md, 2026-12-07) two more airbench levers: airbench96_faster's data
# selection (a quarter-width proxy ranks each batch of 1,250 and the model trains on the hardest 1,000, at
# the SGD LR of batch 1,000: 0.83) and test-time views only for the images below 0.7 confidence; 9 epochs.
# The plain batch-2,000 recipe took 1,075 s for 93.86% there; this one about 860 s.
FAST_MUON: dict = {
    **FAST, "name": "fast muon", "epochs": 9, "eval_every": 9, "batch_size": 1250,
    "optimizer": "muon", "muon_lr": 0.24, "muon_momentum": 0.6, "lr": 0.83, "momentum": 0.85, "nesterov": True,
    "weight_decay": 2.4e-3, "bias_lr_scale": 64.0,
    "schedule": "onecycle", "schedule_params": {"warmup_fraction": 0.0, "start_factor": 1.0, "final_factor": 0.0},
    "lookahead_every": 0, "select_keep": 0.8, "select_proxy_width": 0.25, "select_proxy_every": 4,
    "tta_confident": 0.7,
}

# airbench95's widths (128/384/384 channels: 4.6 M parameters against 2.0 M) with the fast muon recipe
# for 13 epochs (airbench95 itself: SGD, 15 epochs, 95.01% mean on a GPU). On the dev box's 2 cores
# (bench/README.md, "Toward a 95% CNN"): 94.93 ± 0.07% over seeds 0–2, 23–28 min a run; 16 epochs gave
# no more (94.95%, seed 0).
WIDE_MUON: dict = {
    **FAST_MUON, "name": "wide muon", "epochs": 13, "eval_every": 13,
    "model_params": {**FAST_MUON["model_params"], "channels1": 128, "channels2": 384, "channels3": 384},
}

# The source report's imbalanced set (each class 500–1000 images, drawn per seed: 7,108 images at seed 0,
# 7,748 at seed 1) with the fast recipe sized to about 10 minutes on a 2-core CPU with AVX-512 BF16:
# full-width fastnet, 32 epochs at batch 512 (lr 1.0), no re-balancing (at a 2:1 ratio at most,
# re-balancing moved balanced accuracy by under a point in the samplers study). The run time grows with
# the draw's size. bench/README.md has its figures over 3 seeds.
REPORT_IMBALANCED: dict = {
    **FAST, "name": "report imbalanced", "imbalance": "report_random", "imbalance_params": {"low": 500, "high": 1000},
    "epochs": 32, "eval_every": 32, "batch_size": 512, "lr": 1.0,
}

# CIFAR-10-LT with imbalance ratio 100 (12,406 images, 5,000 airplanes down to 50 trucks) with the fast
# recipe and Balanced Softmax (the log prior added to the logits in the loss only; label smoothing spread
# by the prior, see supervised_loss): 60 epochs at batch 512 (lr 1.0), about 26 minutes on a 2-core CPU
# with AVX-512 BF16. bench/README.md has its figures over 3 seeds.
LONG_TAIL_100: dict = {
    **FAST, "name": "cifar10-lt 100", "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 100},
    "balance": "balanced_softmax", "epochs": 60, "eval_every": 60, "batch_size": 512, "lr": 1.0,
}

# The source report's few-label split in this engine's terms: 250 labels (25 a class), 44,750 unlabeled images
# and 5,000 held out for validation (label_budget 250 + val_size 5000 of the full training set), trained
# with FixMatch as its paper does (Sohn et al. 2020: Nesterov SGD lr 0.03, momentum 0.9, weight decay
# 5e-4, cosine decay, 64 labeled + μ·64 = 448 unlabeled images a step, τ 0.95, EMA 0.999 for evaluation)
# on the full-width fast net instead of a WideResNet-28-2. 2,000 epochs of the 250 labels are 8,000 steps,
# far fewer than the paper's million: a GPU run (about 0.9 M images), and a starting point, not a measured
# recipe (bench/bench_few_labels.py measures the CPU's hour).
FIXMATCH_REPORT_SPLIT: dict = {
    "name": "fixmatch 250 labels", "model": "fastnet", "model_params": {"width": 1.0, "whiten": True, "dropout": 0.0},
    "subset": "full", "val_size": 5000, "test_size": 0, "label_budget": 250, "objective": "fixmatch",
    "epochs": 2000, "eval_every": 100, "log_every": 20, "batch_size": 64,
    "optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "cosine", "schedule_params": {"warmup_epochs": 0.0, "final_factor": 0.0},
    "ssl_threshold": 0.95, "ssl_unlabeled_ratio": 7, "ssl_weight": 1.0, "ema_decay": 0.999,
    "label_smoothing": 0.0, "tta_flip": False, "channels_last": True,
    "augment": [{"name": "random_crop", "params": {"padding": 4, "pad_mode": "reflect"}, "p": 1.0},
                {"name": "hflip", "params": {}, "p": 0.5}],
}

# The Train page's first choice: the fast recipe above scaled down to a run of about a minute on a
# 2-core CPU (start-up included), so that the obvious first click shows real curves soon: a half-width
# fastnet on 3,000 random training images, 3 epochs of 12 steps (a metric line per step) with an
# evaluation after each on a stratified 1,000-image test subset (with the flip TTA), in fp32. On the
# 2-core dev VM (AVX2, no AVX-512), shared with other work: 45 s wall (35 s training), 52.6% test accuracy.
QUICK: dict = {
    **FAST, "name": "quick", "model_params": {"width": 0.5, "whiten": True, "dropout": 0.0},
    "subset": "random", "subset_size": 3000, "val_size": 0, "test_size": 1000,
    "epochs": 3, "eval_every": 1, "log_every": 1, "batch_size": 250, "lr": 0.6, "tta_translate": False,
    "precision": "fp32", "channels_last": True,  # bf16 pays only on CPUs with AVX-512 BF16 (bench/README.md)
}

TINY: dict = {
    "name": "tiny", "model": "fastnet", "model_params": {"width": 0.5},
    "subset": "per_class", "per_class": 20, "val_size": 100, "test_size": 1000, "epochs": 1,
    "batch_size": 100,
    "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "onecycle", "schedule_params": {}, "label_smoothing": 0.1,
    "grad_clip": "none", "ema_decay": 0.0, "tta_flip": False, "log_every": 1,
    "augment": [{"name": "random_crop", "params": {"padding": 4}, "p": 1.0},
                {"name": "hflip", "params": {}, "p": 0.5}],
}

# Transformers from scratch on small data (the recipe of Lee et al. 2021, "Vision Transformer for
# Small-Size Datasets", whose plain ViT of this size reached ~93% on CIFAR-10 in 100 epochs): AdamW
# lr 1e-3 (batch 128), weight decay 0.05, 10 warm-up epochs then cosine, label smoothing 0.1, gradient
# clipping, strong augmentation (crop + flip, TrivialAugment, Mixup, CutMix, random erasing) and
# stochastic depth 0.1. 100 epochs is a GPU budget; on the CPU, shorten epochs (the cosine then still
# ends at its floor) rather than set a time limit (which stops before the LR decays).
TRANSFORMER_RECIPE: dict = {
    "subset": "full", "val_size": 0, "test_size": 0, "epochs": 100, "eval_every": 5, "log_every": 20,
    "batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.05,
    "bias_lr_scale": 1.0, "schedule": "cosine", "schedule_params": {"warmup_epochs": 10.0, "final_factor": 0.01},
    "label_smoothing": 0.1, "grad_clip": "norm", "clip_max_norm": 1.0, "clip_norm_type": "2",
    "ema_decay": 0.0, "tta_flip": False, "tta_translate": False,
    "augment": [{"name": "random_crop", "params": {"padding": 4, "pad_mode": "reflect"}, "p": 1.0},
                {"name": "hflip", "params": {}, "p": 0.5},
                {"name": "trivial_augment", "params": {"strength": 1.0}, "p": 1.0},
                {"name": "mixup", "params": {"alpha": 0.8}, "p": 0.5},
                {"name": "cutmix", "params": {"alpha": 1.0}, "p": 0.5},
                {"name": "random_erasing", "params": {}, "p": 0.25}],
}
# ViT-tiny: patch 4 (64 tokens), 9 blocks x 192, 12 heads of 16, MLP x2: 2.7 M parameters.
VIT_TINY: dict = {
    "name": "ViT-tiny", **TRANSFORMER_RECIPE, "model": "vit",
    "model_params": {"patch_size": 4, "embed_dim": 192, "depth": 9, "heads": 12, "mlp_ratio": 2.0,
                     "dropout": 0.0, "drop_path": 0.1, "pool": "cls", "tokenizer": "linear"},
}
# CCT-tiny: the same transformer with a conv tokenizer (2 conv-pool stages to the same 8x8 grid) and
# sequence pooling, as compact convolutional transformers do.
CCT_TINY: dict = {
    **VIT_TINY, "name": "CCT-tiny",
    "model_params": {**VIT_TINY["model_params"], "tokenizer": "conv", "pool": "seq"},
}
# CaiT-tiny: 8 self-attention blocks + 2 class-attention layers x 192, 4 heads, LayerScale 0.1
# (the paper's value up to depth 18): 3.0 M parameters.
CAIT_TINY: dict = {
    "name": "CaiT-tiny", **TRANSFORMER_RECIPE, "model": "cait",
    "model_params": {"patch_size": 4, "embed_dim": 192, "depth": 8, "class_depth": 2, "heads": 4,
                     "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.1, "layer_scale_init": 0.1,
                     "tokenizer": "linear"},
}
# ViT-tiny taught by a finished run (DeiT's hard-label distillation, the teacher's top class and the
# true label weighted equally). The teacher run is picked on the Train page (teacher_run stays empty
# here, so the config is incomplete until one is chosen).
VIT_DISTILLED: dict = {
    **VIT_TINY, "name": "ViT-tiny distilled",
    "distill": "hard", "teacher_run": "", "distill_alpha": 0.5, "distill_temperature": 3.0,
}
DISTILLED_PRESETS = ("ViT-tiny distilled",)  # presets that need a teacher run before they validate

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
                    {"name": "hflip", "params": {}, "p": 0.5}]}),
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


QUICK_PRESET = "quick (about a minute)"  # the Train page's default: the first preset

LONG_TAIL_100_NAME = "CIFAR-10-LT rho 100 (fast, balanced softmax, 60 epochs)"

# One line per preset for the chooser: what it trains and what it is for (figures: bench/README.md).
PRESET_SUMMARIES: dict[str, str] = {
    QUICK_PRESET: "Real curves in about a minute on a CPU: a half-width fastnet on 3,000 images, 3 short "
                  "epochs, evaluated on 1,000 test images.",
    "report baseline": "The source report's baseline: ResNet-18 on a random 10,000-image subset, plain SGD "
                       "(lr 0.01, batch 128) for 20 epochs, no tricks at all.",
    "fast": "airbench94's recipe in this engine: whitened fastnet on all 50,000 images, 15 epochs of "
            "Nesterov SGD with lookahead under bf16 autocast; about 94% in under half an hour on "
            "2 CPU cores.",
    "fast muon": "airbench94_muon's recipe: the fast net with Muon (orthogonalized updates) for the conv "
                 "filters, 9 epochs, training on the hardest 80% of each batch as a small proxy model ranks "
                 "it; about 94% in under 15 minutes on 2 CPU cores.",
    "wide muon": "The fast muon recipe on airbench95's wider net (4.6 M parameters) for 13 epochs: about "
                 "94.9% in under half an hour on 2 CPU cores.",
    "tiny (smoke test)": "A seconds-long smoke test: 200 images, one epoch. Checks that everything runs, "
                         "says nothing about accuracy.",
    "ViT-tiny": "A 2.7 M-parameter Vision Transformer (patches of 4) from scratch with the small-data "
                "recipe (AdamW, warm-up + cosine, strong augmentation); 100 epochs is a GPU budget.",
    "CCT-tiny": "ViT-tiny with a convolutional tokenizer and sequence pooling, as compact convolutional "
                "transformers (CCT) have, the same recipe.",
    "CaiT-tiny": "CaiT: 8 self-attention blocks with LayerScale, then 2 class-attention layers; "
                 "3.0 M parameters, same recipe as ViT-tiny.",
    "ViT-tiny distilled": "ViT-tiny taught by a finished run (DeiT's hard-label distillation): pick the "
                          "teacher run below before launching.",
    "FixMatch, 250 labels (report's split)": "Semi-supervised: 250 labels (25 a class) and 44,750 unlabeled "
                                             "images, FixMatch with weak/strong views and EMA weights; a "
                                             "GPU-sized run (8,000 steps).",
    "report's imbalanced set (fast, 32 epochs)": "The source report's imbalanced set (each class 500-1,000 "
                                                 "images, drawn per seed) with the fast recipe for 32 "
                                                 "epochs: about 10 minutes on 2 CPU cores.",
    LONG_TAIL_100_NAME: "CIFAR-10-LT with imbalance ratio 100 (5,000 airplanes down to 50 trucks, 12,406 "
                        "images) with the fast recipe and Balanced Softmax for 60 epochs: about 26 minutes "
                        "on 2 CPU cores.",
}


def preset_summary(name: str) -> str:
    """What the preset `name` trains, in a line (the ablation steps share one)."""
    if name in PRESET_SUMMARIES:
        return PRESET_SUMMARIES[name]
    step = next(i for i, (label, _) in enumerate(ABLATION_STEPS) if label == name)
    return (f"Step {step} of the source report's cumulative trick ablation: ResNet-18 on 2,000 images for "
            f"8 epochs; each step keeps the previous ones' tricks and adds one.")


def presets() -> dict[str, dict]:
    """All presets, {name: partial RunConfig dict}, in the order a chooser should list them (the first,
    QUICK_PRESET, is the default: a run of about a minute on a CPU)."""
    out = {QUICK_PRESET: QUICK, "report baseline": REPORT_BASELINE, "fast": FAST,
           "fast muon": FAST_MUON, "wide muon": WIDE_MUON, "tiny (smoke test)": TINY,
           "ViT-tiny": VIT_TINY, "CCT-tiny": CCT_TINY, "CaiT-tiny": CAIT_TINY, "ViT-tiny distilled": VIT_DISTILLED,
           "FixMatch, 250 labels (report's split)": FIXMATCH_REPORT_SPLIT,
           "report's imbalanced set (fast, 32 epochs)": REPORT_IMBALANCED, LONG_TAIL_100_NAME: LONG_TAIL_100}
    out.update(ablation_presets())
    return copy.deepcopy(out)


def preset(name: str) -> dict:
    """A fresh copy of one preset; ConfigError naming the choices if unknown."""
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset {name!r} (choose from: {', '.join(table)})")
    return table[name]
