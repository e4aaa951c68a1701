"""The augmentation previewer in a real headless Chromium (Debian's package) driven by Playwright:
moving a parameter slider changes the grid, and an uploaded photo appears with its own grid.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.streamlit_server import Server, chromium_page, free_port, require_chromium

require_chromium()

TILES = ".pv-grid-a img[alt^='variant']"


@pytest.fixture
def app(tmp_path, cifar_npz):
    env = {**os.environ, "CIFAR_LAB_RUNS": str(tmp_path / "runs"), "CIFAR10_NPZ": str(cifar_npz),
           "PYTHONUNBUFFERED": "1"}
    server = Server(env, free_port())
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def photo(path: Path) -> Path:
    """A photo-like JPEG (smooth colour gradients and a dark disc), 400×300."""
    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx * 255 // 400, yy * 255 // 300, 255 - xx * 255 // 400], -1).astype(np.uint8)
    rgb[(xx - 200) ** 2 + (yy - 150) ** 2 < 80 ** 2] = (20, 20, 20)
    Image.fromarray(rgb).save(path, "JPEG", quality=90)
    return path


def tile_sources(page) -> list[str]:
    return page.locator(TILES).evaluate_all("els => els.map(e => e.getAttribute('src'))")


def wait_for_change(page, before: list[str], timeout: float = 60) -> list[str]:
    end = time.time() + timeout
    while time.time() < end:
        now = tile_sources(page)
        if now and now != before:
            return now
        page.wait_for_timeout(300)
    return tile_sources(page)


def test_slider_changes_the_grid_and_an_upload_appears(app, tmp_path):
    with chromium_page(1500, 1100) as page:
        # 1. the default chain (random_crop padding 4 + hflip) on a sample image: an 8×8 grid
        page.goto(f"{app}/Preview")
        page.locator(TILES).nth(63).wait_for()
        before = tile_sources(page)
        assert len(before) == 64 and len(set(before)) > 8  # different variants
        assert page.locator(TILES).first.get_attribute("title").startswith("variant 1\nrandom_crop dy=")

        # 2. move the padding slider one step with the keyboard: the grid is redrawn differently
        slider = page.locator("[data-testid='stSlider']", has_text="padding").locator("input[type='range']")
        assert slider.input_value() == "4"
        slider.focus()
        slider.press("ArrowRight")
        after = wait_for_change(page, before)
        assert slider.input_value() == "5"
        assert len(after) == 64 and after != before, "the grid did not change after moving the slider"
        page.screenshot(path=str(tmp_path / "preview_slider.png"))

        # 3. upload a photo: it appears with how it was reduced, and gets its own grid
        page.get_by_text("Your images (upload)").click()
        page.get_by_text("Upload one or more images").wait_for()
        jpeg = photo(tmp_path / "holiday.jpg")
        page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(jpeg))
        page.get_by_role("heading", name="holiday.jpg (your image)").wait_for()
        page.get_by_text("400×300 → resized 42×32 → centre crop 32×32").wait_for()
        page.get_by_text("holiday.jpg: 400×300, mode RGB").wait_for()
        page.locator(TILES).nth(63).wait_for()
        uploaded = tile_sources(page)
        assert len(uploaded) == 64 and not set(uploaded) & set(after)
        page.screenshot(path=str(tmp_path / "preview_upload.png"))
