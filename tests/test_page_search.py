"""The Search page (app_pages/8_Search.py) through AppTest: the new-search form (its empty state, the space's
errors shown before anything is created, a valid search started with the worker's launch stubbed),
damaged storage, and the live view of a real finished study (made once by the CLI on the tiny preset):
its trials table, states, best value, CSV, charts, and the best config queued for full training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.experiments import search
from cifar_core.runs import RunStore, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
PAGE = str(REPO / "app_pages" / "8_Search.py")
STUDY = "pagetest"
SPACE = {"lr": {"low": 0.01, "high": 1.0, "log": True}, "label_smoothing": {}, "model_params.dropout": {"high": 0.3}}


def _app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120)


def _texts(at: AppTest, *kinds: str) -> str:
    kinds = kinds or ("markdown", "caption", "info", "success", "warning", "error")
    return "\n".join(str(e.value) for kind in kinds for e in getattr(at, kind))


def _supervisor_pids(root: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"--runs-root {root} worker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _stop_supervisor(store: RunStore, timeout: float = 30) -> None:
    """Wait for this runs folder's supervisor to exit (it idles out in 2 s here); kill it if it lingers."""
    end = time.time() + timeout
    while jobs.worker_alive(store) and time.time() < end:
        time.sleep(0.3)
    for pid in _supervisor_pids(store.root):
        os.kill(pid, signal.SIGTERM)
    end = time.time() + 15
    while _supervisor_pids(store.root) and time.time() < end:
        time.sleep(0.3)


@pytest.fixture
def env(tmp_path, monkeypatch, cifar_npz):
    """An empty runs folder; runs are queued, never trained; a started search's worker is not launched
    (the launches are recorded)."""
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    launched: list[str] = []
    monkeypatch.setattr(search, "launch_worker", lambda store, study: launched.append(study) or 0)
    return RunStore(tmp_path / "runs"), launched


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, cifar_npz):
    """A real search of 3 trials on the tiny preset (3 epochs each, median pruner), run to its end by the
    CLI's foreground worker (about a minute); no process of it is left when the tests start or end."""
    root = tmp_path_factory.mktemp("search_page") / "runs"
    space = root.parent / "space.json"
    space.write_text(json.dumps(SPACE))
    env = {**os.environ, "CIFAR10_NPZ": str(cifar_npz), "CIFAR_LAB_WORKER_IDLE": "2", "CIFAR_LAB_SLOTS_CPU": "1"}
    store = RunStore(root)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cifar_core", "--runs-root", str(root), "search", "--space", str(space),
             "--trials", "3", "--preset", "tiny (smoke test)", "--epochs", "3", "--study", STUDY,
             "--pruner", "median", "--pruner-params", "n_startup_trials=1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _stop_supervisor(store)  # nothing may train the runs the tests queue
        yield store
    finally:
        _stop_supervisor(store)


@pytest.fixture
def study_env(finished_study, monkeypatch, cifar_npz):
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(finished_study.root))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)  # queue, never train
    monkeypatch.setattr(search, "launch_worker", lambda store, study: pytest.fail("no worker may start here"))
    return finished_study


# ---- the form ----------------------------------------------------------------------------------------

def test_empty_runs_folder_shows_the_form_and_the_empty_state(env):
    store, launched = env
    at = _app().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Search"]
    assert "No searches yet" in _texts(at, "info")
    assert not at.error, [e.value for e in at.error]
    fields = at.multiselect(key="search.new.fields")
    assert fields.value == ["lr", "label_smoothing"]
    assert any("model_params.dropout" in option for option in fields.options)  # the fixed model's options too
    # each picked field starts from its declared range, with widgets of its kind
    declared = RunConfig.scalar_params()["lr"]
    assert at.number_input(key="search.new.space.lr.low").value == pytest.approx(declared.low)
    assert at.number_input(key="search.new.space.lr.high").value == pytest.approx(declared.high)
    assert at.checkbox(key="search.new.space.lr.log").value is True
    # the fixed config: the quick preset on the report's 10,000-image random subset with 1,000 validation images
    fixed = json.loads(at.text_area(key="search.new.json").value)
    assert (fixed["model"], fixed["subset"], fixed["subset_size"], fixed["val_size"]) == ("fastnet", "random", 10000, 1000)
    assert not at.button(key="search.new.start").disabled
    assert [s.value for s in at.selectbox if s.key == "search.new.sampler"] == ["tpe"]
    assert [s.value for s in at.selectbox if s.key == "search.new.pruner"] == ["median"]
    assert launched == [] and not (store.root / search.SEARCH_DIR).exists()


def test_invalid_space_shows_the_errors_and_creates_nothing(env):
    store, launched = env
    at = _app().run()
    at.multiselect(key="search.new.fields").set_value(["label_smoothing", "augment.hflip"]).run()
    at.checkbox(key="search.new.space.label_smoothing.log").check().run()  # a log range from 0
    at.multiselect(key="search.new.space.augment.hflip.choices").set_value([True]).run()  # one choice
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any("label_smoothing: a log range needs low > 0" in e for e in errors), errors
    assert any("augment.hflip: one choice" in e for e in errors), errors
    at.button(key="search.new.start").click().run()
    assert not at.exception, at.exception
    assert "Nothing was started: fix the errors above." in [e.value for e in at.error]
    at.multiselect(key="search.new.fields").set_value([]).run()  # nothing to search
    assert any("space: it is empty" in e.value for e in at.error), [e.value for e in at.error]
    at.button(key="search.new.start").click().run()
    assert not at.exception, at.exception
    assert "Nothing was started: fix the errors above." in [e.value for e in at.error]
    assert launched == [] and store.ids() == [] and not (store.root / search.SEARCH_DIR).exists()


def test_a_valid_search_is_created_with_the_narrowed_space_and_its_worker_launched(env):
    store, launched = env
    older = search.SearchSpec(base=RunConfig.from_dict({"model": "fastnet", "val_size": 100}).to_dict(),
                              space={"lr": {}}, trials=2)
    search.start_search("older", older, store)  # another search is listed (and selected) already
    at = _app().run()
    assert at.selectbox(key="search.selected").value == "older"
    assert at.tabs[0].label == "Live view"
    at.text_input(key="search.new.study").set_value("form-made").run()
    at.multiselect(key="search.new.fields").set_value(["lr", "augment.hflip"]).run()
    at.number_input(key="search.new.space.lr.low").set_value(0.01).run()
    at.number_input(key="search.new.space.lr.high").set_value(1.0).run()
    at.number_input(key="search.new.trials").set_value(7).run()
    at.selectbox(key="search.new.pruner").set_value("none").run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="search.new.start").click().run()
    assert not at.exception, at.exception
    assert launched == ["form-made"]
    assert "Search **form-made** started" in _texts(at, "success")
    manifest = search.read_manifest(store, "form-made")
    study, spec = search.load_search("form-made", manifest["storage"])
    assert spec.space == {"lr": {"low": 0.01, "high": 1.0, "log": True}, "augment.hflip": {"choices": [False, True]}}
    assert (spec.trials, spec.pruner, spec.sampler) == (7, "none", "tpe")
    assert (spec.base["subset_size"], spec.base["val_size"], spec.base["eval_every"]) == (10000, 1000, 1)
    # the live view selects it: only trial 0 (the fixed config's own values) waits, and no worker is
    # alive (it was not really launched)
    assert at.selectbox(key="search.selected").value == "form-made"
    assert at.session_state["search.tab"] == "Live view"
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "WAITING")]
    assert "No completed trial yet" in _texts(at, "info")
    assert "No worker is running" in _texts(at, "warning")


def test_damaged_storage_is_an_error_message(env):
    store, _launched = env
    folder = store.root / search.SEARCH_DIR
    folder.mkdir(parents=True)
    (folder / "broken.db").write_bytes(b"not a database " * 100)
    atomic_write_json(folder / "broken.json", {"study": "broken", "storage": f"sqlite:///{folder / 'broken.db'}",
                                               "created": time.time()})
    at = _app().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "cannot open the search storage" in errors[0] and "not a database" in errors[0], errors


# ---- the live view of a finished study --------------------------------------------------------------------

def test_live_view_of_a_finished_study(study_env):
    store = study_env
    study, _spec = search.load_search(STUDY, search.read_manifest(store, STUDY)["storage"])
    at = _app().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="search.selected").value == STUDY
    table = at.dataframe[0].value
    assert len(table) == 3
    assert set(table["state"]) <= {"completed", "pruned"} and "completed" in set(table["state"])
    assert {"param lr", "param label_smoothing", "param model_params.dropout", "run_id"} <= set(table.columns)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["best val acc"] == f"{100 * study.best_value:.2f}%"
    assert metrics["trials done"] == "3 / 3"
    assert f"trial #{study.best_trial.number}" in _texts(at, "markdown")
    assert "Finished: 3 trials reached" in _texts(at, "info")
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == ["Download the trials (CSV)"]
    charts = [json.loads(el.proto.spec) for name in ("arrow_vega_lite_chart", "vega_lite_chart")
              for el in at.get(name)]
    assert len(charts) >= 2  # history and curves (importances too once two trials completed)
    dashed = [layer for chart in charts for layer in chart.get("layer", [])
              if layer.get("encoding", {}).get("strokeDash", {}).get("field") == "state"]
    assert dashed, "the curves must mark pruned trials (dashed by state)"
    assert len(at.get("plotly_chart")) == 1  # parallel coordinates
    n_complete = int((table["state"] == "completed").sum())
    if n_complete < 2:
        assert "parameter importances need two completed trials" in _texts(at, "info")


def test_train_the_best_config_fully_queues_it_with_the_chosen_epochs(study_env):
    store = study_env
    study, _spec = search.load_search(STUDY, search.read_manifest(store, STUDY)["storage"])
    best = study.best_trial
    before = set(store.ids())
    at = _app().run()
    at.number_input(key=f"search.best.{STUDY}.epochs").set_value(7).run()
    at.button(key=f"search.best.{STUDY}.train").click().run()
    assert not at.exception, at.exception
    (run_id,) = set(store.ids()) - before
    assert f"Queued as run **{run_id}**" in _texts(at, "success")
    record = store.record(run_id)
    cfg = record.config_dict()
    trial_cfg = best.user_attrs["config"]
    assert cfg["epochs"] == 7
    assert {k: v for k, v in cfg.items() if k not in ("name", "epochs")} == \
        {k: v for k, v in trial_cfg.items() if k not in ("name", "epochs")}
    assert record.status()["state"] == "queued" and record.status().get("search") == STUDY
    # the validation images given back to training: the same config with val_size 0
    before.add(run_id)
    at.checkbox(key=f"search.best.{STUDY}.give_back").check().run()
    at.button(key=f"search.best.{STUDY}.train").click().run()
    (second,) = set(store.ids()) - before
    cfg2 = store.record(second).config_dict()
    assert cfg2["val_size"] == 0 and cfg2["epochs"] == 7 and cfg2["lr"] == trial_cfg["lr"]
    for rid in (run_id, second):  # leave nothing queued for a supervisor to pick up
        jobs.cancel(rid, store, start_worker=False)
