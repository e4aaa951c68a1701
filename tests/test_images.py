"""cifar_core.images.read_image over a set of odd and bad files generated here with Pillow.

Every file is either read correctly (orientation, colours, scaling checked on the 32×32 tile) or
refused with ImageReadError and a message naming the file; never another exception type.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cifar_core.images import (MAX_PIXELS, MAX_UPLOAD_BYTES, PREPROCESS_DESCRIPTION, ImageReadError,
                               LoadedImage, enlarge, png_bytes, read_image, to_tile)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def halves(left, right, size=(60, 40)) -> Image.Image:
    """Left half one colour, right half another (to check orientation)."""
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def mean_rgb(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, 3).mean(0)


def close(a, b, tol=12) -> bool:
    return bool(np.all(np.abs(np.asarray(a, float) - np.asarray(b, float)) <= tol))


def refused(data, name="bad.bin", **kw) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(data, name, **kw)
    message = str(info.value)
    assert name in message, message
    return message


# ---------------------------------------------------------------------------------------------
# files read correctly
# ---------------------------------------------------------------------------------------------

def test_plain_rgb_png():
    out = read_image(encode(halves(RED, BLUE), "PNG"), "photo.png")
    assert isinstance(out, LoadedImage)
    assert out.name == "photo.png"
    assert out.tile.dtype == np.uint8 and out.tile.shape == (32, 32, 3)
    assert out.original.mode == "RGB" and out.original.size == (60, 40)
    assert out.original_size == (60, 40) and out.original_mode == "RGB"
    assert close(out.tile[:, :8].reshape(-1, 3).mean(0), RED) and close(out.tile[:, -8:].reshape(-1, 3).mean(0), BLUE)
    assert out.steps[-1] == "60×40 → resized 48×32 → centre crop 32×32"


def test_tile_matches_torchvision_resize_and_center_crop():
    from torchvision import transforms
    rng = np.random.default_rng(0)
    for size in [(200, 90), (90, 200), (33, 32), (31, 50), (1000, 1), (32, 32)]:
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ref = transforms.Compose([transforms.Resize(32, transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(32)])(img)
        np.testing.assert_array_equal(to_tile(img), np.asarray(ref), err_msg=str(size))


def test_exif_rotated_jpeg_is_upright():
    img = halves(RED, BLUE, (60, 40))  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": left edge ends up on top
    out = read_image(encode(img, "JPEG", exif=exif, quality=95), "phone.jpg")
    assert out.original.size == (40, 60)  # shown portrait
    assert out.original_size == (60, 40)  # as stored in the file
    top, bottom = mean_rgb(out.tile[:10]), mean_rgb(out.tile[-10:])
    assert close(top, RED, 40) and close(bottom, BLUE, 40), (top, bottom)
    assert any("EXIF orientation 6" in s and "90° clockwise" in s for s in out.steps), out.steps


def test_sixteen_bit_gradient_is_scaled_not_saturated():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))  # 256 wide, 64 high
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        out = read_image(encode(img, fmt), f"ramp16.{fmt.lower()}")
        assert out.original_mode.startswith("I;16")
        row = out.tile[16, :, 0].astype(int)
        # the 32-px crop of a 128-px-wide resize spans a quarter of the ramp around the middle
        assert 90 < row.mean() < 165, row
        assert row.max() < 250 and row.min() > 5, row  # not clipped to 255
        assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 10
        assert (out.tile[..., 0] == out.tile[..., 2]).all()  # grey stays grey
        assert any("16-bit" in s for s in out.steps), out.steps


def test_32bit_int_and_float_images_are_scaled():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    out = read_image(encode(Image.fromarray(ramp, "F"), "TIFF"), "float.tif")
    assert out.original_mode == "F" and 100 < out.tile.mean() < 155
    big = np.tile(np.linspace(-1000, 100000, 64).astype(np.int32), (64, 1))
    out = read_image(encode(Image.fromarray(big, "I"), "TIFF"), "int32.tif")
    assert out.original_mode.startswith("I") and 60 < out.tile.mean() < 200
    assert any("stretched" in s for s in out.steps), out.steps


def test_cmyk_jpeg_becomes_rgb():
    out = read_image(encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=95), "print.jpg")
    assert out.original_mode == "CMYK"
    assert close(mean_rgb(out.tile), RED, 20), mean_rgb(out.tile)
    assert "CMYK → RGB" in out.steps


def test_colour_profiles_and_lab():
    from PIL import ImageCms
    lab = Image.new("LAB", (40, 40), (136, 208, 195))  # a saturated red in CIELAB (a, b offset by 128)
    out = read_image(encode(lab, "TIFF"), "lab.tif")
    r, g, b = mean_rgb(out.tile)
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    assert "LAB → sRGB" in out.steps
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = read_image(encode(solid(RED), "JPEG", quality=95, icc_profile=srgb), "srgb.jpg")
    assert close(mean_rgb(out.tile), RED, 10) and not any("profile" in s for s in out.steps)
    out = read_image(encode(solid(RED), "PNG", icc_profile=b"not a profile" * 20), "junk-profile.png")
    assert close(mean_rgb(out.tile), RED, 1)
    assert "embedded colour profile unusable: values taken as sRGB" in out.steps
    # a profile not named sRGB goes through the colour transform (here sRGB renamed: same colours)
    renamed = srgb.replace("sRGB".encode("utf-16-be"), "wRGB".encode("utf-16-be"))
    out = read_image(encode(solid((200, 120, 40)), "PNG", icc_profile=renamed), "wide.png")
    assert "RGB colour profile 'wRGB built-in' → sRGB" in out.steps, out.steps
    assert close(mean_rgb(out.tile), (200, 120, 40), 2)


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))  # right half: index 1 (blue) ...
    for fmt in ("PNG", "GIF"):
        out = read_image(encode(img, fmt, transparency=1), f"palette.{fmt.lower()}")  # ... transparent
        assert out.original_mode == "P"
        assert close(mean_rgb(out.tile[:, :16]), RED, 2) and close(mean_rgb(out.tile[:, 16:]), WHITE, 2)
        assert any("composited over white" in s for s in out.steps), out.steps


def test_rgba_and_la_transparency_over_white():
    img = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    img.paste((0, 0, 255, 0), (0, 0, 32, 16))  # top half fully transparent
    out = read_image(encode(img, "PNG"), "alpha.png")
    assert close(mean_rgb(out.tile[:16]), WHITE, 1) and close(mean_rgb(out.tile[16:]), BLUE, 1)
    half = Image.new("LA", (32, 32), (0, 128))  # black at half opacity over white: mid grey
    out = read_image(encode(half, "PNG"), "la.png")
    assert out.original_mode == "LA" and close(mean_rgb(out.tile), (127, 127, 127), 3)
    opaque = read_image(encode(Image.new("RGBA", (32, 32), (0, 255, 0, 255)), "PNG"), "opaque.png")
    assert close(mean_rgb(opaque.tile), GREEN, 1)
    assert not any("transparency" in s for s in opaque.steps)


def test_grayscale_and_bilevel():
    out = read_image(encode(Image.new("L", (50, 50), 77), "PNG"), "grey.png")
    assert out.original.mode == "RGB" and close(mean_rgb(out.tile), (77, 77, 77), 1)
    assert "L → RGB" in out.steps
    out = read_image(encode(Image.new("1", (40, 40), 1), "BMP"), "bits.bmp")
    assert close(mean_rgb(out.tile), WHITE, 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_the_first_frame(fmt):
    frames = [solid(c, (32, 32)) for c in (RED, GREEN, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    out = read_image(data, f"anim.{fmt.lower()}")
    assert close(mean_rgb(out.tile), RED, 6), mean_rgb(out.tile)
    assert "animated: first of 3 frames" in out.steps, out.steps


def test_large_image_is_thumbnailed_for_display_and_jpeg_drafted():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2400, 3000, 3), dtype=np.uint8))
    out = read_image(encode(img, "JPEG", quality=80), "big.jpg")
    assert max(out.original.size) <= 1024 and out.original_size == (3000, 2400)
    assert any("draft" in s for s in out.steps) and out.tile.shape == (32, 32, 3)


def test_sources_path_filelike_and_name():
    data = encode(solid(GREEN), "PNG")
    assert read_image(io.BytesIO(data), "up.png").name == "up.png"
    buf = io.BytesIO(data)
    buf.name = "/some/dir/named.png"
    assert read_image(buf).name == "named.png"


def test_path_source(tmp_path):
    path = tmp_path / "disk.png"
    path.write_bytes(encode(solid(GREEN), "PNG"))
    out = read_image(path)
    assert out.name == "disk.png" and close(mean_rgb(out.tile), GREEN, 1)
    assert "missing.png: cannot read" in refused_path(tmp_path / "missing.png")


def refused_path(path) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    return str(info.value)


def test_tiny_and_extreme_aspect_images():
    out = read_image(encode(solid(RED, (1, 1)), "PNG"), "dot.png")
    assert close(mean_rgb(out.tile), RED, 1) and "upscaled" in out.steps[-1]
    out = read_image(encode(solid(BLUE, (3000, 2)), "PNG"), "line.png")
    assert out.tile.shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------------
# files refused with a clear message
# ---------------------------------------------------------------------------------------------

def test_empty_and_non_image_files():
    assert "empty" in refused(b"", "empty.png")
    assert "not an image" in refused(b"hello, this is text\n" * 20, "notes.txt")
    assert "not an image" in refused(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "doc.pdf")


def test_formats_outside_the_allow_list_are_refused():
    # EPS would make Pillow run Ghostscript; PSD is not needed: both are refused unread
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert "not an image" in refused(eps, "drawing.eps")
    assert "not an image" in refused(encode(solid(RED), "PCX"), "old.pcx")


def _truncated_cases():
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        data = encode(photo.convert("P") if fmt == "GIF" else photo, fmt)
        yield f"{fmt}-half", data[: len(data) // 2]
        yield f"{fmt}-header-only", data[:40]


@pytest.mark.parametrize("label,data", list(_truncated_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_truncated_images_are_refused(label, data):
    message = refused(data, f"{label}.img")
    assert "truncated or corrupt" in message or "not an image" in message, message


def _png_with_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR declares width×height (CRC fixed): a decompression bomb header."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) data(13) crc(4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bombs_are_refused_before_decoding():
    message = refused(_png_with_size(8000, 8000), "bomb.png")  # 64 MP > 40 MP
    assert "8000×8000" in message and "40 MP" in message
    message = refused(_png_with_size(30000, 30000), "megabomb.png")  # beyond Pillow's own limit too
    assert "MP" in message
    assert "MP" in refused(encode(solid(RED, (64, 48)), "PNG"), "small.png", max_pixels=1000)
    assert MAX_PIXELS == 40_000_000


def test_files_over_the_byte_limit_are_refused(tmp_path):
    data = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    assert "limit is" in refused(data, "big.png", max_bytes=1000)
    assert "limit is" in refused(io.BytesIO(data), "big.png", max_bytes=1000)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match="big.png"):
        read_image(path, max_bytes=1000)
    assert MAX_UPLOAD_BYTES == 10 * 1024 * 1024


def test_wrong_source_type_is_refused():
    assert "expected file bytes" in refused(12345, "number")


def test_random_corruption_never_raises_anything_else():
    """Flip bytes all over valid files: each read either succeeds or raises ImageReadError."""
    rng = np.random.default_rng(4)
    photo = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    sources = [encode(photo, f) for f in ("PNG", "JPEG", "BMP", "TIFF", "WEBP")]
    sources.append(encode(photo.convert("P"), "GIF", save_all=True, append_images=[photo.convert("P")]))
    outcomes = {"ok": 0, "refused": 0}
    for data in sources:
        for _ in range(40):
            mutated = bytearray(data)
            for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 8))):
                mutated[pos] = int(rng.integers(0, 256))
            try:
                out = read_image(bytes(mutated), "fuzz.img")
                assert out.tile.shape == (32, 32, 3) and out.tile.dtype == np.uint8
                outcomes["ok"] += 1
            except ImageReadError as exc:
                assert "fuzz.img" in str(exc)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 240


def test_description_and_helpers():
    assert "EXIF" in PREPROCESS_DESCRIPTION and "32×32" in PREPROCESS_DESCRIPTION
    tile = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarge(tile, 4)
    assert big.shape == (8, 12, 3) and (big[::4, ::4] == tile).all() and (big[3, 11] == tile[0, 2]).all()
    assert Image.open(io.BytesIO(png_bytes(big))).size == (12, 8)
