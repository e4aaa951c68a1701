"""The trick search: its space from the declarations, its checks, and real trials as queued runs."""
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.experiments import search
from cifar_core.experiments.presets import preset
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore
from tests.streamlit_server import free_port
from tests.test_jobs import stop_worker

TINY = "tiny (smoke test)"


def base(**changes) -> RunConfig:
    return RunConfig.from_dict({**preset(TINY), **changes})


def test_searchable_names_come_from_the_declarations():
    names = search.searchable(base())
    assert names["lr"] is RunConfig.scalar_params()["lr"]
    assert names["model_params.dropout"].high == 0.9 or names["model_params.dropout"].kind == "float"
    assert names["schedule"].kind == "choice" and "cosine" in names["schedule"].choices
    assert {"augment.rotation", "augment.rotation.p", "augment.rotation.degrees"} <= set(names)
    assert not {"val_size", "seed", "subset_size", "name", "teacher_run"} & set(names)
    # a registry's options follow the fixed entry: resnet18 has a norm option, the fast net does not
    assert "model_params.norm" in search.searchable(base(model="resnet18", model_params={}))
    assert "model_params.norm" not in names


def test_a_space_narrows_the_declared_ranges_and_defaults_to_them():
    dims = {d.name: d for d in search.parse_space(
        {"lr": {"low": 0.01, "high": 1, "log": True}, "label_smoothing": {}, "optimizer": {"choices": ["sgd", "adamw"]},
         "augment.hflip": True, "batch_size": {"low": 32, "high": 256}}, base())}
    assert (dims["lr"].low, dims["lr"].high, dims["lr"].log) == (0.01, 1.0, True)
    assert (dims["label_smoothing"].low, dims["label_smoothing"].high) == (0.0, 0.5)  # the declared range
    assert dims["optimizer"].choices == ("sgd", "adamw")
    assert dims["augment.hflip"].choices == (False, True)
    assert dims["batch_size"].kind == "int"


@pytest.mark.parametrize("space, message", [
    ({}, "it is empty"),
    ({"learning_rate": {}}, "unknown field 'learning_rate'"),
    ({"val_size": {}}, "val_size cannot be searched"),
    ({"lr": {"low": 0.01, "high": 100}}, "above the maximum 10"),
    ({"lr": {"low": 0.5, "high": 0.1}}, "low 0.5 must be below high 0.1"),
    ({"weight_decay": {"low": 0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
    ({"optimizer": {"choices": ["sgd"]}}, "one choice"),
    ({"optimizer": {"choices": ["sgd", "lion"]}}, "'lion' is not one of"),
    ({"lr": {"choices": [0.1, 0.2]}}, "give low/high/log"),
    ({"clip_value": {}}, "clip_value has no effect unless grad_clip is value"),
    ({"model": {}, "model_params.dropout": {}}, "model is searched too"),
    ({"augment.rotation.degrees": {}}, "has no rotation step"),
    ({"model_params.norm": {}}, "the fixed model 'fastnet' has no option 'norm'"),
])
def test_bad_spaces_are_refused_before_anything_starts(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search.parse_space(space, base())


def test_every_problem_of_a_space_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        search.parse_space({"val_size": {}, "weight_decay": {"low": 0, "high": 0.1, "log": True}}, base())
    assert "val_size cannot be searched" in str(err.value) and "log range needs low > 0" in str(err.value)
    assert len(err.value.problems) == 2  # one message each, for the page


def test_a_contradiction_is_lifted_when_its_controller_is_searched_too():
    dims = search.parse_space({"clip_value": {}, "grad_clip": {"choices": ["none", "value"]}}, base())
    assert [d.name for d in dims] == ["clip_value", "grad_clip"]


def test_sampled_values_become_a_validated_config():
    cfg = search.apply_values(base(), {"lr": 0.3, "model_params.dropout": 0.2, "augment.hflip": False,
                                       "augment.rotation": True, "augment.rotation.degrees": 12.0,
                                       "augment.rotation.p": 0.25, "optimizer": "adamw"})
    assert cfg.lr == 0.3 and cfg.optimizer == "adamw" and cfg.model_params["dropout"] == 0.2
    names = [step["name"] for step in cfg.augment]
    assert "hflip" not in names and names[-1] == "rotation"
    assert cfg.augment[-1]["params"]["degrees"] == 12.0 and cfg.augment[-1]["p"] == 0.25
    switched = search.apply_values(base(), {"schedule": "cosine"})  # the tiny preset's is onecycle
    assert switched.schedule == "cosine" and switched.schedule_params == {"warmup_epochs": 0.0, "final_factor": 0.0}
    with pytest.raises(ConfigError):  # a combination the config refuses stays a ConfigError (a failed trial)
        search.apply_values(base(), {"precision": "fp16", "device": "cpu"})


def test_a_search_needs_a_validation_split():
    with pytest.raises(ConfigError, match="set val_size"):
        search.SearchSpec(base=base(val_size=0).to_dict(), space={"lr": {}}).validated()


def test_a_study_name_that_exists_with_another_space_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = search.SearchSpec(base=base().to_dict(), space={"lr": {"low": 0.01, "high": 1}}, trials=3)
    search.create_search("s1", spec, storage)
    with pytest.raises(ConfigError, match="already exists .* with another space"):
        search.create_search("s1", search.SearchSpec(base=base().to_dict(), space={"label_smoothing": {}}), storage)
    with pytest.raises(ConfigError, match="with another fixed config"):
        search.create_search("s1", search.SearchSpec(base=base(epochs=2).to_dict(), space=spec.space), storage)
    search.create_search("s1", search.SearchSpec(base=base().to_dict(), space=spec.space, trials=7), storage)
    assert search.load_search("s1", storage)[1].trials == 7  # the same search goes on with a new budget


def test_an_unreachable_database_is_a_clear_message():
    with pytest.raises(ConfigError, match=r"cannot open the search storage postgresql\+psycopg2://lab:\*\*\*@127.0.0.1:1/"):
        search.open_storage("postgresql+psycopg2://lab:secret@127.0.0.1:1/studies")
    with pytest.raises(ConfigError, match="cannot open the search storage"):
        search.open_storage("nosuchdb://x/y")


def test_budget_time_and_stop(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = search.SearchSpec(base=base().to_dict(), space={"lr": {}}, trials=2, time_budget_min=1.0).validated()
    search.create_search("b", spec, storage)
    study, spec = search.load_search("b", storage)
    assert search.budget_left(study, spec) is None
    study.set_user_attr("started", 1.0)  # started long ago
    assert "time budget of 1 min spent" in search.budget_left(study, spec)
    search.stop_search("b", storage)
    assert search.budget_left(search.load_search("b", storage)[0], spec) == "stopped from the page"


@pytest.fixture
def runs(tmp_path, cifar_npz, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setenv("CIFAR_LAB_WORKER_IDLE", "3")
    monkeypatch.setenv("CIFAR_LAB_CANCEL_GRACE", "5")
    store = RunStore(tmp_path / "runs")
    yield store
    stop_worker(store)


def test_real_trials_are_queued_runs_pruned_through_the_cancel_path(runs, monkeypatch):
    """Three tiny trials on one worker: each an ordinary run tagged with its trial; the pruner's verdict
    (forced for trial 2 here, the sampled values decide otherwise) cancels the run and marks it pruned."""
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: trial.number == 2)
    monkeypatch.setattr(search, "POLL_SECONDS", 0.1)  # the cancel reaches the run long before its 3rd epoch
    spec = search.SearchSpec(base=base(epochs=3, per_class=60).to_dict(), space={"lr": {"low": 0.05, "high": 0.5, "log": True},
                                                                   "augment.hflip": {}},
                             trials=3, pruner="median")
    storage = search.start_search("real", spec, runs)
    assert search.list_searches(runs)[0]["study"] == "real"
    assert search.SearchWorker(runs, "real", storage, log=lambda _: None).run() == "3 trials reached"

    study, spec = search.load_search("real", storage)
    frame = search.trials_frame(study)
    assert list(frame["trial"]) == [0, 1, 2]
    assert list(frame["state"]) == ["complete", "complete", "pruned"]
    for trial in study.trials:
        status = runs.record(trial.user_attrs["run_id"]).status()
        assert (status["search"], status["trial"]) == ("real", trial.number)
        evals = [r for r in runs.record(trial.user_attrs["run_id"]).read_metrics() if r["kind"] == "eval"]
        if trial.state.name == "COMPLETE":
            assert status["state"] == "completed" and trial.value == pytest.approx(evals[-1]["val_acc"])
            assert sorted(trial.intermediate_values) == [1, 2, 3]
        else:
            assert status["state"] == "cancelled" and status["pruned"]["trial"] == 2
    curves = search.curves_frame(study)
    assert set(curves["state"]) == {"complete", "pruned"}
    best = search.best_config(study, epochs=5, train_on_validation=True)
    assert best.epochs == 5 and best.val_size == 0
    assert best.lr == study.best_trial.params["lr"]
    assert b"param lr" in search.trials_csv(study)
    report = search.summary(study, spec)
    assert report["trials"] == {"complete": 2, "pruned": 1} and report["best"]["trial"] == study.best_trial.number
    assert report["budget"]["finished"]  # the elapsed time stops at the end
    created = search.read_manifest(runs, "real")["created"]
    search.start_search("real", search.SearchSpec(**{**spec.to_dict(), "trials": 4}), runs)  # continue it
    assert search.read_manifest(runs, "real")["created"] == created  # same place in the newest-first list
    assert search.summary(*search.load_search("real", storage))["budget"]["finished"] is None


def test_cli_messages_for_bad_input(tmp_path, capsys, cifar_npz):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"low": 0, "high": 1, "log": True}}))
    assert main(["--runs-root", str(tmp_path), "search", "--space", str(space), "--preset", TINY,
                 "--data", str(cifar_npz)]) == 2
    assert "space.lr: 0.0 is below the minimum" in capsys.readouterr().err
    space.write_text("{not json")
    assert main(["--runs-root", str(tmp_path), "search", "--space", str(space), "--preset", TINY]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["--runs-root", str(tmp_path), "search-worker", "--study", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["--runs-root", str(tmp_path), "search-worker", "--study", "../etc"]) == 2
    assert "invalid study name" in capsys.readouterr().err
    assert main(["describe"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert {e["name"] for e in described["search_pruners"]} >= {"median", "successive_halving"}
    assert {"coreset", "badge", "typiclust"} <= {e["name"] for e in described["query_strategies"]}


def test_the_storage_opens_in_optuna_dashboard_as_it_is(tmp_path):
    """README: `optuna-dashboard sqlite:///runs/.searches/STUDY.db` shows the study, with no export step."""
    storage = f"sqlite:///{tmp_path / 'd.db'}"
    search.create_search("dash", search.SearchSpec(base=base().to_dict(), space={"lr": {}}), storage)
    port = free_port()
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([exe, storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = None, time.time() + 60
        while body is None and time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
            except OSError:
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == ["dash"]
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_worker_retries_the_trials_of_a_dead_one(runs, monkeypatch):
    """A worker died with the whole budget RUNNING: a new worker must fail and retry those trials (once
    their heartbeat is stale), not exit at once with 'trials reached' and leave them running forever."""
    monkeypatch.setattr(search, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(search, "HEARTBEAT_GRACE", 2)
    spec = search.SearchSpec(base=base().to_dict(), space={"lr": {"low": 0.05, "high": 0.5}}, trials=2, pruner="none")
    storage = search.start_search("dead", spec, runs)
    study = optuna.load_study(study_name="dead", storage=search.open_storage(storage))
    for _ in range(2):  # the dead worker's two trials, with one heartbeat each
        trial = study.ask()
        study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    assert search.SearchWorker(runs, "dead", storage, log=lambda _: None).run() == "2 trials reached"
    states = [t.state.name for t in optuna.load_study(study_name="dead", storage=storage).trials]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]


def test_stop_now_cancels_the_running_trials_runs_of_this_folder(runs):
    from cifar_core import jobs
    storage = search.start_search("halt", search.SearchSpec(base=base().to_dict(), space={"lr": {}}), runs)
    study = optuna.load_study(study_name="halt", storage=storage)
    trial = study.ask()
    record = jobs.submit(base(epochs=500), runs, start_worker=False, meta={"search": "halt", "trial": 0})
    trial.set_user_attr("run_id", record.run_id)
    other = jobs.submit(base(), runs, start_worker=False)  # not the search's: untouched
    assert search.stop_search("halt", storage) == []  # a plain stop lets running trials finish
    assert record.state() == "queued"
    assert search.stop_search("halt", storage, cancel_running_in=runs) == [record.run_id]
    assert record.state() == "cancelled" and other.state() == "queued"
    assert search.budget_left(*search.load_search("halt", storage)) == "stopped from the page"


def test_trial_0_is_the_fixed_config_itself_when_it_lies_in_the_space(tmp_path):
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    space = {"lr": {"low": 0.05, "high": 0.5, "log": True}, "augment.hflip": {}, "augment.rotation.degrees": {},
             "augment.rotation": {}, "model_params.dropout": {}}
    search.create_search("base", search.SearchSpec(base=base().to_dict(), space=space), storage)
    first = optuna.load_study(study_name="base", storage=storage).trials[0]
    assert first.state.name == "WAITING" and first.user_attrs["baseline"]
    assert first.system_attrs["fixed_params"] == {"lr": base().lr, "augment.hflip": True, "augment.rotation": False,
                            "augment.rotation.degrees": 15.0, "model_params.dropout": 0.0}
    narrowed = {"lr": {"low": 0.3, "high": 0.5}}  # the fixed lr (0.2) is outside: no baseline trial
    search.create_search("nobase", search.SearchSpec(base=base().to_dict(), space=narrowed), storage)
    assert optuna.load_study(study_name="nobase", storage=storage).trials == []


def test_a_trial_whose_run_finishes_before_the_pruners_cancel_counts_as_complete(runs, monkeypatch):
    """The pruner stops trial 1, but its run completes before the cancel reaches it (here the cancel is
    lost on purpose): the trial is complete with its final value, and its run is not marked pruned."""
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: trial.number == 1)
    monkeypatch.setattr(search, "cancel", lambda run_id, store: "cancelling")
    monkeypatch.setattr(search, "POLL_SECONDS", 0.1)
    spec = search.SearchSpec(base=base(epochs=2).to_dict(), space={"lr": {"low": 0.05, "high": 0.5, "log": True}},
                             trials=2, pruner="median")
    storage = search.start_search("late", spec, runs)
    assert search.SearchWorker(runs, "late", storage, log=lambda _: None).run() == "2 trials reached"
    study, _ = search.load_search("late", storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    status = runs.record(study.trials[1].user_attrs["run_id"]).status()
    assert status["state"] == "completed" and not status.get("pruned")


def test_a_conditional_dimension_is_drawn_only_where_it_has_an_effect():
    import optuna
    dims = search.parse_space({"muon_lr": {"low": 0.1, "high": 0.5}, "optimizer": {"choices": ["sgd", "muon"]},
                               "lr": {"low": 0.1, "high": 1.0}}, base())
    # FixedTrial raises for a parameter it was not given: sgd must not ask for muon_lr
    assert search.sample_values(optuna.trial.FixedTrial({"optimizer": "sgd", "lr": 0.2}), dims, base()) == \
        {"optimizer": "sgd", "lr": 0.2}
    assert search.sample_values(optuna.trial.FixedTrial({"optimizer": "muon", "lr": 0.2, "muon_lr": 0.3}), dims,
                                base()) == {"optimizer": "muon", "lr": 0.2, "muon_lr": 0.3}
    fixed_muon = base().replace(optimizer="muon")  # controller fixed, not searched: its fixed value decides
    only_muon_lr = search.parse_space({"muon_lr": {"low": 0.1, "high": 0.5}}, fixed_muon)
    assert search.sample_values(optuna.trial.FixedTrial({"muon_lr": 0.2}), only_muon_lr, fixed_muon) == {"muon_lr": 0.2}
