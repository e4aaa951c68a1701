"""The Classify page and the Runs page's Export button, rendered with Streamlit's AppTest.

Models are real ONNX files exported from small randomly initialised networks (accuracy is not the
point here; the shipped checkpoints have their own test)."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from cifar_core.config import RunConfig
from cifar_core.serve.export import InferenceGraph, export_module
from cifar_core.models import create_model
from cifar_core.runs import RunStore, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = str(REPO / "app_pages" / "6_Classify.py")
RUNS = str(REPO / "app_pages" / "2_Runs.py")


def _export_random(path: Path, card: dict | None = None) -> Path:
    torch.manual_seed(0)
    export_module(InferenceGraph(create_model("lenet"), [], False, False), path)
    if card is not None:
        path.with_suffix(".card.json").write_text(json.dumps(card))
    return path


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    shipped, runs = tmp_path / "checkpoints", tmp_path / "runs"
    shipped.mkdir()
    runs.mkdir()
    monkeypatch.setenv("CIFAR_LAB_CHECKPOINTS", str(shipped))
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(runs))
    return shipped, RunStore(runs)


def _png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [w.value for w in at.warning]
    parts += [e.value for e in at.error] + [i.value for i in at.info]
    return "\n".join(map(str, parts))


def test_no_model_explains_how_to_get_one(dirs):
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    assert not at.exception
    assert "No usable model yet" in _texts(at) and "python -m cifar_core export" in _texts(at)


def test_samples_by_default_and_unusable_files_listed(dirs):
    shipped, _ = dirs
    _export_random(shipped / "tiny.onnx", {"name": "tiny lenet", "architecture": {"model": "lenet",
                                                                                   "parameters": 62006},
                                           "evaluation": {"test_acc": 0.1}})
    (shipped / "broken.onnx").write_bytes(b"\x00garbage")
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    assert not at.exception
    assert at.selectbox[0].value == "shipped/tiny.onnx"
    assert "tiny lenet" in at.selectbox[0].format_func("shipped/tiny.onnx")
    text = _texts(at)
    assert "broken.onnx" in text and "not a valid ONNX model" in text
    assert "CPUExecutionProvider" in text
    table = at.dataframe[-1].value
    assert len(table) == 10 and list(table.columns[:3]) == ["file", "top1", "p1"]
    assert np.allclose(table["p1"] >= table["p2"], True)


def test_most_accurate_shipped_model_is_the_default(dirs):
    shipped, _ = dirs
    for name, acc in (("a-weak.onnx", 0.4), ("b-best.onnx", 0.9), ("c-mid.onnx", 0.6)):
        _export_random(shipped / name, {"name": name, "evaluation": {"onnxruntime_test_acc": acc, "test_acc": 0.1}})
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    assert not at.exception
    assert at.selectbox[0].value == "shipped/b-best.onnx"
    assert at.query_params["model"] == "shipped/b-best.onnx"


def test_uploads_good_and_bad_files(dirs):
    shipped, _ = dirs
    _export_random(shipped / "tiny.onnx")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    at.file_uploader(key="classify_images").set_value([("wide.jpg", _png(photo, fmt="JPEG"), "image/jpeg"),
                                   ("alpha.png", _png(photo, "RGBA"), "image/png"),
                                   ("notes.png", b"this is not an image", "image/png")])
    at.slider[0].set_value(5)
    at.run()
    assert not at.exception
    assert any("notes.png" in w.value for w in at.warning)
    table = at.dataframe[-1].value
    assert list(table["file"]) == ["wide.jpg", "alpha.png"] and "p5" in table.columns
    assert "2 images" in _texts(at)


def test_a_file_added_twice_is_listed_once(dirs):
    """Adding the same photo again (or removing and re-adding it) gives the uploader two entries
    with the same bytes: it is classified and listed once."""
    shipped, _ = dirs
    _export_random(shipped / "tiny.onnx")
    rng = np.random.default_rng(1)
    photo, other = (_png(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2))
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    at.file_uploader(key="classify_images").set_value([("cat.png", photo, "image/png"),
                                                      ("dog.png", other, "image/png"),
                                                      ("cat.png", photo, "image/png"),
                                                      ("copy.png", photo, "image/png")])
    at.run()
    assert not at.exception
    table = at.dataframe[-1].value
    assert list(table["file"]) == ["cat.png", "dog.png"]
    assert "2 images" in _texts(at)
    text = _texts(at)
    assert "cat.png was uploaded twice: listed once." in text
    assert "copy.png has the same content as cat.png" in text


def test_single_upload_shows_detail_without_table(dirs):
    shipped, _ = dirs
    _export_random(shipped / "tiny.onnx")
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    at.file_uploader(key="classify_images").set_value(("one.png", _png(np.zeros((40, 40, 3), np.uint8)), "image/png"))
    at.run()
    assert not at.exception
    assert len(at.dataframe) == 0
    text = _texts(at)
    assert "Reduced by: PNG 40×40" in text and "1 image (" in text
    assert any(m.value.startswith("**") and "%" in m.value for m in at.markdown)  # the top-1 line


def _completed_lenet_run(store: RunStore, run_id: str):
    record = store.create(RunConfig(model="lenet", name="lenet run").validated(), run_id=run_id,
                          state="queued")
    torch.manual_seed(0)
    model = create_model("lenet")
    torch.save({"model": model.state_dict(), "model_name": "lenet", "model_params": {}, "ema": None},
               record.checkpoint_path("last"))
    atomic_write_json(record.results_path, {"test_acc": 0.1, "per_class_acc": {}, "classes": [],
                                            "confusion_matrix": [], "train_seconds": 1.0})
    now = time.time()
    record.update_status(state="completed", created=now - 10, started=now - 9, finished=now,
                         total_steps=1, step=1, steps_per_epoch=1, test_acc=0.1)
    return record


def test_runs_page_exports_and_classify_picks_it(dirs):
    _, store = dirs
    record = _completed_lenet_run(store, "lenet-run")
    at = AppTest.from_file(RUNS, default_timeout=120)
    at.query_params["run"] = "lenet-run"
    at.run()
    assert not at.exception
    at.button(key="runs_export").click().run()
    assert not at.exception, at.exception
    onnx_path = record.path / "export" / "lenet-run.onnx"
    assert onnx_path.is_file() and onnx_path.with_suffix(".card.json").is_file()
    assert any("parity" in s.value for s in at.success) or "parity" in _texts(at)
    at.button(key="runs_to_classify")  # the hand-over button exists once exported

    at = AppTest.from_file(CLASSIFY, default_timeout=60)
    at.query_params["model"] = "run/lenet-run/lenet-run.onnx"
    at.run()
    assert not at.exception
    assert at.selectbox[0].value == "run/lenet-run/lenet-run.onnx"


@pytest.mark.parametrize("choice, suffix, tta", [
    ("int8, one view (fastest; a little less accurate)", "-int8-1view", "none"),
    ("int8, flip views only (2 views: the shipped fast model's choice, near full accuracy)", "-int8-flip", "flip"),
])
def test_runs_page_int8_export_writes_its_own_file(dirs, cifar_npz, monkeypatch, choice, suffix, tta):
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))  # int8 calibration reads training images
    _, store = dirs
    record = _completed_lenet_run(store, "lenet-q")
    at = AppTest.from_file(RUNS, default_timeout=120)
    at.query_params["run"] = "lenet-q"
    at.run()
    at.selectbox(key="runs_export_kind").set_value(choice).run()
    at.button(key="runs_export").click().run()
    assert not at.exception, at.exception
    path = record.path / "export" / f"lenet-q{suffix}.onnx"
    assert not (record.path / "export" / "lenet-q.onnx").exists()  # the fp32 file is a separate choice
    assert path.is_file(), [e.value for e in at.error]
    card = json.loads(path.with_suffix(".card.json").read_text())
    assert card["weights_storage"].startswith("int8") and card["test_time_augmentation"]["chosen_at_export"] == tta
    assert card["test_time_augmentation"]["flip"] is (tta == "flip")
    assert f"--int8 --tta {tta}" in card["export_command"]
    assert "int8: top-1 agreement" in _texts(at) + " ".join(s.value for s in at.success)


def test_runs_page_export_failure_is_a_message(dirs):
    _, store = dirs
    record = _completed_lenet_run(store, "broken-ckpt")
    record.checkpoint_path("last").write_bytes(b"not a checkpoint")
    at = AppTest.from_file(RUNS, default_timeout=60)
    at.query_params["run"] = "broken-ckpt"
    at.run()
    at.button(key="runs_export").click().run()
    assert not at.exception
    assert any("unreadable" in e.value for e in at.error)


def test_uploaded_models_good_and_bad(dirs, tmp_path):
    good = _export_random(tmp_path / "mine.onnx").read_bytes()
    at = AppTest.from_file(CLASSIFY, default_timeout=60).run()
    assert "No usable model yet" in _texts(at)
    at.file_uploader(key="classify_model_upload").set_value(("../../etc/evil.onnx", b"\x08\x01junk", "x"))
    at.run()
    assert not at.exception
    assert "evil.onnx" in _texts(at) and "not a valid ONNX model" in _texts(at)
    at.file_uploader(key="classify_model_upload").set_value(("mine.onnx", good, "application/octet-stream"))
    at.run()
    assert not at.exception
    key = at.selectbox[0].value
    assert key.startswith("upload/") and ".." not in key and "upload mine.onnx" in at.selectbox[0].format_func(key)
    assert len(at.dataframe[-1].value) == 10  # the bundled samples, classified by the uploaded model
