"""The Train page (app_pages/1_Train.py) through streamlit.testing.v1.AppTest, in-process and fast.

Every test gets its own runs folder (CIFAR_LAB_RUNS) and the offline data as a Keras npz
(CIFAR10_NPZ). The job supervisor is never started: `cifar_core.jobs.ensure_worker` is a no-op, so
a launched run stays "queued" on disk where the test can read it.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest


from streamlit.testing.v1 import AppTest

from cifar_core.cli import build_parser, config_from_args
from cifar_core.config import RunConfig
from cifar_core.experiments.presets import DISTILLED_PRESETS, preset_summary, presets
from cifar_core.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
PAGE = str(REPO / "app_pages" / "1_Train.py")
LAUNCH = "train.launch"
FORM = "train.form"
PICK = "train.teacher_pick"


@pytest.fixture
def runs_root(tmp_path, monkeypatch, cifar_npz) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(root))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    import cifar_core.jobs as jobs
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    from ui.common import clear_data_status
    clear_data_status()
    return root


def page(**query) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=240)  # the first estimate times a fresh process (slow on a busy machine)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def launch_button(at: AppTest):
    return at.button(key=LAUNCH)


def confirm_long(at: AppTest) -> AppTest:
    """Tick the "I understand this run takes about …" box where the estimate asks for it (runs over
    10 minutes: the long presets, or any run while a busy machine slows the probe)."""
    for box in at.checkbox:
        if box.key and box.key.startswith("train.confirm_long") and not box.value:
            box.check().run()
            break
    return at


def finished_run(root: Path, run_id: str = "teacher-1", state: str = "completed") -> str:
    """A run record that can teach as far as the page can tell (state and a checkpoint file)."""
    record = RunStore(root).create(RunConfig(model="lenet").validated(), run_id=run_id, state=state)
    record.checkpoint_path("best").write_bytes(b"")
    return run_id


def test_every_preset_renders_and_fills_the_form(runs_root):
    teacher = finished_run(runs_root)
    at = page()
    assert_clean(at)
    assert not at.warning  # the data is there
    for name, preset in presets().items():
        at.selectbox(key="train.start").set_value(name).run()
        assert_clean(at)
        if name in DISTILLED_PRESETS:  # incomplete until a teacher is picked
            assert any("needs a teacher_run" in m for m in errors(at)), (name, errors(at))
            at.multiselect(key=PICK).set_value([teacher]).run()
            preset = {**preset, "teacher_run": teacher}
        assert errors(at) == [], (name, errors(at))
        assert preset_summary(name) in [c.value for c in at.caption], name  # says what this preset is
        assert not launch_button(confirm_long(at)).disabled, name
        expected = RunConfig.from_dict(preset)
        # the widgets show the preset, not the previous one's values
        assert at.selectbox(key=f"{FORM}.model").value == expected.model, name
        assert at.number_input(key=f"{FORM}.epochs").value == expected.epochs, name
        assert at.number_input(key=f"{FORM}.batch_size").value == expected.batch_size, name
        steps = at.session_state[f"{FORM}.augment.__steps"]
        assert [s["name"] for s in steps] == [s["name"] for s in expected.augment], name
        assert any("Estimated duration: about" in i.value for i in at.info), name
        # the command line shown on the page gives back exactly this config
        line = next(c.value for c in at.code
                    if c.value.startswith("python -m cifar_core train --") and "--config" not in c.value)
        args = build_parser().parse_args(shlex.split(line)[3:])
        assert config_from_args(args).to_dict() == expected.to_dict(), (name, line)


def test_preset_from_the_link(runs_root):
    at = page(preset="fast")
    assert_clean(at)
    assert at.selectbox(key="train.start").value == "fast"
    assert at.selectbox(key=f"{FORM}.model").value == "fastnet"
    assert at.checkbox(key=f"{FORM}.tta_flip").value is True
    at = page(preset="no such preset")
    assert_clean(at)
    assert any("unknown preset" in m for m in errors(at))


def test_model_choice_rerenders_its_params(runs_root):
    at = page(preset="report baseline")
    assert at.selectbox(key=f"{FORM}.model_params.resnet18.norm").value == "batch"
    at.selectbox(key=f"{FORM}.model").set_value("lenet").run()
    assert_clean(at)
    assert at.selectbox(key=f"{FORM}.model_params.lenet.activation").value == "relu"
    keys = {w.key for w in at.selectbox}
    assert f"{FORM}.model_params.resnet18.norm" not in keys


def test_group_norm_with_bad_groups_is_reported_and_blocks_launch(runs_root):
    at = page(preset="report baseline")
    at.selectbox(key=f"{FORM}.model_params.resnet18.norm").set_value("group").run()
    assert errors(at) == []
    at.number_input(key=f"{FORM}.model_params.resnet18.groups").set_value(24).run()
    assert_clean(at)
    assert any("groups=24" in m for m in errors(at)), errors(at)
    assert launch_button(at).disabled


def test_val_size_not_below_subset_size_is_reported(runs_root):
    at = page(preset="report baseline")
    at.number_input(key=f"{FORM}.val_size").set_value(10000).run()
    assert_clean(at)
    assert any("leaves no training images" in m for m in errors(at)), errors(at)
    assert launch_button(at).disabled
    at.number_input(key=f"{FORM}.val_size").set_value(500).run()
    assert errors(at) == []
    assert not launch_button(confirm_long(at)).disabled


def test_launch_tiny_queues_a_run_once(runs_root):
    at = confirm_long(page(preset="tiny (smoke test)"))
    button = launch_button(at)  # the button as the browser shows it before the first click
    assert not button.disabled
    button.click().run()
    assert_clean(at)
    store = RunStore(runs_root)
    ids = store.ids()
    assert len(ids) == 1, ids
    record = store.record(ids[0])
    assert record.state() == "queued"
    assert record.status()["data_source"].endswith("cifar10.npz")
    assert record.config_dict() == RunConfig.from_dict(presets()["tiny (smoke test)"]).to_dict()
    # the Runs page is told which run to show
    assert at.session_state["selected_run"] == ids[0]
    # run on its own, the page has no Runs page to switch to: it stays and says where the run went
    assert any(f"queued as **{ids[0]}**" in s.value for s in at.success)
    # double-click safety: the button is off until the form changes, and a second click that was
    # already on its way (sent from the page as it was before the first launch) does nothing
    assert launch_button(at).disabled
    button.click().run()
    assert_clean(at)
    assert len(store.ids()) == 1
    at.number_input(key=f"{FORM}.seed").set_value(1).run()
    assert not launch_button(confirm_long(at)).disabled
    launch_button(at).click().run()
    assert len(store.ids()) == 2


def test_the_estimate_is_measured_and_stated_next_to_launch(runs_root):
    from cifar_core.experiments.estimate import CACHE_NAME

    at = page(preset="tiny (smoke test)")
    assert_clean(at)
    info = next(i.value for i in at.info if "Estimated duration: about" in i.value)
    assert "probe" in info and "100 training images × 1 epoch(s)" in info
    assert any(c.value.startswith("Takes about ") and "probe" in c.value for c in at.caption)
    assert (runs_root / CACHE_NAME).is_file()  # measured on this machine, kept in the runs folder
    at.number_input(key=f"{FORM}.epochs").set_value(30).run()  # same model: the cached probe, more time
    longer = next(i.value for i in at.info if "Estimated duration: about" in i.value)
    assert "(cached)" in longer and "× 30 epoch(s)" in longer


def test_launch_switches_to_the_runs_page(runs_root):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/1_Train.py").run()
    at.selectbox(key="train.start").set_value("tiny (smoke test)").run()
    launch_button(confirm_long(at)).click().run()
    ids = RunStore(runs_root).ids()
    assert len(ids) == 1
    assert at.query_params.get("run") == ids[0]
    assert at.session_state["selected_run"] == ids[0]


def test_from_run_prefills_the_form(runs_root):
    cfg = RunConfig.from_dict({"name": "old", "model": "lenet", "model_params": {"activation": "tanh"},
                               "epochs": 3, "subset": "per_class", "per_class": 50, "val_size": 50,
                               "augment": [{"name": "cutout", "params": {"size": 6}, "p": 0.5}]})
    record = RunStore(runs_root).create(cfg, state="completed")
    at = page(from_run=record.run_id)
    assert_clean(at)
    assert errors(at) == []
    assert at.selectbox(key="train.start").value == f"run {record.run_id}"
    assert at.selectbox(key=f"{FORM}.model").value == "lenet"
    assert at.selectbox(key=f"{FORM}.model_params.lenet.activation").value == "tanh"
    assert at.number_input(key=f"{FORM}.epochs").value == 3
    assert at.number_input(key=f"{FORM}.per_class").value == 50
    steps = at.session_state[f"{FORM}.augment.__steps"]
    assert [(s["name"], s["p"]) for s in steps] == [("cutout", 0.5)]
    # relaunch with a change: a new run with the changed config
    at.number_input(key=f"{FORM}.epochs").set_value(4).run()
    launch_button(confirm_long(at)).click().run()
    new = [i for i in RunStore(runs_root).ids() if i != record.run_id]
    assert len(new) == 1
    assert RunStore(runs_root).record(new[0]).config().replace(epochs=3).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("bad", ["../../etc", "no-such-run", "a/b"])
def test_from_run_with_a_bad_id_shows_an_error(runs_root, bad):
    at = page(from_run=bad)
    assert_clean(at)
    assert errors(at), "expected an error message"
    assert all("Traceback" not in m for m in errors(at))
    # the page still works from a preset
    assert at.selectbox(key="train.start").value == next(iter(presets()))
    assert not launch_button(confirm_long(at)).disabled


def test_chain_from_the_link(runs_root):
    chain = [{"name": "rotation", "params": {"degrees": 30}, "p": 0.5}, {"name": "hflip"}]
    at = page(preset="tiny (smoke test)", chain=json.dumps(chain))
    assert_clean(at)
    steps = at.session_state[f"{FORM}.augment.__steps"]
    assert [s["name"] for s in steps] == ["rotation", "hflip"]
    slider = at.slider(key=f"{FORM}.augment.s{steps[0]['uid']}.p")
    assert slider.value == 0.5
    at = page(chain="[{\"name\": \"no_such_op\"}]")
    assert_clean(at)
    assert any("no_such_op" in m for m in errors(at))


def test_augment_editor_add_move_remove(runs_root):
    at = page(preset="tiny (smoke test)")
    key = f"{FORM}.augment"

    def names():
        return [s["name"] for s in at.session_state[f"{key}.__steps"]]

    assert names() == ["random_crop", "hflip"]
    at.selectbox(key=f"{key}.__add_choice").set_value("cutout").run()
    at.button(key=f"{key}.__add").click().run()
    assert names() == ["random_crop", "hflip", "cutout"]
    uid = at.session_state[f"{key}.__steps"][2]["uid"]
    at.slider(key=f"{key}.s{uid}.size").set_value(12).run()
    at.button(key=f"{key}.s{uid}.up").click().run()
    assert names() == ["random_crop", "cutout", "hflip"]
    assert at.slider(key=f"{key}.s{uid}.size").value == 12  # values move with their step
    first = at.session_state[f"{key}.__steps"][0]["uid"]
    at.button(key=f"{key}.s{first}.remove").click().run()
    assert names() == ["cutout", "hflip"]
    assert_clean(at)
    assert errors(at) == []


def test_missing_data_disables_launch(runs_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(tmp_path / "missing.npz"))
    from ui.common import clear_data_status
    clear_data_status()
    at = page(preset="tiny (smoke test)")
    assert_clean(at)
    assert at.warning, "expected the missing-data message"
    assert launch_button(at).disabled


def test_widget_kind_follows_the_declaration():
    from cifar_core.params import Param
    from ui.forms import widget_kind
    assert widget_kind(Param("lr", "float", 0.05, 1e-6, 10.0, log=True)) == "log"
    assert widget_kind(Param("lr", "float", 0.05, 1e-6, None, log=True)) == "number"  # unbounded: no slider
    assert widget_kind(Param("dropout", "float", 0.0, 0.0, 0.9)) == "slider"
    assert widget_kind(Param("momentum", "float", 0.9, 0.0, 0.999)) == "number"  # 0.999 is off a 0.01 grid
    assert widget_kind(Param("weight_decay", "float", 5e-4, 0.0, 1.0)) == "number"
    assert widget_kind(Param("padding", "int", 4, 0, 16)) == "slider"
    assert widget_kind(Param("epochs", "int", 10, 1, 2000)) == "number"
    assert widget_kind(Param("on", "bool", True)) == "checkbox"
    assert widget_kind(Param("mode", "choice", "a", choices=("a", "b"))) == "select"
    assert widget_kind(Param("scale", "float_pair", (0.35, 1.0), 0.05, 1.0)) == "range"
    assert widget_kind(Param("name", "str", "")) == "text"


def test_log_slider_stops_cover_the_bounds_default_and_value():
    from cifar_core.params import Param
    from ui.forms import log_options
    lr = Param("lr", "float", 0.05, 1e-6, 10.0, log=True)
    stops = log_options(lr, 0.0123)
    assert stops[0] == 1e-6 and stops[-1] == 10.0 and 0.05 in stops and 0.0123 in stops and 0.02 in stops
    assert stops == sorted(stops) and len({f"{v:g}" for v in stops}) == len(stops)  # one stop per label


def test_teacher_picker_lists_finished_runs_and_fills_teacher_run(runs_root):
    teacher = finished_run(runs_root, "teacher-1")
    finished_run(runs_root, "still-running", state="running")
    at = page(preset="ViT-tiny distilled")
    assert_clean(at)
    assert launch_button(at).disabled
    picker = at.multiselect(key=PICK)
    assert picker.options == [f"{teacher} · lenet · test ?"]
    picker.set_value([teacher]).run()
    assert_clean(at)
    assert errors(at) == []
    assert at.text_input(key=f"{FORM}.teacher_run").value == teacher
    launch_button(confirm_long(at)).click().run()
    queued = [i for i in RunStore(runs_root).ids() if i not in (teacher, "still-running")]
    assert len(queued) == 1
    config = RunStore(runs_root).record(queued[0]).config_dict()
    assert config["distill"] == "hard" and config["teacher_run"] == teacher


def test_two_picked_teachers_launch_as_an_ensemble_teacher(runs_root):
    first, second = finished_run(runs_root, "teacher-a"), finished_run(runs_root, "teacher-b")
    at = page(preset="ViT-tiny distilled")
    at.multiselect(key=PICK).set_value([first, second]).run()
    assert_clean(at)
    assert errors(at) == []
    assert at.text_input(key=f"{FORM}.teacher_run").value == f"{first},{second}"
    at.multiselect(key=PICK).set_value([second]).run()
    assert at.text_input(key=f"{FORM}.teacher_run").value == second
    at.text_input(key=f"{FORM}.teacher_run").input(f"{first},{second}").run()
    assert at.multiselect(key=PICK).value == [first, second]  # typed ids show in the picker
    launch_button(confirm_long(at)).click().run()
    queued = [i for i in RunStore(runs_root).ids() if i not in (first, second)]
    assert RunStore(runs_root).record(queued[0]).config_dict()["teacher_run"] == f"{first},{second}"


def test_typed_teacher_that_has_not_finished_blocks_launch(runs_root):
    finished_run(runs_root, "still-running", state="running")
    at = page(preset="ViT-tiny distilled")
    assert any("no completed run" in i.value for i in at.info)  # a running run cannot teach
    at.text_input(key=f"{FORM}.teacher_run").input("still-running").run()
    assert_clean(at)
    assert any("is running, not completed" in m for m in errors(at)), errors(at)
    assert launch_button(at).disabled
    at.text_input(key=f"{FORM}.teacher_run").input("nope").run()
    assert any("no such run" in m for m in errors(at)), errors(at)


# ---- the default preset and long launches ----------------------------------------------------------
def estimate_info(at: AppTest) -> str:
    return next(i.value for i in at.info if "Estimated duration: about" in i.value)


def test_the_default_preset_is_the_quick_one_and_launches_without_a_question(runs_root):
    from cifar_core.experiments.presets import QUICK_PRESET

    at = page()
    assert_clean(at)
    assert next(iter(presets())) == QUICK_PRESET
    assert at.selectbox(key="train.start").value == QUICK_PRESET
    assert errors(at) == []
    info = estimate_info(at)
    assert "3,000 training images × 3 epoch(s)" in info, info  # a small job: 9,000 images trained
    confirm = [c for c in at.checkbox if c.key and c.key.startswith("train.confirm_long")]
    if estimated_seconds(info) <= 600:  # on a quiet 2-core CPU about a minute; a busy one measures more
        assert not confirm and not launch_button(at).disabled
    else:
        assert confirm and launch_button(at).disabled


def estimated_seconds(info: str) -> float:
    """The seconds of the estimate's "about **…**" text (human_duration's forms)."""
    text = info.split("about **", 1)[1].split("**", 1)[0]
    units = {"s": 1, "min": 60, "h": 3600}
    words = text.split()
    return sum(float(words[i]) * units[words[i + 1]] for i in range(0, len(words), 2))


def test_a_long_launch_states_its_estimate_and_needs_a_confirmation(runs_root):
    at = page(preset="report baseline")  # resnet18, 9,000 images × 20 epochs: 71 min on a 2-core CPU
    at.selectbox(key=f"{FORM}.device").set_value("cpu").run()
    at.number_input(key=f"{FORM}.epochs").set_value(100).run()  # long on any CPU
    assert_clean(at)
    assert errors(at) == []
    assert estimated_seconds(estimate_info(at)) > 600
    about = estimate_info(at).split("about **", 1)[1].split("**", 1)[0]  # "5 h 50 min"…
    confirm = next(c for c in at.checkbox if c.key and c.key.startswith("train.confirm_long"))
    assert f"I understand this run takes about {about}" in confirm.label, (confirm.label, about)
    assert launch_button(at).disabled
    assert "Confirm the duration" in launch_button(at).help
    assert RunStore(runs_root).ids() == []  # nothing queued without the confirmation
    confirm.check().run()
    assert_clean(at)
    assert not launch_button(at).disabled
    launch_button(at).click().run()
    assert len(RunStore(runs_root).ids()) == 1
    # another change asks again
    at.number_input(key=f"{FORM}.seed").set_value(3).run()
    assert launch_button(at).disabled


# ---- form wording and grouping ------------------------------------------------------------------------
def form_widgets(at: AppTest) -> list:
    kinds = ("number_input", "selectbox", "checkbox", "slider", "text_input", "select_slider")
    return [w for kind in kinds for w in getattr(at, kind) if w.key and w.key.startswith(FORM + ".")]


def test_form_labels_are_words_not_field_names(runs_root):
    at = page(preset="fast")
    assert_clean(at)
    widgets = form_widgets(at)
    assert len(widgets) > 30
    raw = [(w.key, w.label) for w in widgets if "_" in w.label or w.label == w.key.rsplit(".", 1)[-1]
           and w.label.islower()]
    assert raw == [], raw
    assert at.number_input(key=f"{FORM}.time_limit_min").label == "Time limit (minutes)"
    assert at.number_input(key=f"{FORM}.bias_lr_scale").label == "LR scale of biases and norms"
    assert at.selectbox(key=f"{FORM}.model").label == "Model"


def test_form_groups_dropout_tta_and_lookahead(runs_root):
    at = page(preset="fast")
    assert_clean(at)
    tabs = {t.label: t for t in at.tabs}
    assert list(tabs) == ["Run", "Model", "Data", "Augmentation", "Optimizer", "Regularization", "Evaluation", "Few labels",
                          "Distillation", "Speed"]

    def keys(tab: str) -> set[str]:
        block = tabs[tab]
        return {w.key for kind in ("checkbox", "number_input", "slider", "selectbox")
                for w in block.get(kind) if w.key}

    assert {f"{FORM}.tta_flip", f"{FORM}.tta_translate", f"{FORM}.eval_every"} <= keys("Evaluation")
    assert {f"{FORM}.lookahead_every", f"{FORM}.lookahead_decay"} <= keys("Optimizer")
    assert f"{FORM}.model_params.fastnet.dropout" in keys("Regularization")
    assert f"{FORM}.model_params.fastnet.dropout" not in keys("Model")
    assert {f"{FORM}.model_params.fastnet.width", f"{FORM}.model_params.fastnet.whiten"} <= keys("Model")
    assert not {f"{FORM}.tta_flip", f"{FORM}.lookahead_every"} & keys("Regularization")
    # the dropout set under Regularization still goes into the model's parameters
    at.slider(key=f"{FORM}.model_params.fastnet.dropout").set_value(0.2).run()
    assert_clean(at)
    assert '"dropout": 0.2' in next(c.value for c in at.code if c.language == "json")


def test_a_flip_step_has_one_probability(runs_root):
    at = page(preset="tiny (smoke test)")
    steps = at.session_state[f"{FORM}.augment.__steps"]
    flip = next(s for s in steps if s["name"] == "hflip")
    prefix = f"{FORM}.augment.s{flip['uid']}."
    step_widgets = [w for w in form_widgets(at) if w.key.startswith(prefix)]
    assert [w.key for w in step_widgets] == [prefix + "p"], [w.key for w in step_widgets]
    assert step_widgets[0].label == "Flip probability (p)" and step_widgets[0].value == 0.5
    # a chain from an older link or record, with the flip's former p_flip, shows the one probability
    old = [{"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}]
    at = page(preset="tiny (smoke test)", chain=json.dumps(old))
    assert_clean(at)
    (step,) = at.session_state[f"{FORM}.augment.__steps"]
    assert step["params"] == {} and step["p"] == 0.5
    assert errors(at) == []


def test_chain_editor_buttons_show_icons_and_whole_labels(runs_root):
    at = page(preset="tiny (smoke test)")
    key = f"{FORM}.augment"
    uid = at.session_state[f"{key}.__steps"][0]["uid"]
    icons = {at.button(key=f"{key}.s{uid}.{which}").proto.icon for which in ("up", "down", "remove")}
    assert icons == {":material/arrow_upward:", ":material/arrow_downward:", ":material/close:"}
    for which in ("up", "down", "remove"):
        assert at.button(key=f"{key}.s{uid}.{which}").help  # the words are in the tooltip
    clear = at.button(key=f"{key}.__clear")
    assert clear.label == "Clear all" and clear.proto.icon == ":material/clear_all:"
    assert at.button(key=f"{key}.__add").proto.icon == ":material/add:"
    clear.click().run()
    assert at.session_state[f"{key}.__steps"] == []


def test_the_missing_teacher_message_names_the_control(runs_root):
    at = page(preset="ViT-tiny distilled")
    message = next(m for m in errors(at) if "needs a teacher_run" in m)
    assert "Train page" not in message and "'Teacher run(s)'" in message


def test_the_training_split_is_shown_per_class_before_launch(runs_root, cifar):
    from cifar_core.config import RunConfig
    from cifar_core.engine.prepare import run_split, split_counts
    from cifar_core.experiments.presets import preset

    at = page(preset="tiny (smoke test)")
    assert_clean(at)
    expected = split_counts(run_split(RunConfig.from_dict(preset("tiny (smoke test)")), cifar.y_train))["totals"]
    text = (f"{expected['labeled']:,} labeled · {expected['unlabeled']:,} unlabeled · "
            f"{expected['validation']:,} validation images")
    assert any(text in c.value for c in at.caption), [c.value for c in at.caption]
    specs = [el.proto.spec for el in at.get("vega_lite_chart")]
    assert any('"part"' in spec and '"unlabeled"' in spec for spec in specs), "no per-class split chart"
    at.selectbox(key=f"{FORM}.imbalance").set_value("long_tail").run()
    assert_clean(at)
    assert any("imbalance ratio" in c.value for c in at.caption)
