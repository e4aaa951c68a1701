"""Policy augmentations for training transformers from scratch: TrivialAugment, RandAugment, random
erasing. Registered in `cifar_core.augment.AUGMENTATIONS` (augment.py imports this module at its end)
with the same op contract as every other entry: ``op(x, y, gen) -> (x, y, sampled)`` on float
(B, 3, H, W) batches in [0, 1], all randomness drawn from the CPU generator `gen`, per-image sampled
parameters reported, no Python loop over images.

Why the policies are hand-written around library ops: torchvision.transforms.v2's TrivialAugmentWide
and RandAugment, and kornia.augmentation.auto's TrivialAugment and RandAugment, draw their operation
once per call (one op for the whole batch) from the global RNG and do not report what they drew.
Here each image draws its own operations and magnitudes from `gen`; the images that drew the same
operation are then processed together by one batched library call with per-image magnitudes
(kornia.geometry.transform / kornia.enhance, torchvision.transforms.v2.functional.autocontrast), so
the only Python loop is over the 14 operation kinds. The operation spaces and magnitude ranges are
torchvision's (RandAugment: 31 magnitude bins; TrivialAugment: the "wide" space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                            adjust_saturation_with_gray_subtraction, equalize, posterize, sharpness, solarize)
from kornia.geometry.transform import rotate, shear, translate
from torchvision.transforms.v2.functional import autocontrast

from ..params import ConfigError, Param
from .base import AUGMENTATIONS, AugOp, draw_uniform, image_op, to_device_of

__all__ = ["OP_NAMES", "trivial_augment", "rand_augment", "random_erasing"]

MAGNITUDE_BINS = 31  # torchvision's num_magnitude_bins; bin 0 is magnitude 0


# ----------------------------------------------------------------------------------------------
# The operations: each maps a per-image value (in the op's own units) to a batched library call
# ----------------------------------------------------------------------------------------------

def _pair(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.stack([first, second], 1)


def _shear_x(x, v):
    return shear(x, _pair(v, torch.zeros_like(v)), padding_mode="zeros")


def _shear_y(x, v):
    return shear(x, _pair(torch.zeros_like(v), v), padding_mode="zeros")


def _translate_x(x, v):
    return translate(x, _pair(v, torch.zeros_like(v)), padding_mode="zeros")


def _translate_y(x, v):
    return translate(x, _pair(torch.zeros_like(v), v), padding_mode="zeros")


def _solarize(x, threshold):
    # a threshold of 1 (magnitude 0) leaves the image alone; torchvision would invert pure white there
    return torch.where(threshold[:, None, None, None] >= 1.0, x, solarize(x, threshold))


@dataclass(frozen=True)
class PolicyOp:
    """name; apply(x, value) with value (n,) in the op's units; value_of(m, size) maps the normalised
    magnitude m in [0, 1] (n,) to those units; signed: a random sign is drawn per image."""

    name: str
    apply: Callable
    value_of: Callable
    signed: bool = False


def _linear(top: float) -> Callable:
    return lambda m, size: m * top


def _posterize_bits(fewest: int) -> Callable:
    # 8 bits at magnitude 0 down to `fewest` at full magnitude, rounded as torchvision does
    return lambda m, size: 8.0 - torch.round(m * (8 - fewest))


def _space(shear_max: float, translate_max: Callable, rotate_max: float, enhance_max: float,
           fewest_bits: int) -> tuple[PolicyOp, ...]:
    """translate_max(size) -> the largest shift in pixels; shifts are whole pixels, truncated as in
    torchvision."""
    def shift(m, size):
        return torch.trunc(m * translate_max(size))
    return (
        PolicyOp("identity", lambda x, v: x, _linear(0.0)),
        PolicyOp("shear_x", _shear_x, _linear(shear_max), signed=True),
        PolicyOp("shear_y", _shear_y, _linear(shear_max), signed=True),
        PolicyOp("translate_x", _translate_x, shift, signed=True),
        PolicyOp("translate_y", _translate_y, shift, signed=True),
        PolicyOp("rotate", lambda x, v: rotate(x, v, padding_mode="zeros"), _linear(rotate_max), signed=True),
        PolicyOp("brightness", lambda x, v: adjust_brightness_accumulative(x, 1 + v), _linear(enhance_max),
                 signed=True),
        PolicyOp("color", lambda x, v: adjust_saturation_with_gray_subtraction(x, 1 + v),
                 _linear(enhance_max), signed=True),
        PolicyOp("contrast", lambda x, v: adjust_contrast_with_mean_subtraction(x, 1 + v),
                 _linear(enhance_max), signed=True),
        PolicyOp("sharpness", lambda x, v: sharpness(x, 1 + v), _linear(enhance_max), signed=True),
        PolicyOp("posterize", lambda x, v: posterize(x, v.long()), _posterize_bits(fewest_bits)),
        PolicyOp("solarize", _solarize, lambda m, size: 1.0 - m),
        PolicyOp("autocontrast", lambda x, v: autocontrast(x), _linear(0.0)),
        PolicyOp("equalize", lambda x, v: equalize(x), _linear(0.0)),
    )


# torchvision RandAugment: shear 0.3, translate 150/331 of the size, rotate 30°, enhance 0.9, 8..4 bits
RAND_AUGMENT_SPACE = _space(0.3, lambda size: 150.0 / 331.0 * size, 30.0, 0.9, 4)
# torchvision TrivialAugmentWide: shear 0.99, translate 32 px, rotate 135°, enhance 0.99, 8..2 bits
TRIVIAL_AUGMENT_SPACE = _space(0.99, lambda size: 32.0, 135.0, 0.99, 2)
OP_NAMES = tuple(op.name for op in RAND_AUGMENT_SPACE)
_UNSCALED = ("autocontrast", "equalize")  # no magnitude: full strength whenever drawn


def _signed_values(space, which: torch.Tensor, m: torch.Tensor, size: int, gen) -> torch.Tensor:
    """Per-image values of the drawn ops: value_of(m) with a random sign for signed ops."""
    sign = torch.where(torch.rand(which.shape, generator=gen) < 0.5, -1.0, 1.0)
    values = torch.zeros(which.shape)
    for k, op in enumerate(space):
        chosen = which == k
        values = torch.where(chosen, op.value_of(m, size) * (sign if op.signed else 1.0), values)
    return values


def _apply_drawn(x: torch.Tensor, space, which: torch.Tensor, values: torch.Tensor,
                 blend: float = 1.0) -> torch.Tensor:
    """Apply op `which[i]` with value `values[i]` to image i: one batched call per op kind drawn.
    `blend` < 1 mixes autocontrast/equalize with the original (their only way to be weaker)."""
    out = x
    for k, op in enumerate(space):
        idx = (which == k).nonzero().squeeze(1)
        if op.name == "identity" or idx.numel() == 0:
            continue
        idx_d = idx.to(x.device)
        part = x.index_select(0, idx_d)
        changed = op.apply(part, to_device_of(values[idx], x))
        if op.name in _UNSCALED and blend < 1.0:
            changed = torch.lerp(part, changed, blend)
        out = out.index_copy(0, idx_d, changed.clamp(0.0, 1.0))
    return out


# ----------------------------------------------------------------------------------------------
# Registry entries
# ----------------------------------------------------------------------------------------------

_POLICY_HELP = (" Ops (index in 'op'): " + ", ".join(f"{i} {n}" for i, n in enumerate(OP_NAMES))
                + ". Geometric ops fill uncovered pixels with black.")


@AUGMENTATIONS.register(
    "trivial_augment",
    params=(Param("strength", "float", 1.0, 0.0, 1.0,
                  help="scales every op's magnitude range (1 = TrivialAugment-Wide as published, "
                       "0 = no change); autocontrast and equalize are blended with the original by it"),),
    description="TrivialAugment (wide): one random op per image at a uniformly random magnitude." + _POLICY_HELP,
    tags=("geometric", "color"))
def trivial_augment(strength: float = 1.0) -> AugOp:
    def fn(x, gen):
        b, _, h, w = x.shape
        which = torch.randint(0, len(TRIVIAL_AUGMENT_SPACE), (b,), generator=gen)
        m = torch.randint(0, MAGNITUDE_BINS, (b,), generator=gen) / (MAGNITUDE_BINS - 1) * strength
        values = _signed_values(TRIVIAL_AUGMENT_SPACE, which, m, w, gen)
        sampled = {"op": which, "magnitude": values}
        if strength == 0:
            return x, sampled
        return _apply_drawn(x, TRIVIAL_AUGMENT_SPACE, which, values, blend=strength), sampled
    return image_op("trivial_augment", {"strength": strength}, fn)


@AUGMENTATIONS.register(
    "rand_augment",
    params=(Param("num_ops", "int", 2, 0, 4, help="ops applied in sequence to each image (0 = off)"),
            Param("magnitude", "int", 9, 0, MAGNITUDE_BINS - 1,
                  help="magnitude bin of every op, out of 30 (torchvision's default 9)")),
    description="RandAugment: num_ops random ops per image, all at one fixed magnitude." + _POLICY_HELP,
    tags=("geometric", "color"))
def rand_augment(num_ops: int = 2, magnitude: int = 9) -> AugOp:
    def fn(x, gen):
        b, _, h, w = x.shape
        which = torch.randint(0, len(RAND_AUGMENT_SPACE), (b, num_ops), generator=gen)
        m = torch.full((b, num_ops), magnitude / (MAGNITUDE_BINS - 1))
        values = _signed_values(RAND_AUGMENT_SPACE, which, m, w, gen)
        for step in range(num_ops):  # each image's ops run in order: one pass per position
            x = _apply_drawn(x, RAND_AUGMENT_SPACE, which[:, step], values[:, step])
        return x, {"op": which, "magnitude": values}
    return image_op("rand_augment", {"num_ops": num_ops, "magnitude": magnitude}, fn)


@AUGMENTATIONS.register(
    "random_erasing",
    params=(Param("scale", "float_pair", (0.02, 0.33), 0.0, 1.0,
                  help="fraction of the image area erased (0, 0 = off)"),
            Param("ratio", "float_pair", (0.3, 3.3), 0.1, 10.0,
                  help="aspect ratio (width/height) of the erased box, drawn log-uniformly"),
            Param("value", "choice", "random", choices=("random", "zero", "mean"),
                  help="fill: uniform noise per pixel, black, or the image's own per-channel mean")),
    description="Random erasing: blank one box of random area and aspect ratio per image.",
    tags=("erase",))
def random_erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value: str = "random") -> AugOp:
    """Unlike torchvision (which retries up to 10 draws and otherwise erases nothing), a box that would
    not fit is clamped to the image, so every image is erased; the reported box is the one used."""
    if ratio[0] <= 0:
        raise ConfigError("random_erasing.ratio: values must be positive")

    def fn(x, gen):
        # Hand-written: torchvision's v2 RandomErasing draws one box per call and kornia's from the
        # global RNG; a broadcast comparison against per-image corners erases the whole batch at once.
        b, c, h, w = x.shape
        area = draw_uniform(gen, b, *scale) * (h * w)
        log_r = draw_uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]))
        box_w = torch.sqrt(area * torch.exp(log_r)).round().clamp(0, w).long()
        box_h = torch.sqrt(area / torch.exp(log_r)).round().clamp(0, h).long()
        x0 = (torch.rand(b, generator=gen) * (w - box_w + 1)).long().clamp(max=w - 1)
        y0 = (torch.rand(b, generator=gen) * (h - box_h + 1)).long().clamp(max=h - 1)
        noise = torch.rand(b, c, h, w, generator=gen) if value == "random" else None
        box = torch.stack([x0, y0, box_w, box_h], 1)
        sampled = {"box": box, "area": (box_w * box_h).float() / (h * w)}
        bd = to_device_of(box, x)[:, :, None, None]
        rows = torch.arange(h, device=x.device)[:, None]
        cols = torch.arange(w, device=x.device)[None, :]
        inside = ((rows >= bd[:, 1]) & (rows < bd[:, 1] + bd[:, 3])
                  & (cols >= bd[:, 0]) & (cols < bd[:, 0] + bd[:, 2]))[:, None]  # (B, 1, H, W)
        if value == "random":
            fill = to_device_of(noise, x)
        elif value == "mean":
            fill = x.mean((2, 3), keepdim=True)
        else:
            fill = torch.zeros((), device=x.device)
        return torch.where(inside, fill, x), sampled
    return image_op("random_erasing", {"scale": tuple(scale), "ratio": tuple(ratio), "value": value}, fn)
