"""The Imbalance page (app_pages/7_Imbalance.py) and its library half (experiments/imbalance_lab.py): the
training set of a profile, finished runs side by side, threshold moving on saved logits, cRT and
EasyEnsemble launches. Finished runs are made from constructed logits (nothing trains here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cifar_core.config import RunConfig
from cifar_core.data import CLASSES
from cifar_core.experiments import ensembles, imbalance_lab, studies
from cifar_core.imbalance import imbalance_report
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore, atomic_write_json
from tests import test_studies

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "7_Imbalance.py")
LT_COUNTS = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])  # CIFAR-10-LT, rho = 100


def head_biased_logits(n_per_class: int, counts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a classifier that learned the training prior: the true class gets +2, and every class
    gets + log(its share), so tail classes lose to head classes (what logit adjustment undoes)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    logits = rng.normal(0.0, 1.0, (labels.size, 10))
    logits[np.arange(labels.size), labels] += 2.0
    logits += np.log(counts / counts.sum())
    return logits.astype(np.float32), labels


def finished_run(store: RunStore, name: str, counts=LT_COUNTS, val: bool = True, logits: bool = True):
    cfg = RunConfig.from_dict({"name": name, "model": "fastnet", "imbalance": "long_tail",
                               "val_size": 500 if val else 0, "balance": "none"})
    record = store.create(cfg, state="completed")
    test_logits, test_labels = head_biased_logits(100, counts, seed=1)
    val_logits, val_labels = head_biased_logits(50, counts, seed=2) if val else (np.zeros((0, 10)), np.zeros(0))
    report = imbalance_report(test_logits, test_labels, counts, list(CLASSES))
    atomic_write_json(record.results_path, report)
    record.update_status(test_acc=report["test_acc"], balanced_acc=report["balanced_acc"],
                         macro_f1=report["macro_f1"])
    if logits:
        record.write_logits(test_logits=test_logits, test_labels=test_labels, val_logits=val_logits,
                            val_labels=val_labels, train_counts=counts)
    return record


measured_studies = test_studies.measured_studies  # the study estimates, measured once per session


@pytest.fixture
def env(monkeypatch, tmp_path, cifar_npz, measured_studies):
    runs = tmp_path / "runs"
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(runs))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    from cifar_core import jobs
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)  # queue, never train
    return RunStore(runs)


# ---- library ---------------------------------------------------------------------------------------

def test_profile_counts_are_the_split_a_run_trains_on(cifar):
    counts = imbalance_lab.profile_counts("long_tail", {"imbalance_ratio": 100}, 0, cifar.y_train)
    assert list(counts["labeled"].values()) == LT_COUNTS.tolist()
    assert counts["totals"]["labeled"] == 12406


def test_threshold_moving_on_saved_logits_lifts_the_tail(tmp_path):
    store = RunStore(tmp_path / "runs")
    record = finished_run(store, "lt")
    moved = imbalance_lab.threshold_moving(store, record.run_id, "logit_adjustment", {"tau": 1.0})
    assert moved["after"]["balanced_acc"] > moved["before"]["balanced_acc"] + 0.1
    assert moved["after"]["group_acc"]["few"] > moved["before"]["group_acc"]["few"]
    # τ = 0 changes nothing
    same = imbalance_lab.threshold_moving(store, record.run_id, "logit_adjustment", {"tau": 0.0})
    assert same["after"]["balanced_acc"] == same["before"]["balanced_acc"]
    recall = imbalance_lab.recall_before_after(moved)
    assert list(recall) == [imbalance_lab.AS_TRAINED, imbalance_lab.MOVED]
    assert recall[imbalance_lab.MOVED] == moved["after"]["per_class_recall"]
    centred = imbalance_lab.centred_biases(moved)
    assert abs(sum(centred.values())) < 1e-9
    # the tail gets the largest bias: logit adjustment with τ = 1 adds -log(share)
    assert max(centred, key=centred.get) == CLASSES[-1] and min(centred, key=centred.get) == CLASSES[0]


def test_threshold_moving_says_why_it_cannot(tmp_path):
    store = RunStore(tmp_path / "runs")
    old = finished_run(store, "old", logits=False)
    with pytest.raises(ConfigError, match="no saved logits"):
        imbalance_lab.threshold_moving(store, old.run_id, "logit_adjustment", {"tau": 1.0})
    no_val = finished_run(store, "noval", val=False)
    with pytest.raises(ConfigError, match="no validation split"):
        imbalance_lab.threshold_moving(store, no_val.run_id, "tuned_biases", {})
    with pytest.raises(ConfigError):
        imbalance_lab.threshold_moving(store, no_val.run_id, "no_such_method", {})


def test_finished_runs_and_their_comparison_rows(tmp_path):
    store = RunStore(tmp_path / "runs")
    a, b = finished_run(store, "a"), finished_run(store, "b", logits=False)
    store.create(RunConfig.from_dict({"name": "queued"}))  # not finished: not listed
    runs = {r.run_id: r for r in imbalance_lab.finished_runs(store)}
    assert set(runs) == {a.run_id, b.run_id}
    assert runs[a.run_id].has_logits and not runs[b.run_id].has_logits
    rows = imbalance_lab.comparison_rows(list(runs.values()))
    labels = [label for _, label in imbalance_lab.COMPARE_COLUMNS]
    assert all(set(labels) <= set(row) for row in rows)
    row = next(r for r in rows if r["run"] == a.run_id)
    assert row["few-shot"] is not None and 0 <= row["ECE"] <= 1


# ---- page ------------------------------------------------------------------------------------------

def _app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=90)


def test_page_shows_the_training_set_of_a_profile(env):
    at = _app().run()
    assert not at.exception, at.exception
    assert any("12,406 training images" in m.value for m in at.markdown), [m.value for m in at.markdown]
    at.selectbox(key="imb.profile").set_value("report_random").run()
    assert not at.exception, at.exception
    assert any("training images" in m.value and "12,406" not in m.value for m in at.markdown)


def test_page_moves_thresholds_and_shows_runs_side_by_side(env):
    store = env
    record = finished_run(store, "lt run")
    finished_run(store, "other")
    at = _app().run()
    assert not at.exception, at.exception
    at.selectbox(key="imb.move.run").set_value(record.run_id).run()
    assert not at.exception, at.exception
    balanced = next(m for m in at.metric if m.label == "balanced accuracy")
    assert balanced.delta.startswith("+") and balanced.delta != "+0.00 pt", balanced.delta
    assert not at.error, [e.value for e in at.error]
    side = at.multiselect(key="imb.side.runs")
    assert len(side.value) == 2
    frames = [df.value for df in at.dataframe]
    assert any({"balanced acc", "few-shot", "ECE"} <= set(f.columns) and len(f) == 2 for f in frames)


def test_page_launches_an_ensemble_and_offers_crt_only_from_runs_with_weights(env):
    store = env
    record = finished_run(store, "lt run")  # no checkpoint: not a cRT source
    at = _app().run()
    assert not at.exception, at.exception
    assert any("No finished run with a checkpoint" in i.value for i in at.info), [i.value for i in at.info]
    at.number_input(key="imb.ens.members").set_value(3).run()
    at.button(key="imb.ens.launch").click().run()
    assert not at.exception, at.exception
    (manifest,) = ensembles.list_ensembles(store)
    assert manifest["members"] == 3 and len(manifest["runs"]) == 3
    assert record.run_id not in [r["run_id"] for r in manifest["runs"]]


def test_compare_shows_only_the_inputs_of_the_chosen_profile(env):
    store = env
    at = _app().run()
    assert not at.exception, at.exception
    prefix = f"imb.compare.{at.selectbox(key='imb.compare.scale').value}."

    def shown() -> set[str]:
        widgets = [*at.number_input, *at.select_slider, *at.selectbox, *at.slider]
        return {w.key[len(prefix):] for w in widgets if w.key and w.key.startswith(prefix)}

    assert at.selectbox(key=prefix + "profile").value == "report"
    assert {"low", "high"} <= shown() and "imbalance_ratio" not in shown()  # ρ has no effect on the report's set
    at.number_input(key=prefix + "low").set_value(600).run()
    at.button(key="imb.compare.launch").click().run()
    assert not at.exception, at.exception
    at.selectbox(key=prefix + "profile").set_value("long_tail").run()
    assert not at.exception, at.exception
    assert "imbalance_ratio" in shown() and not {"low", "high"} & shown()
    at.select_slider(key=prefix + "imbalance_ratio").set_value(50.0).run()
    at.button(key="imb.compare.launch").click().run()
    assert not at.exception, at.exception
    launched = {m["params"]["profile"]: m for m in studies.list_studies(store)}
    assert launched["report"]["params"]["low"] == 600
    assert launched["long_tail"]["params"]["imbalance_ratio"] == 50.0
    report = store.config_dict_of(launched["report"]["runs"][0]["run_id"])
    assert (report["imbalance"], report["imbalance_params"]) == ("report_random", {"low": 600, "high": 1000})
    long_tail = store.config_dict_of(launched["long_tail"]["runs"][0]["run_id"])
    assert (long_tail["imbalance"], long_tail["imbalance_params"]["imbalance_ratio"]) == ("long_tail", 50.0)
