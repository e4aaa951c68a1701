"""The Classify page in a real headless Chromium (Debian's package) driven by Playwright, with the
shipped checkpoints: the most accurate one is preselected, the ten bundled samples are classified
with readable top-k bar charts, and an uploaded photo plus a corrupt file give a result and a
message, never a traceback.
"""
from __future__ import annotations

import os

import pytest

from cifar_core.serve.inference import CHECKPOINTS_DIR, discover_models
from tests.streamlit_server import Server, chromium_page, free_port, require_chromium
from tests.test_e2e_preview import photo

require_chromium()

CHART = "[data-testid='stVegaLiteChart']"


def most_accurate_shipped() -> str:
    shipped = [entry for entry in discover_models(CHECKPOINTS_DIR) if entry.usable and entry.accuracy is not None]
    return max(shipped, key=lambda entry: entry.accuracy).path.name


@pytest.fixture
def app(tmp_path):
    env = {**os.environ, "CIFAR_LAB_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("CIFAR_LAB_CHECKPOINTS", None)  # the real shipped models
    server = Server(env, free_port())
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_shipped_model_classifies_samples_and_uploads(app, tmp_path):
    with chromium_page(1400, 1200) as page:
        # 1. first visit: the most accurate shipped model, the ten samples, a table and charts
        page.goto(f"{app}/Classify")
        page.get_by_text("onnxruntime · ").first.wait_for()
        caption = page.get_by_text("onnxruntime · ").first.inner_text()
        assert f"model {most_accurate_shipped()}" in caption and "for 10 images" in caption
        page.locator(CHART).first.wait_for()
        page.locator(f"{CHART} svg .role-frame path.background").first.wait_for()
        # the plot area itself (not the whole chart with its axis): 3 bars need room
        plot_height = page.locator(CHART).first.evaluate(
            "e => e.querySelector('svg .role-frame path.background').getBoundingClientRect().height")
        assert plot_height >= 3 * 20, f"the top-3 bars are squeezed into {plot_height} px"
        assert "Traceback" not in page.inner_text("body")

        # 2. a photo and a corrupt file: the photo is classified, the corrupt one gets a message
        jpeg = photo(tmp_path / "holiday.jpg")
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        page.locator("[data-testid='stFileUploader'] input[type='file'][multiple]").set_input_files([str(jpeg), str(broken)])
        page.get_by_text("holiday.jpg (400×300, RGB)").wait_for()
        page.get_by_text("broken.png").first.wait_for()
        body = page.inner_text("body")
        assert "for 1 image " in body and "Traceback" not in body
        page.screenshot(path=str(tmp_path / "classify_upload.png"))
