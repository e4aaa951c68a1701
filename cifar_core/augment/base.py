"""Batched, seeded data augmentations and the chain that applies them.

Every op works on a whole batch at once: x float32 (B, 3, H, W) with values in [0, 1], on whatever
device x lives on. All randomness is drawn from a CPU ``torch.Generator`` passed in (per-image
parameters are sampled on the CPU, then moved to x.device), so a given seed gives the same result
on CPU and GPU. Each op returns the per-image parameters it sampled as CPU tensors, (B,) or (B, k),
so a previewer can print e.g. "angle=12.3" under every tile (statistics computed from the images,
like per_image_standardization's mean/std, stay on x.device). No op loops over images in Python.

Interface (see docs/CONTRACTS.md):
    op = AUGMENTATIONS.build(name, params)
    x, y, sampled = op(x, y, gen)      # y: (B, C) soft targets or None
    op.batch_level / op.needs_fit (+ op.fit(x)) / op.normalizes / op.stochastic

    chain = AugmentChain([{"name": "random_crop", "params": {"padding": 4}, "p": 1.0}, ...])
    chain.fit(x_train)                 # only needed when a step needs_fit (zca)
    x, y_soft, records = chain(x_uint8_or_float, y_int_or_soft, gen, record=False)

Library ops are used where a library does the per-image work on a batch (kornia.enhance,
kornia.filters, kornia.geometry.transform). Hand-written ops carry a one-line comment saying why.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..params import ConfigError, Param, Registry

__all__ = ["AUGMENTATIONS", "TAGS", "AugOp", "RemapOp", "image_op", "gather_pixels", "compose_remaps",
           "draw_uniform", "draw_coin", "draw_beta", "to_device_of", "check_odd", "filled", "reflect_index",
           "as_nchw", "to_float", "PAD_MODE", "GRID_PAD"]

AUGMENTATIONS = Registry("augmentation")

TAGS = ("geometric", "color", "blur", "erase", "mix", "normalize")

PAD_MODE = Param("pad_mode", "choice", "reflect", choices=("reflect", "zero"),
                  help="how pixels outside the image are filled: mirrored (reflect) or black (zero)")
# kornia/grid_sample names for the two pad modes
GRID_PAD = {"reflect": "reflection", "zero": "zeros"}


# ----------------------------------------------------------------------------------------------
# The op object every registry entry returns
# ----------------------------------------------------------------------------------------------

class AugOp:
    """A configured augmentation: ``op(x, y, gen) -> (x, y, sampled)``.

    ``apply(x, y, gen)`` does the work. Non-batch-level ops leave y untouched. Attributes:
    batch_level (mixes images across the batch), needs_fit (+ fit), normalizes (output leaves [0, 1]
    and replaces the engine's mean/std normalization), stochastic (output depends on the generator).
    """

    batch_level = False
    needs_fit = False
    normalizes = False

    def __init__(self, name: str, params: dict, apply: Callable | None = None,
                 stochastic: bool = True, batch_level: bool = False, normalizes: bool = False):
        self.name = name
        self.params = dict(params)
        self._apply = apply
        self.stochastic = stochastic
        self.batch_level = batch_level
        self.normalizes = normalizes

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator):
        return self._apply(x, y, gen)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"AugOp({self.name}: {args})"


def image_op(name: str, params: dict, fn: Callable, **flags) -> AugOp:
    """Wrap ``fn(x, gen) -> (x, sampled)`` (an op that never touches the labels)."""
    def apply(x, y, gen):
        out, sampled = fn(x, gen)
        return out, y, sampled
    return AugOp(name, params, apply, **flags)


class RemapOp(AugOp):
    """An op that only moves whole pixels: out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]], and 0
    where row_ok[b, i] or col_ok[b, j] is False (zero padding).

    ``remap(n, h, w, gen) -> (rows (n,H), cols (n,W), row_ok or None, col_ok or None, sampled)``
    draws the same numbers as calling the op, so AugmentChain can compose consecutive remap steps
    (random_crop, hflip, vflip) into a single gather over the batch.
    """

    def __init__(self, name: str, params: dict, remap: Callable):
        super().__init__(name, params, None)
        self.remap = remap

    def __call__(self, x, y, gen):
        b, _, h, w = x.shape
        rows, cols, row_ok, col_ok, sampled = self.remap(b, h, w, gen)
        return gather_pixels(x, rows, cols, row_ok, col_ok), y, sampled


def gather_pixels(x, rows, cols, row_ok=None, col_ok=None) -> torch.Tensor:
    """Apply per-image separable index maps (CPU tensors) to x with one gather."""
    b, c, h, w = x.shape
    if row_ok is None and col_ok is None and torch.equal(rows, torch.arange(h).expand(b, h)) \
            and torch.equal(cols, torch.arange(w).expand(b, w)):
        return x  # nothing moves (zero padding, no flip drawn)
    # Hand-written (hot path): one gather with a per-image flat index instead of pad + crop, flip +
    # where, or a bilinear warp; reflect/zero padding and flips are folded into the index.
    rows, cols = rows.to(x.device), cols.to(x.device)
    index = torch.add(cols[:, None, :], rows[:, :, None], alpha=w).view(b, 1, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, index.expand(b, c, h * w)).view(b, c, h, w)
    if row_ok is not None or col_ok is not None:
        ok_r = torch.ones(b, h, dtype=torch.bool) if row_ok is None else row_ok
        ok_c = torch.ones(b, w, dtype=torch.bool) if col_ok is None else col_ok
        out = out.mul_((ok_r[:, :, None] & ok_c[:, None, :]).to(x.device)[:, None])
    return out


def compose_remaps(first, second):
    """Index maps of `second` applied after `first` (both output -> input, same shapes)."""
    r1, c1, vr1, vc1 = first
    r2, c2, vr2, vc2 = second

    def ok(v1, idx, v2):
        if v1 is None:
            return v2
        v = v1.gather(1, idx)
        return v if v2 is None else v & v2
    return r1.gather(1, r2), c1.gather(1, c2), ok(vr1, r2, vr2), ok(vc1, c2, vc2)


# ----------------------------------------------------------------------------------------------
# Sampling helpers: everything is drawn on the CPU from `gen`
# ----------------------------------------------------------------------------------------------

def draw_uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def draw_coin(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def draw_beta(gen: torch.Generator, n: int, alpha: float) -> torch.Tensor:
    # torch's Beta/Gamma samplers take no generator, so a numpy Generator is seeded from `gen`.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def to_device_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else t.dtype)


def check_odd(kernel_size: int, name: str) -> None:
    if kernel_size % 2 == 0:
        raise ConfigError(f"{name}.kernel_size: {kernel_size} must be odd (1 means no blur)")


def filled(n: int, value, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices in [-(n-1), 2(n-1)] into [0, n-1] (like F.pad's 'reflect', edge not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def as_nchw(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):  # NHWC (numpy layout)
        x = x.permute(0, 3, 1, 2)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    # float() then div_: as the engine's eval path does (and ~7x faster on CPU than uint8.div(255.))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
