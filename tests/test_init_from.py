"""Initialising a run from a finished run (cifar_core/engine/init_from.py): fine-tune, linear probe and
classifier re-training (cRT), their checks, and tiny real runs from a tiny finished fastnet run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.engine import build_model, build_optimizer, prepare, train_run
from cifar_core.engine.checkpoints import read_checkpoint
from cifar_core.engine.init_from import (check_init_run, crt_config, crt_epochs, init_candidates,
                                         load_init_source)
from cifar_core.models import classifier_head, create_model
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

SOURCE = "src"
TINY = dict(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=20, val_size=0,
            test_size=100, epochs=1, batch_size=50, log_every=1, augment=[], weight_decay=5e-3, lr=0.05)


def tiny(**changes) -> RunConfig:
    return RunConfig(**{**TINY, **changes}).validated()


@pytest.fixture(scope="module")
def store(tmp_path_factory, cifar_npz) -> RunStore:
    """A runs root with one completed tiny fastnet run (BatchNorm layers, patch whitening)."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    record = train_run(tiny(), store, run_id=SOURCE, data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    return store


def source_weights(store: RunStore) -> dict:
    return read_checkpoint(store.record(SOURCE)).evaluation_weights()[0]


def built(store: RunStore, cifar_npz, cfg: RunConfig):
    """(model, prep) as the trainer builds them: seeded, the source loaded before the data."""
    torch.manual_seed(cfg.seed)
    source = load_init_source(store, cfg)
    prep = prepare(cfg, str(cifar_npz))
    return build_model(cfg, prep, source), prep


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---- config -----------------------------------------------------------------------------------------

def test_config_declares_init_fields_in_the_model_section():
    params = RunConfig.scalar_params()
    assert params["init_mode"].choices == ("finetune", "linear_probe", "crt")
    assert params["init_run"].default == "" and params["init_mode"].default == "finetune"
    assert {"init_run", "init_mode"} <= set(RunConfig.sections()["model"])
    cfg = RunConfig(init_run="abc", init_mode="crt").validated()
    assert "init-crt" in cfg.key_tricks()
    assert ["--init-run", "abc", "--init-mode", "crt"] == [f for f in cfg.to_flags() if "init" in f or f in ("abc", "crt")]


@pytest.mark.parametrize("changes, fragment", [
    ({"init_mode": "crt"}, "init_mode=crt needs an init_run"),
    ({"init_mode": "linear_probe", "init_run": ""}, "needs an init_run"),
    ({"init_run": "../runs/x"}, "init_run: invalid run id"),
    ({"init_run": "ok", "init_mode": "warm"}, "init_mode: 'warm' is not one of"),
])
def test_bad_init_configs_are_problems(changes, fragment):
    problems = RunConfig.problems(changes)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(ConfigError, match=fragment):
        RunConfig(**changes).validated()


def test_cli_flags_round_trip_init_fields():
    from cifar_core.cli import build_parser, config_from_args
    args = build_parser().parse_args(["train", "--init-run", "r1", "--init-mode", "linear_probe"])
    cfg = config_from_args(args)
    assert (cfg.init_run, cfg.init_mode) == ("r1", "linear_probe")


# ---- loading and freezing ------------------------------------------------------------------------------

def test_finetune_loads_exactly_the_source_weights(store, cifar_npz):
    cfg = tiny(seed=7, init_run=SOURCE, init_mode="finetune")  # another seed: another data init and head
    model, _ = built(store, cifar_npz, cfg)
    expected = source_weights(store)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k].cpu(), expected[k].cpu()) for k in expected)
    scratch, _ = built(store, cifar_npz, tiny(seed=7))
    # without the source the whitening (from this run's data) and the head would differ: the load won
    assert not torch.equal(scratch.state_dict()["whiten.weight"], expected["whiten.weight"])
    assert not torch.equal(scratch.state_dict()["head.weight"], expected["head.weight"])
    # fine-tuning trains what a fresh model trains (fastnet's whitening and BN scales stay frozen)
    assert trainable(model) == trainable(scratch) and "whiten.weight" not in trainable(model)
    assert len(trainable(model)) > 1


@pytest.mark.parametrize("mode", ["linear_probe", "crt"])
def test_frozen_modes_leave_only_the_head_trainable_and_norms_in_eval(store, cifar_npz, mode):
    cfg = tiny(seed=3, init_run=SOURCE, init_mode=mode)
    model, _ = built(store, cifar_npz, cfg)
    assert trainable(model) == {"head.weight"}
    optimized = [p for group in build_optimizer(cfg, model).param_groups for p in group["params"]]
    assert len(optimized) == 1 and optimized[0] is classifier_head(model).weight
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6
    for net in (model, copy.deepcopy(model)):  # the EMA's copy keeps the rule
        net.train()
        assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert classifier_head(net).training and net.training
    source_head = source_weights(store)["head.weight"]
    torch.manual_seed(cfg.seed)
    fresh_head = create_model(cfg.model, cfg.model_params).head.weight
    head = classifier_head(model).weight.detach().cpu()
    if mode == "crt":  # re-initialised: the head a fresh model of this seed starts with
        assert torch.equal(head, fresh_head) and not torch.equal(head, source_head)
    else:
        assert torch.equal(head, source_head)


@pytest.mark.parametrize("mode", ["linear_probe", "crt"])
def test_training_changes_the_head_only(store, cifar_npz, mode):
    """A real run with weight decay: every other weight and every BatchNorm statistic stays the source's."""
    run_id = f"frozen-{mode.replace('_', '-')}"
    record = train_run(tiny(seed=5, init_run=SOURCE, init_mode=mode, epochs=2), store, run_id=run_id,
                       data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    trained = read_checkpoint(record).data["model"]
    expected = source_weights(store)
    changed = {k for k in expected if not torch.equal(trained[k].cpu(), expected[k].cpu())}
    assert changed == {"head.weight"}
    assert any(k.endswith("running_var") for k in expected)  # the statistics were among those compared
    info = record.status()["init_from"]
    assert info["run_id"] == SOURCE and info["mode"] == mode and info["checkpoint"] == "last.pt"


def test_a_resumed_linear_probe_keeps_its_frozen_parts(store, cifar_npz):
    cfg = tiny(seed=2, init_run=SOURCE, init_mode="linear_probe", epochs=2)
    record = train_run(cfg, store, run_id="probe-resumed", data_source=str(cifar_npz), stop_at_step=1)
    assert record.state() == "cancelled"
    train_run(cfg, store, run_id="probe-resumed", data_source=str(cifar_npz), resume=True)
    assert record.state() == "completed", record.status()
    trained, expected = read_checkpoint(record).data["model"], source_weights(store)
    assert {k for k in expected if not torch.equal(trained[k].cpu(), expected[k].cpu())} == {"head.weight"}


# ---- bad sources ----------------------------------------------------------------------------------------

def test_unusable_sources_are_config_errors(store):
    store.create(tiny(), run_id="busy", state="running")
    store.create(tiny(), run_id="no-weights", state="completed")
    damaged = store.create(tiny(), run_id="damaged", state="completed")
    damaged.checkpoint_path("last").write_bytes(b"not a checkpoint")
    cases = [("nope", "no such run"), ("busy", "busy is running, not completed"),
             ("no-weights", "no-weights has no checkpoint")]
    for run_id, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            load_init_source(store, tiny(init_run=run_id, init_mode="crt"))
    with pytest.raises(ConfigError, match="damaged cannot be loaded.*unreadable"):
        load_init_source(store, tiny(init_run="damaged"))
    with pytest.raises(ConfigError, match="cannot start from its own weights"):
        check_init_run(store, tiny(init_run=SOURCE), run_id=SOURCE)


@pytest.mark.parametrize("changes, mine", [
    ({"model_params": {"width": 0.5}}, "but this run builds fastnet (width=0.5)"),  # only what differs
    ({"model": "lenet", "model_params": {}}, "this run builds lenet"),
])
def test_another_model_names_both(store, changes, mine):
    with pytest.raises(ConfigError) as err:
        load_init_source(store, tiny(init_run=SOURCE, **changes))
    message = str(err.value)
    source = "fastnet (width=0.25)" if "fastnet" in mine else "fastnet (channels1=64, channels2=256, channels3=256, whiten=True, width=0.25)"
    assert f"init_run src trained {source}" in message and mine in message


def test_dropout_may_differ(store):
    source = load_init_source(store, tiny(init_run=SOURCE, model_params={"width": 0.25, "dropout": 0.2}))
    assert source is not None and source.info["run_id"] == SOURCE


def test_a_bad_source_fails_the_run_before_the_data_loads(store, tmp_path):
    record = train_run(tiny(init_run="nope"), store, run_id="before-data", data_source=str(tmp_path / "no.npz"))
    status = record.status()
    assert status["state"] == "failed" and "init_run nope: no such run" in status["error"]
    assert "init_from" not in status


def test_candidates_say_which_runs_fit(store):
    candidates = {c["run_id"]: c for c in init_candidates(store, "fastnet", {"width": 0.5})}
    assert SOURCE in candidates and candidates[SOURCE]["fits"] is False
    assert "busy" not in candidates and "no-weights" not in candidates
    assert {c["run_id"]: c["fits"] for c in init_candidates(store, "fastnet", {"width": 0.25})}[SOURCE] is True
    assert {c["run_id"]: c["fits"] for c in init_candidates(store)}[SOURCE] is None


# ---- the cRT recipe and its command ---------------------------------------------------------------------

def test_crt_config_keeps_the_data_and_model(store):
    cfg = crt_config(store, SOURCE, epochs=2)
    source = store.record(SOURCE).config()
    same = ("model", "model_params", "subset", "per_class", "val_size", "test_size", "seed", "augment",
            "imbalance", "imbalance_params", "label_budget", "optimizer", "lr", "weight_decay")
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(source, k) for k in same}
    assert (cfg.init_run, cfg.init_mode, cfg.balance, cfg.epochs) == (SOURCE, "crt", "class_balanced_sampling", 2)
    assert cfg.schedule == "cosine" and cfg.ema_decay == 0 and cfg.lookahead_every == 0
    assert [crt_epochs(n) for n in (1, 10, 30, 200)] == [1, 1, 3, 10]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_crt_command_trains_a_run_that_notes_its_source(store, cifar_npz, capsys):
    root = str(store.root)
    code, out, err = run_cli(["--runs-root", root, "crt", SOURCE, "--epochs", "1", "--data", str(cifar_npz),
                              "--no-progress"], capsys)
    assert code == 0, err
    run_id = out.split(":")[0].removeprefix("run ")
    record = store.record(run_id)
    assert record.state() == "completed" and record.results()["test_images"] == 100
    assert record.status()["init_from"]["mode"] == "crt" and record.status()["init_from"]["run_id"] == SOURCE
    assert record.config().balance == "class_balanced_sampling"


def test_crt_command_errors_and_submit(store, cifar_npz, capsys, monkeypatch):
    import cifar_core.jobs as jobs
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    root = str(store.root)
    before = set(store.ids())
    for argv, fragment in ((["crt", "nope"], "not found"), (["crt", SOURCE, "--epochs", "0"], "epochs"),
                           (["crt", "../x"], "invalid run id"), (["crt", "busy"], "busy is running"),
                           (["train", "--init-run", "nope", "--model", "fastnet"], "init_run nope: no such run"),
                           (["submit", "--init-run", SOURCE, "--model", "lenet"], "this run builds lenet")):
        code, _, err = run_cli(["--runs-root", root, *argv], capsys)
        assert code == 2 and err.startswith("error: ") and fragment in err, (argv, err)
    assert set(store.ids()) == before  # nothing was created or queued
    code, out, _ = run_cli(["--runs-root", root, "crt", SOURCE, "--print-config"], capsys)
    assert code == 0 and json.loads(out)["init_mode"] == "crt"
    code, out, _ = run_cli(["--runs-root", root, "crt", SOURCE, "--submit", "--data", str(cifar_npz)], capsys)
    queued = store.record(out.strip())
    assert code == 0 and queued.state() == "queued" and queued.config().init_run == SOURCE


# ---- the Train page -------------------------------------------------------------------------------------

def test_train_page_picker_fills_init_run_and_checks_the_model(store, cifar_npz, monkeypatch):
    from streamlit.testing.v1 import AppTest

    page = str(Path(__file__).resolve().parents[1] / "app_pages" / "1_Train.py")
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(store.root))
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    at = AppTest.from_file(page, default_timeout=240)
    at.query_params["preset"] = "tiny (smoke test)"  # fastnet at width 0.5; the source has 0.25
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="train.init_pick")
    assert picker.options[0] == "none: random initialisation"
    assert f"{SOURCE} · fastnet · test" in next(o for o in picker.options if o.startswith(SOURCE))
    assert "another model" in next(o for o in picker.options if o.startswith(SOURCE))
    picker.set_value(SOURCE).run()
    assert at.text_input(key="train.form.init_run").value == SOURCE
    assert at.selectbox(key="train.form.init_mode").value == "finetune"
    errors = [e.value for e in at.error]
    assert any(f"init_run {SOURCE} trained fastnet (width=0.25)" in e and "width=0.5" in e
               for e in errors), errors
    at.number_input(key="train.form.model_params.fastnet.width").set_value(0.25).run()
    assert not any("init_run" in e.value for e in at.error), [e.value for e in at.error]
    assert "another model" not in next(o for o in at.selectbox(key="train.init_pick").options if o.startswith(SOURCE))
