"""The Studies page (app_pages/4_Studies.py) through AppTest: results first and the launch form on its own
tab, the strategies picker, the ablation chart's labels, the cpu-quick note shown once, and the verdict
(held, did not hold, not yet) with its numbers above the results."""
from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from cifar_core.experiments import studies
from cifar_core.imbalance import BALANCING
from tests import test_studies
from tests.test_studies import PAGE, finish_run

# the Studies tests' fixtures: a store for the page, no supervisor, the estimates measured once
no_worker, measured_studies, page_env = test_studies.no_worker, test_studies.measured_studies, test_studies.page_env

STRATEGIES = f"studies.samplers.{studies.default_scale()}.strategies"


def _app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def _texts(at: AppTest) -> list[str]:
    parts = []
    for kind in ("markdown", "caption", "info", "success", "warning", "error"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return parts


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for name in ("arrow_vega_lite_chart", "vega_lite_chart")
            for el in at.get(name)]


def _ablation_study(store, scale: str = "cpu-quick") -> str:
    sid = studies.launch_study("ablation", {"scale": scale}, store)
    for i, entry in enumerate(studies.read_manifest(store, sid)["runs"]):
        finish_run(store.record(entry["run_id"]), 0.3 + 0.02 * i)
    return sid


def test_strategies_is_a_multiselect_over_the_registry(page_env):
    store = page_env
    at = _app().run()
    assert not at.exception, at.exception
    picker = at.multiselect(key=STRATEGIES)
    assert picker.options == BALANCING.names()  # every strategy can be picked, the scale's by default
    default = studies.study_params("samplers", studies.default_scale())[1].default
    assert picker.value == default.split(",") and "none" in picker.value
    assert STRATEGIES not in [t.key for t in at.text_input]
    picker.set_value([]).run()  # nothing picked: a message, and nothing can be launched
    assert any("strategies: choose at least one of" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="studies.samplers.launch").disabled
    at.multiselect(key=STRATEGIES).set_value(["random_undersample", "none"]).run()
    at.slider(key=f"studies.samplers.{studies.default_scale()}.seeds").set_value(1).run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="studies.samplers.launch").click().run()
    assert not at.exception, at.exception
    (listed,) = studies.list_studies(store)
    assert listed["params"]["strategies"] == "random_undersample,none"
    assert [r["cell"]["balance"] for r in listed["runs"]] == ["random_undersample", "none"]
    assert at.selectbox(key="studies.selected").value == listed["study_id"]  # shown at once


def test_results_come_first_and_the_launch_form_is_a_tab(page_env):
    at = _app().run()
    assert [t.label for t in at.tabs[:2]] == ["Results", "Launch a study"]
    assert any("No studies yet" in c.value for c in at.tabs[0].caption)
    assert at.tabs[1].button(key="studies.samplers.launch")
    sid = _ablation_study(page_env)
    at = _app()
    at.query_params["study"] = sid
    at.run()
    assert not at.exception, at.exception
    results, launch = at.tabs[0], at.tabs[1]
    assert results.label == "Results" and results.selectbox(key="studies.selected").value == sid
    assert len(results.dataframe) >= 1
    assert not [b for b in results.button if b.key and b.key.endswith(".launch")]
    assert len([b for b in launch.button if b.key and b.key.endswith(".launch")]) == len(studies.STUDIES.names())


def test_ablation_chart_shows_every_label(page_env):
    sid = _ablation_study(page_env)
    at = _app()
    at.query_params["study"] = sid
    at.run()
    assert not at.exception, at.exception
    labels = list(at.dataframe[0].value["step"])
    assert len(labels) == len(studies.ablation_steps()) >= 7
    specs = [s for s in _charts(at) if "label" in json.dumps(s)]
    assert specs, "no ablation chart"
    layers = specs[0].get("layer", [specs[0]])
    for layer in layers:
        y = layer["encoding"]["y"]
        assert y["field"] == "label" and y["type"] == "nominal"  # horizontal bars: one row per step
        assert y["axis"]["labelOverlap"] is False and y["axis"]["labelLimit"] == 0
        assert y["scale"]["domain"] == labels  # every step is on the axis, in order
        assert layer["encoding"]["x"]["type"] == "quantitative"


def test_cpu_quick_note_is_shown_once(page_env):
    sid = _ablation_study(page_env)
    at = _app()
    at.session_state["studies.ablation.scale"] = "cpu-quick"
    at.query_params["study"] = sid
    at.run()
    assert not at.exception, at.exception
    texts = _texts(at)
    note = studies.INFO["ablation"].note("cpu-quick")
    assert sum(note in t for t in texts) == 1, [t for t in texts if note in t]
    assert sum("far from converged" in t for t in texts) <= 1
    assert any("Scale **cpu-quick** (a first look" in t for t in texts)


def _bn_vs_gn_study(store, acc: dict, seeds: int = 3) -> str:
    """A cpu-scale bn_vs_gn study whose runs finished with acc[(norm, batch)] + 0.01 × seed."""
    sid = studies.launch_study("bn_vs_gn", {"scale": "cpu", "batch_sizes": "2,64"}, store, seeds=seeds)
    for entry in studies.read_manifest(store, sid)["runs"]:
        cell = entry["cell"]
        finish_run(store.record(entry["run_id"]), acc[(cell["norm"], cell["batch_size"])] + 0.01 * entry["seed"])
    return sid


def _open(sid: str) -> AppTest:
    at = _app()
    at.query_params["study"] = sid
    return at.run()


def test_verdict_held_is_shown_with_its_numbers(page_env):
    sid = _bn_vs_gn_study(page_env, {("batch", 2): 0.20, ("batch", 64): 0.40, ("group", 2): 0.38,
                                     ("group", 64): 0.39})
    at = _open(sid)
    assert not at.exception, at.exception
    results = at.tabs[0]
    (box,) = [s.value for s in results.success if "The claim held" in s.value]
    assert "BatchNorm's test error changed by +20.0 ± 0.0 pts" in box and "GroupNorm's by +1.0" in box
    assert "Tested:" in box
    table = results.dataframe[0].value  # the verdict's table comes first, above the chart
    assert list(table["comparison"])[:2] == ["BatchNorm: error at batch 2 − at batch 64",
                                             "GroupNorm: error at batch 2 − at batch 64"]
    assert list(table["mean (pts)"]) == [20.0, 1.0, 19.0]


def test_verdict_not_held_and_not_yet(page_env):
    store = page_env
    flat = _bn_vs_gn_study(store, {("batch", 2): 0.40, ("batch", 64): 0.40, ("group", 2): 0.30,
                                   ("group", 64): 0.40})
    at = _open(flat)
    assert not at.exception, at.exception
    (box,) = [w.value for w in at.tabs[0].warning if "The claim did not hold" in w.value]
    assert "did not grow beyond the seed noise" in box and "+0.0 ± 0.0 pts" in box
    one_seed = _bn_vs_gn_study(store, {("batch", 2): 0.2, ("batch", 64): 0.4, ("group", 2): 0.38,
                                       ("group", 64): 0.39}, seeds=1)
    at = _open(one_seed)
    assert not at.exception, at.exception
    (box,) = [i.value for i in at.tabs[0].info if "No verdict yet" in i.value]
    assert "needs 8 more finished runs" in box and "launch it with 3 or more" in box


def test_samplers_form_shows_only_the_inputs_of_the_chosen_profile(page_env):
    scale = studies.default_scale()
    at = _app().run()
    assert not at.exception, at.exception
    keys = lambda: {w.key for kind in ("number_input", "slider", "select_slider", "selectbox")  # noqa: E731
                    for w in getattr(at, kind)}
    report = keys()
    assert f"studies.samplers.{scale}.low" in report and f"studies.samplers.{scale}.imbalance_ratio" not in report
    at.selectbox(key=f"studies.samplers.{scale}.profile").set_value("long_tail").run()
    assert not at.exception, at.exception
    long_tail = keys()
    assert f"studies.samplers.{scale}.imbalance_ratio" in long_tail and f"studies.samplers.{scale}.low" not in long_tail


def test_param_applies_follows_the_declared_controller():
    assert studies.param_applies("samplers", "low", {"profile": "report"})
    assert not studies.param_applies("samplers", "low", {"profile": "long_tail"})
    assert studies.param_applies("samplers", "imbalance_ratio", {})  # controller not chosen yet
    assert studies.param_applies("ablation", "lr", {"profile": "long_tail"})  # no rule: always


def test_the_parameters_line_leaves_out_what_the_study_did_not_use(page_env):
    """A CIFAR-10-LT samplers study lists its imbalance ratio, not the report profile's low/high."""
    sid = studies.launch_study("samplers", {"scale": "cpu-quick", "profile": "long_tail",
                                            "strategies": "none,weighted_sampler"}, page_env)
    at = _app()
    at.query_params["study"] = sid
    at.run()
    assert not at.exception, at.exception
    (line,) = [c.value for c in at.caption if "parameters:" in c.value]
    assert "profile=long_tail" in line and "imbalance_ratio=100.0" in line
    assert "low=" not in line and "high=" not in line
