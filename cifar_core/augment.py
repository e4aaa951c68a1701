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

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                            adjust_hue, adjust_saturation_with_gray_subtraction)
from kornia.filters import bilateral_blur, box_blur, gaussian_blur2d, median_blur
from kornia.geometry.transform import crop_and_resize, rotate, translate, warp_affine

from .params import ConfigError, Param, Registry

__all__ = ["AUGMENTATIONS", "AugOp", "RemapOp", "AugmentChain", "validate_chain", "TAGS"]

AUGMENTATIONS = Registry("augmentation")

TAGS = ("geometric", "color", "blur", "erase", "mix", "normalize")

_PAD_MODE = Param("pad_mode", "choice", "reflect", choices=("reflect", "zero"),
                  help="how pixels outside the image are filled: mirrored (reflect) or black (zero)")
# kornia/grid_sample names for the two pad modes
_GRID_PAD = {"reflect": "reflection", "zero": "zeros"}


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


def _image_op(name: str, params: dict, fn: Callable, **flags) -> AugOp:
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
        return _gather_pixels(x, rows, cols, row_ok, col_ok), y, sampled


def _gather_pixels(x, rows, cols, row_ok=None, col_ok=None) -> torch.Tensor:
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


def _compose_remaps(first, second):
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

def _uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _coin(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _beta(gen: torch.Generator, n: int, alpha: float) -> torch.Tensor:
    # torch's Beta/Gamma samplers take no generator, so a numpy Generator is seeded from `gen`.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def _on(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else t.dtype)


def _check_odd(kernel_size: int, name: str) -> None:
    if kernel_size % 2 == 0:
        raise ConfigError(f"{name}.kernel_size: {kernel_size} must be odd (1 means no blur)")


def _full(n: int, value, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype)


def _reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices in [-(n-1), 2(n-1)] into [0, n-1] (like F.pad's 'reflect', edge not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


# ----------------------------------------------------------------------------------------------
# Geometric
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "random_crop",
    params=(Param("padding", "int", 4, 0, 16, help="pixels padded on each side before cropping back"),
            _PAD_MODE),
    description="Pad the image and crop it back at a random integer offset (shift by up to ±padding px).",
    tags=("geometric",))
def random_crop(padding: int = 4, pad_mode: str = "reflect") -> AugOp:
    """Shift each image by (dy, dx) in [-padding, padding] px: out[i, j] = in[i + dy, j + dx], with
    pixels from outside the image mirrored (reflect) or black (zero). Equivalent to padding by
    `padding` and cropping at offset (padding + dy, padding + dx); done as one gather (RemapOp)."""
    def remap(n, h, w, gen):
        shift = torch.randint(-padding, padding + 1, (n, 2), generator=gen)  # (dy, dx)
        sampled = {"dy": shift[:, 0], "dx": shift[:, 1]}
        rows = shift[:, 0, None] + torch.arange(h)
        cols = shift[:, 1, None] + torch.arange(w)
        if pad_mode == "reflect":
            if padding > min(h, w) - 1:
                raise ValueError(f"random_crop: reflect padding {padding} needs images larger than "
                                 f"{padding} px, got {h}x{w}")
            return _reflect_index(rows, h), _reflect_index(cols, w), None, None, sampled
        row_ok, col_ok = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        if padding == 0:
            row_ok = col_ok = None
        return rows.clamp(0, h - 1), cols.clamp(0, w - 1), row_ok, col_ok, sampled
    return RemapOp("random_crop", {"padding": padding, "pad_mode": pad_mode}, remap)


@AUGMENTATIONS.register(
    "random_resized_crop",
    params=(Param("scale", "float_pair", (0.35, 1.0), 0.05, 1.0,
                  help="fraction of the image area kept by the crop"),
            Param("ratio", "float_pair", (0.75, 1.333), 0.2, 5.0,
                  help="aspect ratio (width/height) of the crop, sampled log-uniformly")),
    description="Crop a random region (random area and aspect ratio) and resize it back to full size.",
    tags=("geometric",))
def random_resized_crop(scale=(0.35, 1.0), ratio=(0.75, 1.333)) -> AugOp:
    """Inception-style crop: area ~ U(scale) * H*W, log aspect ratio ~ U(log ratio).

    Width/height are clamped to the image, so extreme area/ratio draws give a slightly smaller
    area or a different ratio than drawn (torchvision retries instead); the reported values are
    the ones actually used. Uses kornia.geometry.transform.crop_and_resize (bilinear, sub-pixel box).
    """
    identity = tuple(scale) == (1.0, 1.0) and tuple(ratio) == (1.0, 1.0)

    def fn(x, gen):
        b, _, h, w = x.shape
        area = _uniform(gen, b, *scale) * (h * w)
        log_r = _uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]))
        cw = torch.sqrt(area * torch.exp(log_r)).clamp(1.0, float(w))
        ch = torch.sqrt(area / torch.exp(log_r)).clamp(1.0, float(h))
        x0 = torch.rand(b, generator=gen) * (w - cw)
        y0 = torch.rand(b, generator=gen) * (h - ch)
        sampled = {"scale": cw * ch / (h * w), "ratio": cw / ch,
                   "box": torch.stack([x0, y0, cw, ch], 1)}
        if identity:
            return x, sampled
        # inclusive pixel-centre corners: a full-size box (0,0)-(w-1,h-1) is the identity
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
                             torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1)
        out = crop_and_resize(x, _on(boxes, x), (h, w), mode="bilinear", align_corners=True)
        return out.clamp_(0.0, 1.0), sampled
    return _image_op("random_resized_crop", {"scale": tuple(scale), "ratio": tuple(ratio)}, fn)


@AUGMENTATIONS.register(
    "zoom",
    params=(Param("zoom", "float_pair", (0.8, 1.2), 0.5, 2.0,
                  help="scale factor range; >1 zooms in (crop), <1 zooms out (pad)"),
            _PAD_MODE),
    description="Uniformly rescale the whole image by a random factor, then crop or pad back "
                "at a random position.",
    tags=("geometric",))
def zoom(zoom=(0.8, 1.2), pad_mode: str = "reflect") -> AugOp:
    """Resize the whole image by s ~ U(zoom) (same factor on both axes) and crop (s > 1) or pad
    (s < 1, with pad_mode) back to the input size at a uniformly random position.

    How it differs from random_resized_crop: zoom never changes the aspect ratio and can zoom *out*
    (the content shrinks and the border is padded); its only freedom is one scale factor plus the
    position. random_resized_crop picks a *region* of random area and aspect ratio and stretches it
    to full size, so it only zooms in and distorts shapes when ratio != 1.
    Implemented as one affine warp per image (kornia.geometry.transform.warp_affine, bilinear,
    no antialiasing when shrinking).
    """
    identity = tuple(zoom) == (1.0, 1.0)

    def fn(x, gen):
        b, _, h, w = x.shape
        s = _uniform(gen, b, *zoom)
        u = torch.rand(b, 2, generator=gen)
        # continuous offset of the scaled image's top-left corner, in [0, (1-s)*size] (or reversed)
        ox, oy = u[:, 0] * (w - s * w), u[:, 1] * (h - s * h)
        sampled = {"zoom": s, "offset": torch.stack([ox, oy], 1)}
        if identity:
            return x, sampled
        # in pixel-centre coordinates (pixel i at i): dst = s * src + (s - 1) / 2 + offset
        m = torch.zeros(b, 2, 3)
        m[:, 0, 0] = s
        m[:, 1, 1] = s
        m[:, 0, 2] = 0.5 * (s - 1) + ox
        m[:, 1, 2] = 0.5 * (s - 1) + oy
        out = warp_affine(x, _on(m, x), (h, w), mode="bilinear", padding_mode=_GRID_PAD[pad_mode],
                          align_corners=True)
        return out.clamp_(0.0, 1.0), sampled
    return _image_op("zoom", {"zoom": tuple(zoom), "pad_mode": pad_mode}, fn)


def _flip(name: str, p_flip: float, vertical: bool) -> AugOp:
    def remap(n, h, w, gen):
        flip = _coin(gen, n, p_flip)
        rows, cols = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
        if vertical:
            rows = torch.where(flip[:, None], h - 1 - rows, rows)
        else:
            cols = torch.where(flip[:, None], w - 1 - cols, cols)
        return rows, cols, None, None, {"applied": flip}
    return RemapOp(name, {"p_flip": p_flip}, remap)


@AUGMENTATIONS.register(
    "hflip", params=(Param("p_flip", "float", 0.5, 0.0, 1.0, help="probability of flipping an image"),),
    description="Mirror left-right with probability p_flip.", tags=("geometric",))
def hflip(p_flip: float = 0.5) -> AugOp:
    return _flip("hflip", p_flip, vertical=False)


@AUGMENTATIONS.register(
    "vflip", params=(Param("p_flip", "float", 0.5, 0.0, 1.0, help="probability of flipping an image"),),
    description="Mirror upside-down with probability p_flip.", tags=("geometric",))
def vflip(p_flip: float = 0.5) -> AugOp:
    return _flip("vflip", p_flip, vertical=True)


@AUGMENTATIONS.register(
    "rotation",
    params=(Param("degrees", "float", 15.0, 0, 180, help="angle drawn uniformly in [-degrees, degrees]"),
            _PAD_MODE),
    description="Rotate about the centre by a random angle (positive = counter-clockwise).",
    tags=("geometric",))
def rotation(degrees: float = 15.0, pad_mode: str = "reflect") -> AugOp:
    def fn(x, gen):
        angle = _uniform(gen, x.shape[0], -degrees, degrees)
        if degrees == 0:
            return x, {"angle": angle}
        out = rotate(x, _on(angle, x), mode="bilinear", padding_mode=_GRID_PAD[pad_mode],
                     align_corners=True)
        return out.clamp_(0.0, 1.0), {"angle": angle}
    return _image_op("rotation", {"degrees": degrees, "pad_mode": pad_mode}, fn)


@AUGMENTATIONS.register(
    "translate",
    params=(Param("max_shift", "float", 0.125, 0.0, 0.5,
                  help="largest shift as a fraction of the image size (per axis)"),
            _PAD_MODE),
    description="Shift by a random whole number of pixels, up to max_shift of the size on each axis.",
    tags=("geometric",))
def translate_op(max_shift: float = 0.125, pad_mode: str = "reflect") -> AugOp:
    def fn(x, gen):
        b, _, h, w = x.shape
        u = _uniform(gen, (b, 2), -max_shift, max_shift)
        # whole pixels: no interpolation blur
        shift = torch.stack([u[:, 0] * w, u[:, 1] * h], 1).round()
        sampled = {"dx": shift[:, 0].long(), "dy": shift[:, 1].long()}
        if max_shift == 0:
            return x, sampled
        out = translate(x, _on(shift, x), mode="nearest", padding_mode=_GRID_PAD[pad_mode],
                        align_corners=True)
        return out, sampled
    return _image_op("translate", {"max_shift": max_shift, "pad_mode": pad_mode}, fn)


# ----------------------------------------------------------------------------------------------
# Colour (kornia.enhance, per-sample factors; all clamp to [0, 1])
# ----------------------------------------------------------------------------------------------

def _factor_op(name: str, strength: float, adjust: Callable) -> AugOp:
    def fn(x, gen):
        factor = _uniform(gen, x.shape[0], 1.0 - strength, 1.0 + strength)
        if strength == 0:
            return x, {"factor": factor}
        return adjust(x, _on(factor, x)).clamp_(0.0, 1.0), {"factor": factor}
    return _image_op(name, {"strength": strength}, fn)


@AUGMENTATIONS.register(
    "brightness",
    params=(Param("strength", "float", 0.2, 0.0, 1.0, help="factor drawn uniformly in [1-s, 1+s]"),),
    description="Multiply pixel values by a random factor in [1-s, 1+s] (multiplicative, as torchvision).",
    tags=("color",))
def brightness(strength: float = 0.2) -> AugOp:
    # multiplicative (PIL/torchvision convention), not kornia's additive adjust_brightness
    return _factor_op("brightness", strength, adjust_brightness_accumulative)


@AUGMENTATIONS.register(
    "contrast",
    params=(Param("strength", "float", 0.2, 0.0, 1.0, help="factor drawn uniformly in [1-s, 1+s]"),),
    description="Blend with the image's mean grey by a random factor in [1-s, 1+s] (PIL contrast).",
    tags=("color",))
def contrast(strength: float = 0.2) -> AugOp:
    return _factor_op("contrast", strength, adjust_contrast_with_mean_subtraction)


@AUGMENTATIONS.register(
    "saturation",
    params=(Param("strength", "float", 0.2, 0.0, 1.0, help="factor drawn uniformly in [1-s, 1+s]"),),
    description="Blend with the greyscale image by a random factor in [1-s, 1+s] (PIL saturation).",
    tags=("color",))
def saturation(strength: float = 0.2) -> AugOp:
    return _factor_op("saturation", strength, adjust_saturation_with_gray_subtraction)


@AUGMENTATIONS.register(
    "hue",
    params=(Param("strength", "float", 0.05, 0.0, 0.5,
                  help="hue shift drawn in [-s, s], as a fraction of the colour wheel"),),
    description="Rotate the hue by a random fraction of the colour wheel in [-s, s].",
    tags=("color",))
def hue(strength: float = 0.05) -> AugOp:
    def fn(x, gen):
        shift = _uniform(gen, x.shape[0], -strength, strength)
        if strength == 0:
            return x, {"shift": shift}
        out = adjust_hue(x, _on(shift * (2 * math.pi), x))  # kornia takes radians
        return out.clamp_(0.0, 1.0), {"shift": shift}
    return _image_op("hue", {"strength": strength}, fn)


# ----------------------------------------------------------------------------------------------
# Normalizers
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "per_image_standardization", params=(),
    description="Subtract each image's mean and divide by max(std, 1/sqrt(#values)), as TensorFlow does.",
    tags=("normalize",))
def per_image_standardization() -> AugOp:
    def fn(x, gen):
        # Hand-written: a two-line reduction; neither kornia nor torchvision has TF's per-image rule.
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(1)
        std = flat.std(1, correction=0).clamp_min(1.0 / math.sqrt(flat.shape[1]))
        out = (x - mean[:, None, None, None]) / std[:, None, None, None]
        return out, {"mean": mean, "std": std}  # statistics stay on x.device (no sync)
    return _image_op("per_image_standardization", {}, fn, stochastic=False, normalizes=True)


class ZCAOp(AugOp):
    """ZCA whitening: x -> (x - mean) @ U diag(1/sqrt(S + epsilon)) U^T, fitted on training images.

    Hand-written with torch.linalg.eigh instead of kornia.enhance.ZCAWhitening: kornia takes an SVD
    of the 3072x3072 covariance and materialises the whole float dataset; here the covariance is
    accumulated in chunks (uint8 input is converted chunk by chunk) over a seeded subset of at most
    `fit_images` images, and the eigendecomposition is symmetric (eigh).
    """

    needs_fit = True

    def __init__(self, epsilon: float, fit_images: int):
        super().__init__("zca", {"epsilon": epsilon, "fit_images": fit_images}, None,
                         stochastic=False, normalizes=True)
        self.epsilon = epsilon
        self.fit_images = fit_images
        self.mean: torch.Tensor | None = None    # (1, D) float32, CPU
        self.matrix: torch.Tensor | None = None  # (D, D) float32, CPU
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None  # kept only with fit(keep_eigenvectors=True)
        self.fit_count = 0  # images the fit used
        self.shape: tuple | None = None
        self._cache: dict = {}

    @property
    def fitted(self) -> bool:
        return self.matrix is not None

    @torch.no_grad()
    def fit(self, x, chunk: int = 4096, keep_eigenvectors: bool = False) -> "ZCAOp":
        """keep_eigenvectors: keep U (D x D, 37 MB for 3x32x32) so that `with_epsilon` can change
        epsilon without a new eigendecomposition (the augmentation previewer does)."""
        x = _as_nchw(x)
        n = x.shape[0]
        if n < 2:
            raise ValueError("zca.fit needs at least two images")
        if n > self.fit_images:  # a fixed-seed subset keeps the fit deterministic
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:self.fit_images]
            idx = idx.sort().values
        else:
            idx = torch.arange(n)
        idx = idx.to(x.device)
        dev = x.device
        d = x[0].numel()
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0

        def rows(i):
            return x.index_select(0, idx[i:i + chunk]).reshape(-1, d).float().mul_(scale)

        total = torch.zeros(d, dtype=torch.float64, device=dev)
        for i in range(0, len(idx), chunk):
            total += rows(i).sum(0, dtype=torch.float64)
        mean = (total / len(idx)).float()
        cov = torch.zeros(d, d, device=dev)
        for i in range(0, len(idx), chunk):
            r = rows(i).sub_(mean)
            cov.addmm_(r.T, r)
        cov /= len(idx) - 1
        # float64 eigh is ~10x slower on CPU for D=3072; float32 is accurate to ~1e-7*max eigenvalue
        eig_dtype = torch.float64 if dev.type == "cuda" else torch.float32
        s, u = torch.linalg.eigh(cov.to(eig_dtype))
        s = s.clamp_min(0)
        w = (u * (s + self.epsilon).rsqrt()) @ u.T
        self.mean = mean[None].cpu()
        self.matrix = w.float().cpu()
        self.eigenvalues = s.float().cpu()
        self.eigenvectors = u.float().cpu() if keep_eigenvectors else None
        self.fit_count = len(idx)
        self.shape = tuple(x.shape[1:])
        self._cache = {}
        return self

    def with_epsilon(self, epsilon: float) -> "ZCAOp":
        """A new op with the same fit and another epsilon (no new eigendecomposition; on the CPU the
        matrix is the one a fresh fit with that epsilon gives). Needs fit(keep_eigenvectors=True)."""
        if self.eigenvectors is None or self.eigenvalues is None:
            raise RuntimeError("zca.with_epsilon needs a fit with keep_eigenvectors=True")
        op = ZCAOp(epsilon, self.fit_images)
        u, s = self.eigenvectors, self.eigenvalues
        op.mean, op.eigenvalues, op.eigenvectors = self.mean, s, u
        op.fit_count, op.shape = self.fit_count, self.shape
        op.matrix = ((u * (s + epsilon).rsqrt()) @ u.T).float()
        return op

    def _on_device(self, device):
        key = str(device)
        if key not in self._cache:
            matrix = self.matrix.to(device)
            self._cache[key] = (-self.mean.to(device) @ matrix, matrix)
        return self._cache[key]

    def __call__(self, x, y, gen):
        if not self.fitted:
            raise RuntimeError("zca is not fitted: call fit(training_images) (AugmentChain.fit) "
                               "before applying it")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"zca was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")
        bias, matrix = self._on_device(x.device)
        out = torch.addmm(bias, x.reshape(x.shape[0], -1), matrix)  # (x - mean) W, W symmetric
        return out.view_as(x), y, {}


@AUGMENTATIONS.register(
    "zca",
    params=(Param("epsilon", "float", 1e-2, 1e-5, 1.0, log=True,
                  help="added to covariance eigenvalues; larger keeps more of the image's look"),
            Param("fit_images", "int", 20000, 100, 60000,
                  help="training images (seeded random subset) used to fit the whitening matrix")),
    description="ZCA whitening fitted on the training images (decorrelates pixels, boosts edges).",
    tags=("normalize",))
def zca(epsilon: float = 1e-2, fit_images: int = 20000) -> ZCAOp:
    return ZCAOp(epsilon, fit_images)


# ----------------------------------------------------------------------------------------------
# Blur (kornia.filters)
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "mean_blur",
    params=(Param("kernel_size", "int", 3, 1, 9, help="odd box size; 1 = no blur"),),
    description="Box (mean) filter with a fixed odd kernel size.", tags=("blur",))
def mean_blur(kernel_size: int = 3) -> AugOp:
    _check_odd(kernel_size, "mean_blur")

    def fn(x, gen):
        sampled = {"kernel_size": _full(x.shape[0], kernel_size, torch.long)}
        if kernel_size == 1:
            return x, sampled
        return box_blur(x, kernel_size, border_type="reflect"), sampled
    return _image_op("mean_blur", {"kernel_size": kernel_size}, fn, stochastic=False)


@AUGMENTATIONS.register(
    "median_blur",
    params=(Param("kernel_size", "int", 3, 1, 7, help="odd window size; 1 = no blur"),),
    description="Median filter with a fixed odd kernel size.", tags=("blur",))
def median_blur_op(kernel_size: int = 3) -> AugOp:
    _check_odd(kernel_size, "median_blur")

    def fn(x, gen):
        sampled = {"kernel_size": _full(x.shape[0], kernel_size, torch.long)}
        if kernel_size == 1:
            return x, sampled
        return median_blur(x, kernel_size, border_type="reflect"), sampled
    return _image_op("median_blur", {"kernel_size": kernel_size}, fn, stochastic=False)


@AUGMENTATIONS.register(
    "gaussian_blur",
    params=(Param("kernel_size", "int", 5, 1, 15, help="odd kernel size; 1 = no blur"),
            Param("sigma", "float_pair", (0.1, 1.5), 0.01, 5.0, help="sigma drawn uniformly per image")),
    description="Gaussian blur with a per-image sigma drawn from a range.", tags=("blur",))
def gaussian_blur(kernel_size: int = 5, sigma=(0.1, 1.5)) -> AugOp:
    _check_odd(kernel_size, "gaussian_blur")
    if sigma[0] <= 0:
        raise ConfigError("gaussian_blur.sigma: values must be positive")

    def fn(x, gen):
        s = _uniform(gen, x.shape[0], *sigma)
        if kernel_size == 1:
            return x, {"sigma": s}
        out = gaussian_blur2d(x, kernel_size, _on(s[:, None].expand(-1, 2), x), border_type="reflect")
        return out, {"sigma": s}
    return _image_op("gaussian_blur", {"kernel_size": kernel_size, "sigma": tuple(sigma)}, fn)


@AUGMENTATIONS.register(
    "bilateral_blur",
    params=(Param("kernel_size", "int", 5, 1, 9, help="odd kernel size; 1 = no blur"),
            Param("sigma_color", "float_pair", (0.05, 0.2), 0.001, 1.0,
                  help="colour sigma (pixel-value units) drawn per image; small keeps edges"),
            Param("sigma_space", "float_pair", (0.5, 2.0), 0.05, 5.0,
                  help="spatial sigma in pixels drawn per image")),
    description="Edge-preserving bilateral blur with per-image colour and spatial sigmas.",
    tags=("blur",))
def bilateral_blur_op(kernel_size: int = 5, sigma_color=(0.05, 0.2), sigma_space=(0.5, 2.0)) -> AugOp:
    _check_odd(kernel_size, "bilateral_blur")

    def fn(x, gen):
        b = x.shape[0]
        sc = _uniform(gen, b, *sigma_color)
        ss = _uniform(gen, b, *sigma_space)
        sampled = {"sigma_color": sc, "sigma_space": ss}
        if kernel_size == 1:
            return x, sampled
        out = bilateral_blur(x, kernel_size, _on(sc, x), _on(ss[:, None].expand(-1, 2), x),
                             border_type="reflect")
        return out.clamp_(0.0, 1.0), sampled
    return _image_op("bilateral_blur", {"kernel_size": kernel_size, "sigma_color": tuple(sigma_color),
                                        "sigma_space": tuple(sigma_space)}, fn)


# ----------------------------------------------------------------------------------------------
# Erasing and mixing (hand-written: see each op)
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "cutout",
    params=(Param("size", "int", 8, 0, 32, help="side of each square hole in pixels; 0 = off"),
            Param("n_holes", "int", 1, 1, 4, help="holes per image"),
            Param("fill", "choice", "zero", choices=("zero", "mean"),
                  help="hole colour: black, or the image's own per-channel mean")),
    description="Erase square holes centred anywhere (clipped at the border).", tags=("erase",))
def cutout(size: int = 8, n_holes: int = 1, fill: str = "zero") -> AugOp:
    def fn(x, gen):
        b, _, h, w = x.shape
        cy = torch.randint(0, h, (b, n_holes), generator=gen)
        cx = torch.randint(0, w, (b, n_holes), generator=gen)
        sampled = {"center_y": cy, "center_x": cx}
        if size == 0:
            return x, sampled
        # Hand-written: kornia's RandomErasing samples its own boxes from the global RNG; a
        # broadcast comparison against per-image hole corners builds all masks in one shot.
        y0 = _on(cy - size // 2, x)[:, :, None, None]
        x0 = _on(cx - size // 2, x)[:, :, None, None]
        r = torch.arange(h, device=x.device)[:, None]
        c = torch.arange(w, device=x.device)[None, :]
        hole = ((r >= y0) & (r < y0 + size) & (c >= x0) & (c < x0 + size)).any(1, keepdim=True)
        value = x.mean((2, 3), keepdim=True) if fill == "mean" else torch.zeros((), device=x.device)
        return torch.where(hole, value, x), sampled
    return _image_op("cutout", {"size": size, "n_holes": n_holes, "fill": fill}, fn)


def _mix_labels(y, partner, lam):
    if y is None:
        return None
    lam = _on(lam, y)[:, None]
    return lam * y + (1 - lam) * y.index_select(0, _on(partner, y))


@AUGMENTATIONS.register(
    "mixup",
    params=(Param("alpha", "float", 0.2, 0.0, 2.0,
                  help="Beta(alpha, alpha) for the mixing weight; 0 = off"),),
    description="Blend each image (and label) with a partner from the batch: lam*x + (1-lam)*x[partner].",
    tags=("mix",))
def mixup(alpha: float = 0.2) -> AugOp:
    # Hand-written: torchvision's v2 MixUp uses the global RNG, one lam per batch, and hides lam/partner.
    def apply(x, y, gen):
        b = x.shape[0]
        if alpha == 0:
            return x, y, {"partner": torch.arange(b), "lam": torch.ones(b)}
        partner = torch.randperm(b, generator=gen)
        lam = _beta(gen, b, alpha)
        lam_x = _on(lam, x)[:, None, None, None]
        out = lam_x * x + (1 - lam_x) * x.index_select(0, _on(partner, x))
        return out, _mix_labels(y, partner, lam), {"partner": partner, "lam": lam}
    return AugOp("mixup", {"alpha": alpha}, apply, batch_level=True)


@AUGMENTATIONS.register(
    "cutmix",
    params=(Param("alpha", "float", 1.0, 0.0, 2.0, help="Beta(alpha, alpha) for the kept area; 0 = off"),),
    description="Paste a random box from a partner image; labels mixed by the pasted area.",
    tags=("mix",))
def cutmix(alpha: float = 1.0) -> AugOp:
    # Hand-written: torchvision's v2 CutMix uses the global RNG, one box per batch, and hides the box.
    def apply(x, y, gen):
        b, _, h, w = x.shape
        if alpha == 0:
            return x, y, {"partner": torch.arange(b), "lam": torch.ones(b),
                          "box": torch.zeros(b, 4, dtype=torch.long)}
        partner = torch.randperm(b, generator=gen)
        lam = _beta(gen, b, alpha)
        cut = torch.sqrt(1.0 - lam)
        cut_w, cut_h = (cut * w).long(), (cut * h).long()
        cx = torch.randint(0, w, (b,), generator=gen)
        cy = torch.randint(0, h, (b,), generator=gen)
        x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
        y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
        lam = 1.0 - ((x1 - x0) * (y1 - y0)).float() / (h * w)  # the area actually pasted
        box = torch.stack([x0, y0, x1, y1], 1)
        bd = _on(box, x)[:, :, None, None]
        r = torch.arange(h, device=x.device)[:, None]
        c = torch.arange(w, device=x.device)[None, :]
        inside = (r >= bd[:, 1]) & (r < bd[:, 3]) & (c >= bd[:, 0]) & (c < bd[:, 2])  # (B,H,W)
        out = torch.where(inside[:, None], x.index_select(0, _on(partner, x)), x)
        return out, _mix_labels(y, partner, lam), {"partner": partner, "lam": lam, "box": box}
    return AugOp("cutmix", {"alpha": alpha}, apply, batch_level=True)


# ----------------------------------------------------------------------------------------------
# Chain
# ----------------------------------------------------------------------------------------------

_P = Param("p", "float", 1.0, 0, 1, help="probability per image that the step applies")
_SPEC_KEYS = ("name", "params", "p")


def _validate_step(i: int, spec: Any) -> tuple[dict, AugOp]:
    where = f"augment[{i}]"
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected {{name, params, p}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                          f"(allowed: {', '.join(_SPEC_KEYS)})")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: missing augmentation name")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} {name}.params: expected a mapping, got {params!r}")
    try:
        entry = AUGMENTATIONS.get(name)
        values = entry.validate(params)
        p = _P.validate(spec.get("p", 1.0), name)
        op = entry.fn(**values)  # some ops check combinations (odd kernel sizes)
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None
    return {"name": name, "params": values, "p": p}, op


def _validate(specs) -> tuple[list[dict], list[AugOp]]:
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"augment: expected a list of steps, got {specs!r}")
    out, ops = [], []
    normalizer = None
    for i, spec in enumerate(specs):
        step, op = _validate_step(i, spec)
        tags = AUGMENTATIONS.get(step["name"]).tags
        if normalizer is not None and "color" in tags:
            raise ConfigError(f"augment[{i}] {step['name']}: colour steps clamp to [0, 1] and cannot "
                              f"follow the normalizing step {normalizer}; move it earlier")
        if op.normalizes:
            normalizer = step["name"]
        out.append(step)
        ops.append(op)
    return out, ops


def validate_chain(specs) -> list[dict]:
    """Return specs as [{"name", "params" (defaults filled, coerced), "p"}]; ConfigError if invalid."""
    return _validate(specs)[0]


def _as_nchw(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):  # NHWC (numpy layout)
        x = x.permute(0, 3, 1, 2)
    return x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    # float() then div_: as the engine's eval path does (and ~7x faster on CPU than uint8.div(255.))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class AugmentChain:
    """A validated list of steps applied in order: ``chain(x, y, gen, record=False)``.

    Each step applies to a random subset of images chosen with probability p (drawn from gen).
    For per-image ops only the chosen images are processed (index_select / index_copy); for
    batch-level ops (mixup, cutmix) the whole batch is mixed and the chosen images kept, so
    partners are drawn from the whole batch. Consecutive pixel-moving steps (RemapOp: random_crop,
    hflip, vflip) are composed into one index map and applied with a single gather; the random
    draws and the result are the same as applying them one by one.
    """

    def __init__(self, specs, num_classes: int = 10):
        self.specs, self.ops = _validate(specs)
        self._fuse = True  # compose consecutive RemapOp steps into one gather (same result)
        self.num_classes = num_classes
        self.keys = []
        seen: dict[str, int] = {}
        for step in self.specs:
            n = seen[step["name"]] = seen.get(step["name"], 0) + 1
            self.keys.append(step["name"] if n == 1 else f"{step['name']}#{n}")

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return f"AugmentChain({self.specs!r})"

    @property
    def normalizes(self) -> bool:
        return any(op.normalizes for op in self.ops)

    @property
    def needs_fit(self) -> bool:
        return any(op.needs_fit and not op.fitted for op in self.ops)

    def fit(self, x) -> "AugmentChain":
        """Fit steps that need it (zca) on training images: uint8 or float, (N,3,H,W) or (N,H,W,3)."""
        for op in self.ops:
            if op.needs_fit:
                op.fit(x)
        return self

    def _labels(self, y, x, num_classes):
        if y is None:
            return None
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point() and y.dim() == 2:
            return y.float()
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(f"labels must be int (B,) or soft (B, C), got {y.dtype} {tuple(y.shape)}")
        return F.one_hot(y.long(), num_classes).float()

    def __call__(self, x, y=None, gen: torch.Generator | None = None, record: bool = False,
                 num_classes: int | None = None):
        x = _as_nchw(x)
        if x.dtype != torch.uint8:
            x = x.float()
        # uint8 input is converted to float /255 lazily: leading pixel moves (crop, flips) commute
        # with the conversion, so they gather 1-byte pixels instead of 4-byte ones.
        y = self._labels(y, x, num_classes or self.num_classes)
        if gen is None:
            gen = torch.Generator()
        if gen.device.type != "cpu":
            raise ValueError("augmentations draw their randomness from a CPU torch.Generator")
        b, _, h, w = x.shape
        records = [{} for _ in range(b)] if record else None
        if b == 0:
            return _to_float(x), y, records
        pending = None  # composed index maps of consecutive pixel-moving steps, not yet applied
        for key, step, op in zip(self.keys, self.specs, self.ops):
            p = step["p"]
            mask, idx, sampled = None, None, {}  # mask None: every image; idx: subset that ran
            if p < 1:
                mask = torch.zeros(b, dtype=torch.bool) if p <= 0 else _coin(gen, b, p)
                if not op.batch_level:
                    idx = mask.nonzero().squeeze(1)
            if p <= 0:
                pass
            elif self._fuse and isinstance(op, RemapOp):
                maps, sampled = self._remap(op, b, h, w, idx, gen)
                pending = maps if pending is None else _compose_remaps(pending, maps)
            else:
                if pending is not None:
                    x, pending = _gather_pixels(x, *pending), None
                x = _to_float(x)
                if op.batch_level:
                    xo, yo, sampled = op(x, y, gen)
                    if mask is not None:  # mix everything, keep the chosen images
                        m = mask.to(x.device)
                        xo = torch.where(m[:, None, None, None], xo, x)
                        yo = None if y is None else torch.where(m[:, None], yo, y)
                    x, y = xo, yo
                elif idx is None:
                    x, y, sampled = op(x, y, gen)
                elif len(idx):  # run on the chosen images only
                    idx_d = idx.to(x.device)
                    ys = None if y is None else y.index_select(0, idx_d)
                    xs, ys, sampled = op(x.index_select(0, idx_d), ys, gen)
                    x = x.index_copy(0, idx_d, xs)
                    if y is not None:
                        y = y.index_copy(0, idx_d, ys)
            if record:
                self._record(records, key, b, mask, idx, sampled)
        if pending is not None:
            x = _gather_pixels(x, *pending)
        return _to_float(x), y, records

    @staticmethod
    def _remap(op: RemapOp, b, h, w, idx, gen):
        """The op's index maps for the whole batch; images outside `idx` keep the identity."""
        n = b if idx is None else len(idx)
        if n == 0:
            return (torch.arange(h).expand(b, h), torch.arange(w).expand(b, w), None, None), {}
        rows, cols, row_ok, col_ok, sampled = op.remap(n, h, w, gen)
        if idx is None:
            return (rows, cols, row_ok, col_ok), sampled
        full_r, full_c = torch.arange(h).repeat(b, 1), torch.arange(w).repeat(b, 1)
        full_r[idx], full_c[idx] = rows, cols
        ok_r = ok_c = None
        if row_ok is not None:
            ok_r = torch.ones(b, h, dtype=torch.bool)
            ok_r[idx] = row_ok
        if col_ok is not None:
            ok_c = torch.ones(b, w, dtype=torch.bool)
            ok_c[idx] = col_ok
        return (full_r, full_c, ok_r, ok_c), sampled

    @staticmethod
    def _record(records, key, b, mask, idx, sampled):
        applied = torch.ones(b, dtype=torch.bool) if mask is None else mask.clone()
        values = {k: v.detach().cpu().tolist() for k, v in sampled.items()}
        # position of image i inside the sampled tensors (they cover only idx when a subset ran)
        pos = list(range(b)) if idx is None else [None] * b
        if idx is not None:
            for j, i in enumerate(idx.tolist()):
                pos[i] = j
        op_applied = values.pop("applied", None)
        for i in range(b):
            j = pos[i]
            ok = bool(applied[i]) and j is not None and (op_applied is None or bool(op_applied[j]))
            entry = {k: v[j] for k, v in values.items()} if j is not None and values else {}
            entry["applied"] = ok
            records[i][key] = entry


from . import augment_policies  # noqa: E402,F401  (registers trivial_augment, rand_augment, random_erasing)
