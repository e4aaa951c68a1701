"""The Classify page in a real headless Chromium (Debian's package) driven by Playwright, with the
shipped checkpoints: the most accurate one is preselected, the ten bundled samples are classified
with readable top-k bar charts, and an uploaded photo plus a corrupt file give a result and a
message, never a traceback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cifar_core.inference import CHECKPOINTS_DIR
from tests.streamlit_server import CHROMIUM, CHROMIUM_ARGS, Server, free_port
from tests.test_e2e_preview import photo

if not Path(CHROMIUM).exists():  # .ci/run installs it (make browser); say so plainly if it did not
    pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser` (Debian packages chromium, "
                "chromium-driver)", pytrace=False)

CHART = "[data-testid='stVegaLiteChart']"


def most_accurate_shipped() -> str:
    accuracies = {}
    for card_path in CHECKPOINTS_DIR.glob("*.card.json"):
        evaluation = json.loads(card_path.read_text())["evaluation"]
        accuracies[card_path.name.replace(".card.json", ".onnx")] = evaluation.get(
            "onnxruntime_test_acc", evaluation.get("test_acc"))
    return max(accuracies, key=accuracies.get)


@pytest.fixture
def app(tmp_path):
    env = {**os.environ, "CIFAR_LAB_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("CIFAR_LAB_CHECKPOINTS", None)  # the real shipped models
    server = Server(env, free_port())
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_shipped_model_classifies_samples_and_uploads(app, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)

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
        browser.close()
