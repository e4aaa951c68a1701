"""AppTest for the home page (app.py)."""
import pytest

from cifar_core import jobs
from pathlib import Path

from streamlit.testing.v1 import AppTest

from cifar_core.config import RunConfig
from cifar_core.runs import RunStore


APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)  # hand-made records: train none
    return RunStore(tmp_path / "runs")


def texts(at) -> str:
    parts = [e.value for e in at.success] + [e.value for e in at.warning] + [e.value for e in at.info]
    return "\n".join(str(p) for p in parts + [c.value for c in at.caption])


def test_home_with_data_counts_runs(runs, cifar_npz, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    cfg = RunConfig(epochs=1).validated()
    runs.create(cfg, state="queued")
    runs.create(cfg, state="completed")
    runs.create(cfg, state="failed")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "50,000 training and 10,000 test images" in texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["queued"] == "1" and metrics["finished"] == "2" and metrics["running"] == "0"


def test_home_without_data_offers_download_and_offline_instruction(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    warning = "\n".join(w.value for w in at.warning)
    assert "CIFAR10_NPZ" in warning and "download" in warning
    assert any("Download CIFAR-10" in b.label for b in at.button)


def test_navigation_keeps_the_page_urls_and_opens_the_pages(runs):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["CIFAR-10 Lab"]  # Home is the default page
    links = [el.proto.page for el in at.get("page_link")]
    assert links == ["Train", "Runs", "Compare", "Studies", "Search", "Active_learning", "Imbalance", "Preview",
                     "Classify"]  # the browser's URLs
    at.switch_page("app_pages/3_Compare.py").run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Compare runs"]
    at.switch_page("app_pages/7_Imbalance.py").run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Imbalance"]
    at.switch_page("app_pages/8_Search.py").run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Search"]
