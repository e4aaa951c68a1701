"""The registered augmentation ops: geometric, colour, blur, erasing and mixing."""
from __future__ import annotations

import math
from typing import Callable

import torch
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                            adjust_hue, adjust_saturation_with_gray_subtraction)
from kornia.filters import bilateral_blur, box_blur, gaussian_blur2d, median_blur
from kornia.geometry.transform import crop_and_resize, rotate, translate, warp_affine

from ..params import ConfigError, Param
from .base import (AUGMENTATIONS, GRID_PAD, PAD_MODE, AugOp, RemapOp, check_odd, draw_beta, draw_uniform, filled, image_op, reflect_index,
                   to_device_of)


# ----------------------------------------------------------------------------------------------
# Geometric
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "random_crop",
    params=(Param("padding", "int", 4, 0, 16, help="pixels padded on each side before cropping back"),
            PAD_MODE),
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
            return reflect_index(rows, h), reflect_index(cols, w), None, None, sampled
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
        area = draw_uniform(gen, b, *scale) * (h * w)
        log_r = draw_uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]))
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
        out = crop_and_resize(x, to_device_of(boxes, x), (h, w), mode="bilinear", align_corners=True)
        return out.clamp_(0.0, 1.0), sampled
    return image_op("random_resized_crop", {"scale": tuple(scale), "ratio": tuple(ratio)}, fn)


@AUGMENTATIONS.register(
    "zoom",
    params=(Param("zoom", "float_pair", (0.8, 1.2), 0.5, 2.0,
                  help="scale factor range; >1 zooms in (crop), <1 zooms out (pad)"),
            PAD_MODE),
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
        s = draw_uniform(gen, b, *zoom)
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
        out = warp_affine(x, to_device_of(m, x), (h, w), mode="bilinear", padding_mode=GRID_PAD[pad_mode],
                          align_corners=True)
        return out.clamp_(0.0, 1.0), sampled
    return image_op("zoom", {"zoom": tuple(zoom), "pad_mode": pad_mode}, fn)


def _flip(name: str, vertical: bool) -> AugOp:
    """Mirror every image it is given. How many are flipped is the chain step's own probability p
    (0.5 unless the step says otherwise, see chain.DEFAULT_STEP_P): there is no second probability."""
    def remap(n, h, w, gen):
        rows, cols = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
        if vertical:
            rows = h - 1 - rows
        else:
            cols = w - 1 - cols
        return rows, cols, None, None, {}
    op = RemapOp(name, {}, remap)
    op.stochastic = False  # draws nothing: the step's p decides which images it gets
    return op


@AUGMENTATIONS.register(
    "hflip", description="Mirror left-right (the step's probability p: how many images, 0.5 by default).",
    tags=("geometric",))
def hflip() -> AugOp:
    return _flip("hflip", vertical=False)


@AUGMENTATIONS.register(
    "vflip", description="Mirror upside-down (the step's probability p: how many images, 0.5 by default).",
    tags=("geometric",))
def vflip() -> AugOp:
    return _flip("vflip", vertical=True)


@AUGMENTATIONS.register(
    "rotation",
    params=(Param("degrees", "float", 15.0, 0, 180, help="angle drawn uniformly in [-degrees, degrees]"),
            PAD_MODE),
    description="Rotate about the centre by a random angle (positive = counter-clockwise).",
    tags=("geometric",))
def rotation(degrees: float = 15.0, pad_mode: str = "reflect") -> AugOp:
    def fn(x, gen):
        angle = draw_uniform(gen, x.shape[0], -degrees, degrees)
        if degrees == 0:
            return x, {"angle": angle}
        out = rotate(x, to_device_of(angle, x), mode="bilinear", padding_mode=GRID_PAD[pad_mode],
                     align_corners=True)
        return out.clamp_(0.0, 1.0), {"angle": angle}
    return image_op("rotation", {"degrees": degrees, "pad_mode": pad_mode}, fn)


@AUGMENTATIONS.register(
    "translate",
    params=(Param("max_shift", "float", 0.125, 0.0, 0.5,
                  help="largest shift as a fraction of the image size (per axis)"),
            PAD_MODE),
    description="Shift by a random whole number of pixels, up to max_shift of the size on each axis.",
    tags=("geometric",))
def translate_op(max_shift: float = 0.125, pad_mode: str = "reflect") -> AugOp:
    def fn(x, gen):
        b, _, h, w = x.shape
        u = draw_uniform(gen, (b, 2), -max_shift, max_shift)
        # whole pixels: no interpolation blur
        shift = torch.stack([u[:, 0] * w, u[:, 1] * h], 1).round()
        sampled = {"dx": shift[:, 0].long(), "dy": shift[:, 1].long()}
        if max_shift == 0:
            return x, sampled
        out = translate(x, to_device_of(shift, x), mode="nearest", padding_mode=GRID_PAD[pad_mode],
                        align_corners=True)
        return out, sampled
    return image_op("translate", {"max_shift": max_shift, "pad_mode": pad_mode}, fn)


# ----------------------------------------------------------------------------------------------
# Colour (kornia.enhance, per-sample factors; all clamp to [0, 1])
# ----------------------------------------------------------------------------------------------

def _factor_op(name: str, strength: float, adjust: Callable) -> AugOp:
    def fn(x, gen):
        factor = draw_uniform(gen, x.shape[0], 1.0 - strength, 1.0 + strength)
        if strength == 0:
            return x, {"factor": factor}
        return adjust(x, to_device_of(factor, x)).clamp_(0.0, 1.0), {"factor": factor}
    return image_op(name, {"strength": strength}, fn)


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
        shift = draw_uniform(gen, x.shape[0], -strength, strength)
        if strength == 0:
            return x, {"shift": shift}
        out = adjust_hue(x, to_device_of(shift * (2 * math.pi), x))  # kornia takes radians
        return out.clamp_(0.0, 1.0), {"shift": shift}
    return image_op("hue", {"strength": strength}, fn)


# ----------------------------------------------------------------------------------------------
# Blur (kornia.filters)
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "mean_blur",
    params=(Param("kernel_size", "int", 3, 1, 9, help="odd box size; 1 = no blur"),),
    description="Box (mean) filter with a fixed odd kernel size.", tags=("blur",))
def mean_blur(kernel_size: int = 3) -> AugOp:
    check_odd(kernel_size, "mean_blur")

    def fn(x, gen):
        sampled = {"kernel_size": filled(x.shape[0], kernel_size, torch.long)}
        if kernel_size == 1:
            return x, sampled
        return box_blur(x, kernel_size, border_type="reflect"), sampled
    return image_op("mean_blur", {"kernel_size": kernel_size}, fn, stochastic=False)


@AUGMENTATIONS.register(
    "median_blur",
    params=(Param("kernel_size", "int", 3, 1, 7, help="odd window size; 1 = no blur"),),
    description="Median filter with a fixed odd kernel size.", tags=("blur",))
def median_blur_op(kernel_size: int = 3) -> AugOp:
    check_odd(kernel_size, "median_blur")

    def fn(x, gen):
        sampled = {"kernel_size": filled(x.shape[0], kernel_size, torch.long)}
        if kernel_size == 1:
            return x, sampled
        return median_blur(x, kernel_size, border_type="reflect"), sampled
    return image_op("median_blur", {"kernel_size": kernel_size}, fn, stochastic=False)


@AUGMENTATIONS.register(
    "gaussian_blur",
    params=(Param("kernel_size", "int", 5, 1, 15, help="odd kernel size; 1 = no blur"),
            Param("sigma", "float_pair", (0.1, 1.5), 0.01, 5.0, help="sigma drawn uniformly per image")),
    description="Gaussian blur with a per-image sigma drawn from a range.", tags=("blur",))
def gaussian_blur(kernel_size: int = 5, sigma=(0.1, 1.5)) -> AugOp:
    check_odd(kernel_size, "gaussian_blur")
    if sigma[0] <= 0:
        raise ConfigError("gaussian_blur.sigma: values must be positive")

    def fn(x, gen):
        s = draw_uniform(gen, x.shape[0], *sigma)
        if kernel_size == 1:
            return x, {"sigma": s}
        out = gaussian_blur2d(x, kernel_size, to_device_of(s[:, None].expand(-1, 2), x), border_type="reflect")
        return out, {"sigma": s}
    return image_op("gaussian_blur", {"kernel_size": kernel_size, "sigma": tuple(sigma)}, fn)


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
    check_odd(kernel_size, "bilateral_blur")

    def fn(x, gen):
        b = x.shape[0]
        sc = draw_uniform(gen, b, *sigma_color)
        ss = draw_uniform(gen, b, *sigma_space)
        sampled = {"sigma_color": sc, "sigma_space": ss}
        if kernel_size == 1:
            return x, sampled
        out = bilateral_blur(x, kernel_size, to_device_of(sc, x), to_device_of(ss[:, None].expand(-1, 2), x),
                             border_type="reflect")
        return out.clamp_(0.0, 1.0), sampled
    return image_op("bilateral_blur", {"kernel_size": kernel_size, "sigma_color": tuple(sigma_color),
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
        y0 = to_device_of(cy - size // 2, x)[:, :, None, None]
        x0 = to_device_of(cx - size // 2, x)[:, :, None, None]
        r = torch.arange(h, device=x.device)[:, None]
        c = torch.arange(w, device=x.device)[None, :]
        hole = ((r >= y0) & (r < y0 + size) & (c >= x0) & (c < x0 + size)).any(1, keepdim=True)
        value = x.mean((2, 3), keepdim=True) if fill == "mean" else torch.zeros((), device=x.device)
        return torch.where(hole, value, x), sampled
    return image_op("cutout", {"size": size, "n_holes": n_holes, "fill": fill}, fn)


def _mix_labels(y, partner, lam):
    if y is None:
        return None
    lam = to_device_of(lam, y)[:, None]
    return lam * y + (1 - lam) * y.index_select(0, to_device_of(partner, y))


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
        lam = draw_beta(gen, b, alpha)
        lam_x = to_device_of(lam, x)[:, None, None, None]
        out = lam_x * x + (1 - lam_x) * x.index_select(0, to_device_of(partner, x))
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
        lam = draw_beta(gen, b, alpha)
        cut = torch.sqrt(1.0 - lam)
        cut_w, cut_h = (cut * w).long(), (cut * h).long()
        cx = torch.randint(0, w, (b,), generator=gen)
        cy = torch.randint(0, h, (b,), generator=gen)
        x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
        y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
        lam = 1.0 - ((x1 - x0) * (y1 - y0)).float() / (h * w)  # the area actually pasted
        box = torch.stack([x0, y0, x1, y1], 1)
        bd = to_device_of(box, x)[:, :, None, None]
        r = torch.arange(h, device=x.device)[:, None]
        c = torch.arange(w, device=x.device)[None, :]
        inside = (r >= bd[:, 1]) & (r < bd[:, 3]) & (c >= bd[:, 0]) & (c < bd[:, 2])  # (B,H,W)
        out = torch.where(inside[:, None], x.index_select(0, to_device_of(partner, x)), x)
        return out, _mix_labels(y, partner, lam), {"partner": partner, "lam": lam, "box": box}
    return AugOp("cutmix", {"alpha": alpha}, apply, batch_level=True)


