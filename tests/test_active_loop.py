"""The active-learning loop (cifar_core.experiments.active_loop) on tiny real rounds: a lenet trained for
one epoch on a few dozen labels of a 300-image pool, each round's run queued in the real job queue and
trained in this process (as the supervisor would, with `train --resume`); the label sets a run trains on
(RunConfig.label_set); restarts in the middle; a person's labels, their checks and their agreement with
CIFAR-10's; damaged files; the learning curves grouped over seeds; the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cifar_core import jobs
from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.data import CLASSES
from cifar_core.engine import train_run
from cifar_core.engine.prepare import prepare, run_split
from cifar_core.experiments import active_loop as al
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore, atomic_write_json

ROUND = {"model": "lenet", "subset": "per_class", "per_class": 30, "val_size": 0, "test_size": 100, "epochs": 1,
         "eval_every": 1, "batch_size": 20, "augment": [], "device": "cpu", "log_every": 1}


def spec(**changes) -> al.LoopSpec:
    return al.LoopSpec(**{"base": dict(ROUND), "strategy": "margin", "initial": 20, "per_round": 20, "rounds": 2,
                          "seed": 3, **changes})


@pytest.fixture
def store(tmp_path, cifar_npz, monkeypatch) -> RunStore:
    """A runs folder whose queued runs are never started by a supervisor: `train_queued` trains them here."""
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)
    return RunStore(tmp_path / "runs")


def train_queued(store: RunStore, data) -> list[str]:
    """Train every queued run to its end in this process, as the supervisor's `train --resume ID` would."""
    trained = []
    for record in store.records():
        if record.state() == "queued":
            train_run(record.config(), store, run_id=record.run_id, data_source=str(data), resume=True)
            trained.append(record.run_id)
    return trained


def run_to_end(store: RunStore, loop_id: str, data, max_ticks: int = 20) -> str:
    state = al.tick(store, loop_id)
    for _ in range(max_ticks):
        if state not in al.BUSY_STATES:
            return state
        train_queued(store, data)
        state = al.tick(store, loop_id)
    raise AssertionError(f"the loop did not settle: {state}")


def label_set(store, loop_id, k, n_train=50000) -> al.LabelSet:
    return al.read_round(store, loop_id, k, n_train)


# ---- an oracle loop ------------------------------------------------------------------------------------

def test_an_oracle_loop_grows_its_labels_by_the_batches_its_strategy_picks(store, cifar_npz, cifar):
    loop = al.start_loop("oracle", spec(), store)
    assert al.tick(store, "oracle") == al.TRAINING
    (first,) = store.records()
    status = first.status()
    assert (status["state"], status["active_loop"], status["active_round"]) == ("queued", "oracle", 0)
    assert first.config().label_set == "oracle/0" and first.config().seed == 3
    assert run_to_end(store, "oracle", cifar_npz) == al.COMPLETED

    pool = al.training_pool(loop.spec, cifar.y_train)
    round0, round1 = label_set(store, "oracle", 0), label_set(store, "oracle", 1)
    assert len(round0.indices) == 20 and np.bincount(cifar.y_train[round0.indices], minlength=10).tolist() == [2] * 10
    query = al.read_query(store, "oracle", 0)
    picked = np.array(query["indices"])
    assert len(picked) == 20 and len(set(picked.tolist())) == 20  # no image picked twice
    assert set(picked.tolist()) <= set(pool.tolist()) - set(round0.indices.tolist())  # from the unlabeled pool
    assert query["scores"] == sorted(query["scores"], reverse=True)  # margin: most wanted first
    np.testing.assert_array_equal(round1.indices, np.concatenate([round0.indices, picked]))
    np.testing.assert_array_equal(round1.labels, cifar.y_train[round1.indices])  # the oracle: CIFAR-10's labels
    assert round1.sources == ["initial"] * 20 + ["oracle"] * 20 and round1.added == [0] * 20 + [1] * 20

    finished = al.read_loop(store, "oracle")
    assert [row["labels"] for row in finished.curve()] == [20, 40]
    for k, row in enumerate(finished.curve()):
        record = store.record(row["run_id"])
        assert row["test_acc"] == record.results()["test_acc"] and record.status()["active_round"] == k
        # the run trained on exactly its round's label set; the rest of the pool unlabeled
        split = run_split(record.config(), cifar.y_train, store)
        assert set(split.labeled_idx.tolist()) == set(label_set(store, "oracle", k).indices.tolist())
        assert len(split.unlabeled_idx) == len(pool) - row["labels"]
    assert len(store.ids()) == 2
    assert al.tick(store, "oracle") == al.COMPLETED and len(store.ids()) == 2  # done: nothing more


def test_a_restart_in_the_middle_repeats_no_round(store, cifar_npz, monkeypatch):
    al.start_loop("restart", spec(strategy="coreset", rounds=3, per_round=10), store)
    al.tick(store, "restart")
    (run0,) = store.ids()
    # the worker died between queuing round 0's run and noting it: the next tick finds the run by its tags
    al.update_loop(store, "restart", (0, {"run_id": None}))
    assert al.tick(store, "restart") == al.TRAINING and store.ids() == [run0]
    assert al.read_loop(store, "restart").rounds[0]["run_id"] == run0
    train_queued(store, cifar_npz)
    assert al.tick(store, "restart") == al.TRAINING  # round 0 noted, its batch picked, round 1 queued
    query0 = al.query_path(store, "restart", 0).read_bytes()
    round1 = al.round_path(store, "restart", 1).read_bytes()
    for _ in range(3):  # a restarted worker ticks again and again while round 1 waits in the queue
        assert al.tick(store, "restart") == al.TRAINING
    assert len(store.ids()) == 2
    assert al.query_path(store, "restart", 0).read_bytes() == query0
    assert al.round_path(store, "restart", 1).read_bytes() == round1
    # a worker process ticks it to the end (each round's run trained as soon as it is queued)
    real_submit = al.submit

    def submit_and_train(cfg, store, **kwargs):
        record = real_submit(cfg, store, **kwargs)
        train_run(cfg, store, run_id=record.run_id, data_source=str(cifar_npz), resume=True)
        return record

    train_queued(store, cifar_npz)
    monkeypatch.setattr(al, "submit", submit_and_train)
    lines: list[str] = []
    assert al.run_worker(store, "restart", log=lines.append, poll=0.01) == al.COMPLETED
    finished = al.read_loop(store, "restart")
    assert [row["labels"] for row in finished.curve()] == [20, 30, 40]
    assert len(store.ids()) == 3 and len({row["run_id"] for row in finished.curve()}) == 3
    assert lines[-1] == "loop restart: completed" and lines[-2].startswith("round 2: 40 labels")
    assert not al.worker_alive(store, "restart")


def test_stop_cancels_the_round_and_resume_trains_it_anew(store):
    al.start_loop("stopper", spec(), store)
    al.tick(store, "stopper")
    (run0,) = store.ids()
    with jobs.file_lock(al.worker_lock_path(store, "stopper")):  # a worker runs it: no second one
        assert al.worker_alive(store, "stopper")
        assert al.run_worker(store, "stopper") == "another worker runs this loop"
    assert al.stop_loop(store, "stopper") == [run0]
    assert store.record(run0).state() == "cancelled"
    assert al.tick(store, "stopper") == al.STOPPED and store.ids() == [run0]
    al.resume_loop(store, "stopper")
    assert al.tick(store, "stopper") == al.TRAINING
    (run0_again,) = set(store.ids()) - {run0}
    assert store.record(run0).status()["active_retired"] is True
    assert al.read_loop(store, "stopper").rounds[0]["run_id"] == run0_again
    assert store.record(run0_again).status()["active_round"] == 0


# ---- a human loop ----------------------------------------------------------------------------------------

def test_a_person_labels_the_picked_images_and_the_next_round_learns_their_labels(store, cifar_npz, cifar):
    al.start_loop("human", spec(strategy="random", per_round=10, labeller="human"), store)
    assert run_to_end(store, "human", cifar_npz) == al.AWAITING
    assert al.tick(store, "human") == al.AWAITING and len(store.ids()) == 1  # waits: no next round yet
    batch = al.queried_images(store, "human")
    assert batch.round == 0 and len(batch.indices) == 10
    assert batch.images.shape == (10, 32, 32, 3) and batch.images.dtype == np.uint8
    np.testing.assert_array_equal(batch.images, cifar.x_train[batch.indices])
    truth = {int(i): int(t) for i, t in zip(batch.indices, cifar.y_train[batch.indices])}
    first = next(iter(truth))

    def refused(labels, message):
        with pytest.raises(ConfigError, match=message):
            al.submit_labels(store, "human", labels)

    refused({i: t for i, t in list(truth.items())[:9]}, "1 of the 10 queried images have no label")
    refused({**truth, first: 10}, "label 10 is not a class")
    refused({**truth, first: True}, "label True is not a class")
    labeled = int(label_set(store, "human", 0).indices[0])
    refused({**truth, labeled: 0}, f"training image {labeled} was not queried")
    refused([*truth.items(), (first, 1)], f"training image {first} is labelled twice")
    refused("cat", "give {training image: class}")
    assert al.read_query(store, "human", 0)["labels"] is None  # nothing was written

    given = dict(truth)
    wrong = list(truth)[:3]
    for index in wrong:  # the person disagrees with CIFAR-10 on three images
        given[index] = (truth[index] + 1) % 10
    given[list(truth)[3]] = CLASSES[truth[list(truth)[3]]]  # a class name is a label too
    al.submit_labels(store, "human", {str(i): c for i, c in given.items()})  # JSON keys are text
    refused(truth, "awaits no labels")  # a batch is labelled once

    agreement = al.agreement(store, "human")
    assert agreement["images"] == 10 and agreement["agreement"] == pytest.approx(0.7)
    assert agreement["per_round"] == {0: pytest.approx(0.7)}
    matrix = np.array(agreement["confusion"])
    assert matrix.sum() == 10 and np.trace(matrix) == 7
    for index in wrong:
        assert matrix[truth[index], (truth[index] + 1) % 10] >= 1
    assert sorted(r["index"] for r in agreement["rows"] if not r["agree"]) == sorted(wrong)

    assert run_to_end(store, "human", cifar_npz) == al.COMPLETED
    round1 = label_set(store, "human", 1)
    assert round1.sources[-10:] == ["human"] * 10
    human_labels = dict(zip(round1.indices[-10:].tolist(), round1.labels[-10:].tolist()))
    assert all(human_labels[i] == (truth[i] + 1) % 10 for i in wrong)
    # the round-1 run learns the person's labels, not CIFAR-10's
    run1 = store.record(al.read_loop(store, "human").rounds[1]["run_id"])
    prep = prepare(run1.config(), str(cifar_npz), store)
    learned = dict(zip(run_split(run1.config(), cifar.y_train, store).labeled_idx.tolist(),
                       prep.train_y.cpu().tolist()))
    assert all(learned[i] == human_labels[i] for i in human_labels)


# ---- damaged or missing files, bad definitions ---------------------------------------------------------------

def test_damaged_files_and_bad_definitions_are_clear_errors(store, cifar_npz, cifar, capsys):
    al.start_loop("broken", spec(), store)
    al.manifest_path(store, "broken").write_text("{not json")
    for action in (lambda: al.read_loop(store, "broken"), lambda: al.tick(store, "broken")):
        with pytest.raises(ConfigError, match=r"active-learning loop broken: its manifest .* is damaged"):
            action()
    assert main(["--runs-root", str(store.root), "active-report", "--loop", "broken"]) == 2
    assert "is damaged" in capsys.readouterr().err
    loops, problems = al.list_loops(store)
    assert loops == [] and "is damaged" in problems["broken"]
    with pytest.raises(ConfigError, match="no active-learning loop 'nothing'"):
        al.read_loop(store, "nothing")

    cfg = RunConfig.from_dict({**ROUND, "label_set": "someloop/0"})
    with pytest.raises(ConfigError, match="label_set someloop/0: no label set file"):
        run_split(cfg, cifar.y_train, store)
    path = al.round_path(store, "someloop", 0)
    for content, message in (("[1, 2]", "holds a JSON list"), (json.dumps({"indices": [1, 2], "labels": [0]}),
                                                                "2 indices but 1 labels"),
                             (json.dumps({"indices": [1, 1], "labels": [0, 0]}), "an image is listed twice"),
                             (json.dumps({"indices": [1], "labels": [12]}), "a label outside the classes"),
                             (json.dumps({"indices": [1.5], "labels": [0]}), "lists of whole numbers")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            run_split(cfg, cifar.y_train, store)
    atomic_write_json(path, {"indices": [int(np.flatnonzero(cifar.y_train == 0)[-1])], "labels": [0]})
    with pytest.raises(ConfigError, match="not in this run's training pool"):  # per_class 30 never takes it...
        run_split(cfg.replace(per_class=1), cifar.y_train, store)

    for bad, message in (({"label_set": "../1"}, "invalid active-learning loop id"),
                         ({"label_set": "loop/one"}, "expected LOOP/ROUND"),
                         ({"label_set": "loop/1", "label_budget": 20}, "set label_budget to 0")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            RunConfig.from_dict({**ROUND, **bad})
    for changes, message in (({"initial": 25}, "multiple of 10"), ({"strategy": "psychic"}, "unknown query strategy"),
                             ({"base": {**ROUND, "label_budget": 20}}, "the loop decides"),
                             ({"labeller": "crowd"}, "'crowd' is not one of"),
                             ({"rounds": 30}, "but the training pool holds 300")):
        with pytest.raises(ConfigError, match=message):
            al.start_loop("bad", spec(**changes), store)
    al.start_loop("twice", spec(), store)
    al.start_loop("twice", spec(), store)  # the same definition continues it
    with pytest.raises(ConfigError, match="already exists with another definition"):
        al.start_loop("twice", spec(seed=4), store)


# ---- curves and the command line ----------------------------------------------------------------------------

def fake_loop(loop_id: str, accuracies: list[float], **changes) -> al.Loop:
    loop_spec = spec(rounds=len(accuracies), **changes).validated()
    rounds = {k: {"round": k, "labels": loop_spec.labels_at(k), "test_acc": acc, "run_id": f"{loop_id}-{k}"}
              for k, acc in enumerate(accuracies)}
    return al.Loop(loop_id, loop_spec, 0.0, rounds=rounds)


def test_learning_curves_are_mean_and_std_over_loops_that_differ_only_by_seed():
    loops = [fake_loop("m1", [0.2, 0.4], seed=1), fake_loop("m2", [0.3, 0.6], seed=2),
             fake_loop("r1", [0.25, 0.35], strategy="random"), fake_loop("e1", [0.1], strategy="entropy")]
    rows = {(r["group"], r["labels"]): r for r in al.strategy_curves(loops)}
    assert set(rows) == {("margin", 20), ("margin", 40), ("random", 20), ("random", 40), ("entropy", 20)}
    assert rows[("margin", 40)]["mean"] == pytest.approx(0.5) and rows[("margin", 40)]["n"] == 2
    assert rows[("margin", 40)]["std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert rows[("random", 20)]["std"] is None and rows[("margin", 20)]["loops"] == ["m1", "m2"]
    # another per-round config is another group, even with the same strategy
    other = fake_loop("m3", [0.5], base={**ROUND, "epochs": 2})
    groups = {r["group"] for r in al.strategy_curves([*loops, other])}
    assert {"margin", "margin #2"} <= groups


def test_the_cli_runs_a_loop_and_reports_its_curve(store, cifar_npz, capsys, monkeypatch):
    real_submit = al.submit

    def submit_and_train(cfg, store, **kwargs):  # the queue's supervisor, in this process
        record = real_submit(cfg, store, **kwargs)
        train_run(cfg, store, run_id=record.run_id, data_source=str(cifar_npz), resume=True)
        return record

    monkeypatch.setattr(al, "submit", submit_and_train)
    root = str(store.root)
    flags = ["--model", "lenet", "--subset", "per_class", "--per-class", "30", "--test-size", "100", "--epochs", "1",
             "--batch-size", "20", "--augment", "none", "--device", "cpu", "--seed", "5"]
    assert main(["--runs-root", root, "active", "--loop", "cli", "--strategy", "entropy", "--initial", "10",
                 "--per-round", "10", "--rounds", "2", *flags]) == 0
    out = capsys.readouterr().out
    assert "active worker done: completed" in out
    loop = al.read_loop(store, "cli")
    assert (loop.spec.strategy, loop.spec.seed, loop.spec.base["model"], loop.spec.base["epochs"]) == ("entropy", 5,
                                                                                                       "lenet", 1)
    assert main(["--runs-root", root, "active-report", "--loop", "cli", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "completed" and [r["labels"] for r in report["curve"]] == [10, 20]
    assert main(["--runs-root", root, "active-report", "--loop", "cli"]) == 0
    assert "    1       20" in capsys.readouterr().out
    assert main(["--runs-root", root, "active", "--loop", "cli2", "--initial", "15", *flags]) == 2
    assert "multiple of 10" in capsys.readouterr().err
