"""The Active learning page (app_pages/9_Active_learning.py) through AppTest: its empty state and the new-loop form
(a strategy's declared options, a loop started with its worker's launch stubbed), a finished oracle loop's
learning curve, picked images and class balance, and a human loop's round labelled with the class buttons.
The loops are real: tiny lenet rounds trained in this process once per module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from cifar_core import jobs
from cifar_core.data import CLASSES
from cifar_core.experiments import active_loop as al
from cifar_core.runs import RunStore
from tests.test_active_loop import ROUND, run_to_end, spec

REPO = Path(__file__).resolve().parents[1]
PAGE = str(REPO / "app_pages" / "9_Active_learning.py")


def _app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120)


def _texts(at: AppTest, *kinds: str) -> str:
    kinds = kinds or ("markdown", "caption", "info", "success", "warning", "error")
    return "\n".join(str(e.value) for kind in kinds for e in getattr(at, kind))


@pytest.fixture(scope="module")
def made(tmp_path_factory, cifar_npz) -> Path:
    """A runs folder with a finished oracle loop (2 rounds, margin) and a human loop waiting for the labels of
    its 3 picked images; each round's run trained here."""
    root = tmp_path_factory.mktemp("active_page") / "runs"
    store = RunStore(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR10_NPZ", str(cifar_npz))
        patch.setattr(jobs, "ensure_worker", lambda store=None: False)
        al.start_loop("finished", spec(), store)
        assert run_to_end(store, "finished", cifar_npz) == al.COMPLETED
        al.start_loop("person", spec(strategy="random", per_round=3, labeller="human"), store)
        assert run_to_end(store, "person", cifar_npz) == al.AWAITING
    return root


@pytest.fixture
def env(tmp_path, monkeypatch, cifar_npz):
    """An empty runs folder (or a copy of `made`'s, see `copy_of`); runs are queued, never trained; a worker's
    launch is recorded, not made."""
    root = tmp_path / "runs"
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(root))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    launched: list[str] = []
    monkeypatch.setattr(al, "launch_worker", lambda store, loop_id: launched.append(loop_id) or 0)
    return RunStore(root), launched


def chart_data(element, dataset: int = 0) -> pd.DataFrame:
    """The data frame behind an Altair chart on the page (its `dataset`-th named dataset)."""
    return pa.ipc.open_stream(element.proto.datasets[dataset].data.data).read_pandas()


def copy_of(made: Path, store: RunStore) -> RunStore:
    shutil.copytree(made, store.root)
    return store


def test_no_loops_shows_the_empty_state_and_a_loop_is_started_from_the_form(env):
    store, launched = env
    at = _app().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Active learning"]
    assert "No active-learning loops yet" in _texts(at, "info")
    assert at.session_state["active.tab"] == "New loop"
    assert at.selectbox(key="active.new.strategy").value == "margin"
    # a strategy's declared options are rendered from the registry
    at.selectbox(key="active.new.strategy").set_value("typiclust").run()
    declared = {p.name for p in al.QUERY_STRATEGIES.get("typiclust").params}
    shown = {w.key.rsplit(".", 1)[-1] for w in at.number_input if w.key.startswith("active.new.strategy_params.")}
    shown |= {w.key.rsplit(".", 1)[-1] for w in at.slider if w.key.startswith("active.new.strategy_params.")}
    assert shown == declared
    at.selectbox(key="active.new.strategy").set_value("entropy").run()
    at.text_input(key="active.new.loop").set_value("from-page").run()
    at.number_input(key="active.new.initial").set_value(20).run()
    at.number_input(key="active.new.per_round").set_value(20).run()
    at.number_input(key="active.new.rounds").set_value(3).run()
    at.text_area(key="active.new.json").set_value(json.dumps(ROUND)).run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="active.new.start").click().run()
    assert not at.exception, at.exception
    assert launched == ["from-page"]
    assert "Loop **from-page** started" in _texts(at, "success")
    loop = al.read_loop(store, "from-page")
    assert (loop.spec.strategy, loop.spec.initial, loop.spec.per_round, loop.spec.rounds) == ("entropy", 20, 20, 3)
    assert (loop.spec.base["model"], loop.spec.base["per_class"]) == ("lenet", 30)
    assert at.session_state["active.tab"] == "Loops" and at.selectbox(key="active.selected").value == "from-page"


def test_a_bad_definition_is_shown_and_starts_nothing(env):
    store, launched = env
    at = _app().run()
    at.number_input(key="active.new.initial").set_value(25).run()
    assert any("multiple of 10" in e.value for e in at.error), [e.value for e in at.error]
    at.button(key="active.new.start").click().run()
    assert "Nothing was started: fix the errors above." in [e.value for e in at.error]
    assert launched == [] and al.list_loops(store) == ([], {})


def test_a_damaged_loop_is_an_error_message(env):
    store, _launched = env
    folder = al.loop_dir(store, "damaged")
    folder.mkdir(parents=True)
    (folder / "loop.json").write_text("{oops")
    at = _app().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "active-learning loop damaged: its manifest" in errors[0] and "damaged" in errors[0]


def test_a_finished_loop_shows_its_curve_picks_and_class_balance(env, made, cifar):
    store = copy_of(made, env[0])
    at = _app().run()
    assert not at.exception, at.exception
    at.selectbox(key="active.selected").set_value("finished").run()
    assert not at.exception, at.exception
    loop = al.read_loop(store, "finished")
    assert "Completed: 2 rounds" in _texts(at, "success")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["rounds done"] == "2 / 2" and metrics["labels"] == "40"
    assert metrics["test accuracy"] == f"{100 * loop.curve()[-1]['test_acc']:.2f}%"
    table = at.dataframe[0].value
    assert table["labels"].tolist() == [20, 40] and table["run_id"].tolist() == [r["run_id"] for r in loop.curve()]
    charts = {json.loads(el.proto.spec)["encoding"]["x"]["field"] if "encoding" in json.loads(el.proto.spec)
              else "layered": el for el in at.get("vega_lite_chart")}
    assert set(charts) == {"layered", "class"}  # the learning curves and the class balance
    curves = chart_data(charts["layered"], 1)  # every loop: the human one has finished its round 0
    assert sorted(set(curves["group"])) == ["margin", "random · human"]
    margin = curves[curves["group"] == "margin"]
    assert margin["labels"].tolist() == [20, 40]
    assert margin["mean"].tolist() == pytest.approx([row["test_acc"] for row in loop.curve()])
    query = al.read_query(store, "finished", 0)
    true_classes = cifar.y_train[query["indices"]]
    balance = chart_data(charts["class"])
    assert balance["images"].tolist() == np.bincount(true_classes, minlength=10).tolist()
    assert "20 images picked by margin with round 0's model" in _texts(at, "markdown")
    images = [caption for element in at.get("image") for caption in element.captions]
    assert len(images) == 20  # round 0's batch, every picked image, most wanted first, with its class
    assert [c.split(" · ")[1] for c in images] == [CLASSES[t] for t in true_classes]
    assert "No active-learning loops yet" not in _texts(at)


def test_a_human_round_is_labelled_with_the_class_buttons(env, made, cifar):
    store, launched = env
    copy_of(made, store)
    at = _app().run()
    at.selectbox(key="active.selected").set_value("person").run()
    assert not at.exception, at.exception
    assert "label them to start round 1" in _texts(at, "warning")
    picked = al.read_query(store, "person", 0)["indices"]
    submit = at.button(key="active.label.submit")
    assert submit.disabled and submit.label == "Submit 3 labels"
    clicks = [7, 2, 7]
    for label in clicks:  # each click labels the shown image and moves to the next one without a label
        at.button(key=f"active.label.{label}").click().run()
        assert not at.exception, at.exception
    at.button(key="active.label.back").click().run()  # back to the second image: change its label
    at.button(key="active.label.4").click().run()
    assert not at.button(key="active.label.submit").disabled
    at.button(key="active.label.submit").click().run()
    assert not at.exception, at.exception
    assert launched == ["person"]
    assert "labels of round 0's batch are saved" in _texts(at, "success")
    query = al.read_query(store, "person", 0)
    assert query["labels"] == [7, 4, 7] and query["labeller"] == "human" and query["indices"] == picked
    # the agreement with CIFAR-10's labels
    truth = cifar.y_train[picked]
    agreement = np.mean(np.array([7, 4, 7]) == truth)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["agreement"] == f"{100 * agreement:.2f}%"
    assert al.awaiting_round(store, "person") is None
