"""Reading untrusted image files safely, and reducing them to the 32×32 tiles the models see.

One function, `read_image`, serves every page that accepts a user's image (the augmentation
previewer and the classifier). It either returns a `LoadedImage` or raises `ImageReadError` with a
message meant for the user that names the file; no other exception type leaves it.

Limits (both documented on the pages):
  * MAX_UPLOAD_BYTES = 10 MB, the same as `.streamlit/config.toml` maxUploadSize;
  * MAX_PIXELS = 40 million pixels (width × height as declared in the file header, checked
    *before* any pixel is decoded): a 40 MP RGB image takes 120 MB once decoded, and a few
    kilobytes of PNG can declare gigapixels ("decompression bomb"). Pillow's own bomb guard
    (DecompressionBombWarning / DecompressionBombError) is also turned into a refusal.

Only raster formats read entirely by Pillow's own decoders are accepted (`ALLOWED_FORMATS`): no
EPS (Pillow would run Ghostscript on it), PSD, PDF or other exotic plugins.

Reduction (PREPROCESS_DESCRIPTION): EXIF orientation applied; converted to RGB (an embedded colour
profile other than sRGB, or LAB, converted to sRGB with LittleCMS; transparency composited over
white; 16-bit and float images scaled to 8 bits rather than clipped); shorter
side resized to 32 px with Pillow's bicubic filter (antialiased: its support grows with the
downscale factor); centre-cropped to 32×32. Pixel for pixel the same as torchvision's
Resize(32, InterpolationMode.BICUBIC) + CenterCrop(32) on the RGB image (tested).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_UPLOAD_BYTES", "MAX_PIXELS", "DISPLAY_MAX_SIDE", "ALLOWED_FORMATS", "UPLOAD_TYPES",
           "PREPROCESS_DESCRIPTION", "ImageReadError", "LoadedImage", "read_image", "to_tile",
           "enlarge", "png_bytes"]

MAX_UPLOAD_BYTES: int = 10 * 1024 * 1024  # matches .streamlit/config.toml maxUploadSize = 10 (MB)
MAX_PIXELS: int = 40_000_000  # refuse bigger images before decoding them (decompression bombs)
DISPLAY_MAX_SIDE: int = 1024  # LoadedImage.original is thumbnailed to at most this many px a side

PREPROCESS_DESCRIPTION: str = (
    "EXIF orientation applied; converted to sRGB (colour profile applied; transparency composited "
    "over white; 16-bit and float images scaled to 8-bit, not clipped); shorter side resized to "
    "32 px (bicubic, antialiased); centre-cropped to 32×32.")

# Pillow format names tried by Image.open, and the file extensions an uploader should offer.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "PPM",
                                    "TGA", "ICO", "AVIF")
UPLOAD_TYPES: tuple[str, ...] = ("png", "jpg", "jpeg", "jfif", "gif", "webp", "bmp", "tif", "tiff",
                                 "ppm", "pgm", "pbm", "pnm", "tga", "ico", "avif")

# EXIF orientation tag -> what exif_transpose does to show the picture upright
_ORIENTATION = {2: "mirrored left-right", 3: "rotated 180°", 4: "flipped top-bottom",
                5: "transposed (mirrored and rotated 90°)", 6: "rotated 90° clockwise",
                7: "transversed (mirrored and rotated 90°)", 8: "rotated 90° counter-clockwise"}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(ValueError):
    """The file cannot be used as an image; ``str(e)`` is a user message naming the file."""


@dataclass
class LoadedImage:
    name: str
    original: Image.Image  # RGB, upright (EXIF applied); thumbnailed to <= DISPLAY_MAX_SIDE px
    tile: np.ndarray  # uint8 (32, 32, 3): exactly what the models get
    steps: list[str] = field(default_factory=list)  # the reduction steps actually applied
    original_size: tuple[int, int] = (0, 0)  # (width, height) as stored in the file
    original_mode: str = ""  # Pillow mode as stored in the file ("RGB", "I;16", "CMYK", "P", ...)


def _allowed_formats() -> list[str]:
    Image.init()
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _name_of(source, name: str) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source)) or "image"
    return os.path.basename(str(getattr(source, "name", "") or "")) or "image"


def _read_bytes(source, name: str, max_bytes: int) -> bytes:
    """All bytes of the source, refusing more than max_bytes without reading them all."""
    limit = f"the limit is {_mb(max_bytes)}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageReadError(f"{name}: the file is {_mb(len(data))}; {limit}")
        return data
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
            if size > max_bytes:
                raise ImageReadError(f"{name}: the file is {_mb(size)}; {limit}")
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except ImageReadError:
            raise
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read the file ({exc.strerror or exc})") from None
    elif hasattr(source, "read"):
        try:
            data = source.read(max_bytes + 1)
        except Exception as exc:
            raise ImageReadError(f"{name}: cannot read the upload ({exc})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageReadError(f"{name}: the upload did not give bytes")
        data = bytes(data)
    else:
        raise ImageReadError(f"{name}: expected file bytes, a path or an open binary file, "
                             f"got {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageReadError(f"{name}: the file is larger than {_mb(max_bytes)}; {limit}")
    return data


def _scale_to_uint8(img: Image.Image) -> tuple[Image.Image, str]:
    """16-bit / 32-bit integer / float greyscale to 8-bit 'L', scaled (Pillow's convert clips)."""
    a = np.asarray(img)
    mode = img.mode
    if a.size == 0:
        return Image.new("L", img.size), ""
    if mode.startswith("I;16"):
        out, how = a.astype(np.float64) / 257.0, "16-bit scaled to 8-bit (÷257)"
    else:
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        a = np.where(finite, a, 0.0)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            out, how = a * 255.0, "float [0, 1] scaled to 8-bit (×255)"
        elif lo >= 0.0 and hi <= 255.0:
            out, how = a, f"{mode} values already within 0…255"
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            out, how = a / 257.0, "16-bit scaled to 8-bit (÷257)"
        else:
            span = hi - lo if hi > lo else 1.0
            out, how = (a - lo) * (255.0 / span), f"{mode} values {lo:g}…{hi:g} stretched to 0…255"
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L"), how


def _colour_managed(img: Image.Image, steps: list[str]) -> Image.Image:
    """RGB / CMYK with an embedded colour profile other than sRGB, and LAB: converted to sRGB with
    Pillow's ImageCms (LittleCMS). If the profile cannot be used, the values are taken as they are
    and the steps say so."""
    mode = img.mode
    icc = img.info.get("icc_profile")
    if mode not in ("RGB", "CMYK", "LAB") or (mode != "LAB" and not icc):
        return img
    try:
        from PIL import ImageCms
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc)) if icc else ImageCms.createProfile("LAB")
        name = (ImageCms.getProfileDescription(source) or "").strip() or "unnamed"
        if mode != "LAB" and name.lower().startswith("srgb"):
            return img  # already sRGB
        out = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        steps.append(f"{mode} colour profile '{name}' → sRGB" if icc else "LAB → sRGB")
        return out
    except Exception:  # a broken or unsupported profile: Pillow's plain conversion below
        steps.append("embedded colour profile unusable: values taken as sRGB")
        return img


def _to_rgb(img: Image.Image, steps: list[str]) -> Image.Image:
    """Any Pillow mode to RGB; transparency composited over white."""
    img = _colour_managed(img, steps)
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        img, how = _scale_to_uint8(img)
        steps.append(how)
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is (partly) transparent
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            steps.append(f"{mode} with transparency → composited over white")
            return Image.alpha_composite(white, rgba).convert("RGB")
        img = rgba
    if img.mode != "RGB":
        if mode != "RGBA":
            steps.append(f"{mode} → RGB")
        img = img.convert("RGB")
    return img


def to_tile(img: Image.Image, size: int = 32) -> np.ndarray:
    """The documented reduction: shorter side resized to `size` px (bicubic, antialiased), then a
    centre crop to size×size (rounded like torchvision's CenterCrop). RGB in, uint8 (size, size, 3) out."""
    return _tile_and_step(img, size)[0]


def _tile_and_step(img: Image.Image, size: int = 32) -> tuple[np.ndarray, str]:
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}×{h}")
    short = min(w, h)
    # the long side is truncated, as torchvision's Resize(size) does, so the result is identical
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    tile = np.asarray(img, dtype=np.uint8).copy()
    if (w, h) == (size, size):
        step = f"already {size}×{size}: used as is"
    elif (nw, nh) == (size, size):
        step = f"{w}×{h} → resized {size}×{size}"
    elif (nw, nh) == (w, h):
        step = f"{w}×{h} → centre crop {size}×{size}"
    else:
        step = f"{w}×{h} → resized {nw}×{nh} → centre crop {size}×{size}"
    if short < size:
        step += " (upscaled: the image is smaller than the tile)"
    return tile, step


def read_image(source: bytes | str | os.PathLike | BinaryIO, name: str = "", *,
               max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read one untrusted image file and reduce it to a 32×32 RGB tile.

    `source`: the file's bytes, a path or an open binary file. Raises ImageReadError (message names
    the file) for anything that is not a usable image: empty, too large, not an image, a format not
    in ALLOWED_FORMATS, more than `max_pixels` pixels, truncated or corrupt data.
    """
    name = _name_of(source, name)
    data = _read_bytes(source, name, max_bytes)
    if not data:
        raise ImageReadError(f"{name}: the file is empty")
    formats = _allowed_formats()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return _decode(data, name, formats, max_pixels, caught)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(f"{name}: refused: the image declares too many pixels (over "
                             f"{max_pixels / 1e6:g} MP, a possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image this app can read, or too damaged to recognise "
                             f"(accepted formats: "
                             f"{', '.join(formats)})") from None
    except MemoryError:
        raise ImageReadError(f"{name}: not enough memory to decode this image") from None
    except Exception as exc:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        detail = str(exc) or type(exc).__name__
        raise ImageReadError(f"{name}: the image data is truncated or corrupt ({detail})") from None


def _decode(data: bytes, name: str, formats: list[str], max_pixels: int, caught: list) -> LoadedImage:
    img = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
    width, height = img.size
    mode, fmt = img.mode, img.format or "image"
    steps = [f"{fmt} {width}×{height}, mode {mode}"]
    if width < 1 or height < 1:
        raise ImageReadError(f"{name}: the image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name}: {width}×{height} = {width * height / 1e6:.1f} MP is more than the "
            f"{max_pixels / 1e6:g} MP this app accepts (protection against decompression bombs); "
            "resize the image first")
    _check_bomb_warning(caught, name, max_pixels)
    frames = getattr(img, "n_frames", 1) or 1
    if frames > 1:
        img.seek(0)
        kind = "animated" if fmt in ("GIF", "PNG", "WEBP", "AVIF") else "multi-frame"
        steps.append(f"{kind}: first of {frames} frames")
    if fmt in ("JPEG", "MPO") and min(width, height) > 2 * DISPLAY_MAX_SIDE:
        # decode at 1/2, 1/4 or 1/8 scale in the JPEG decoder, still >= DISPLAY_MAX_SIDE a side
        img.draft(img.mode, (DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
        if img.size != (width, height):
            steps.append(f"JPEG decoded at reduced scale {img.size[0]}×{img.size[1]} (draft mode)")
    img.load()  # force the full decode here: truncated / corrupt data fails now
    _check_bomb_warning(caught, name, max_pixels)
    orientation = 1
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # unreadable EXIF block: show the image as stored
        steps.append("EXIF data unreadable: orientation not applied")
    if orientation in _ORIENTATION:
        img = ImageOps.exif_transpose(img)
        steps.append(f"EXIF orientation {orientation} applied: {_ORIENTATION[orientation]}")
    rgb = _to_rgb(img, steps)
    tile, step = _tile_and_step(rgb)
    steps.append(step)
    original = rgb
    if max(rgb.size) > DISPLAY_MAX_SIDE:
        original = rgb.copy()
        original.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    return LoadedImage(name=name, original=original, tile=tile, steps=steps,
                       original_size=(width, height), original_mode=mode)


def _check_bomb_warning(caught: list, name: str, max_pixels: int) -> None:
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            raise ImageReadError(f"{name}: refused: {w.message} (this app's limit is "
                                 f"{max_pixels / 1e6:g} MP)")


# ----------------------------------------------------------------------------------------------
# Small display helpers (no Streamlit): enlarge a tile, encode PNG
# ----------------------------------------------------------------------------------------------

def enlarge(tile: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (H, W, C) -> (H*scale, W*scale, C), nearest neighbour: every pixel stays a crisp square."""
    if scale <= 1:
        return tile
    h, w = tile.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(tile))
    return np.asarray(img.resize((w * scale, h * scale), Image.Resampling.NEAREST))


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG-encode a uint8 (H, W, 3) or (H, W) array (fast compression: these images are small)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()
