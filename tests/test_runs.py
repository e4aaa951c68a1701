import json

import pytest

from cifar_core.config import RunConfig
from cifar_core.params import ConfigError
from cifar_core.runs import MetricsReader, RunStore, new_run_id, validate_run_id


def test_run_ids_are_validated_and_contained(tmp_path):
    store = RunStore(tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200, "a b", "..", "/abs"):
        with pytest.raises(ConfigError):
            store.record(bad)
    assert validate_run_id(new_run_id("My run: ResNet/18!"))


def test_create_status_and_delete(tmp_path):
    store = RunStore(tmp_path / "runs")
    rec = store.create(RunConfig(epochs=1).validated())
    assert rec.state() == "queued"
    assert RunConfig.from_dict(rec.config_dict()).epochs == 1
    rec.update_status(state="running", pid=123)
    assert rec.status()["pid"] == 123
    assert store.ids() == [rec.run_id]
    store.delete(rec.run_id)
    assert store.ids() == []
    with pytest.raises(ConfigError):
        store.delete(rec.run_id)


def test_metrics_reader_is_incremental_and_tolerates_partial_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read_new() == []
    with open(path, "w") as fh:
        fh.write(json.dumps({"step": 1}) + "\n" + '{"step": 2, "tr')   # second line half written
    assert [r["step"] for r in reader.read_new()] == [1]
    with open(path, "a") as fh:
        fh.write('ain_loss": 1.0}\n' + "garbage line\n" + json.dumps({"step": 3}) + "\n")
    assert [r["step"] for r in reader.read_new()] == [2, 3]
    assert reader.bad_lines == 1
    assert [r["step"] for r in reader.rows] == [1, 2, 3]
    path.write_text(json.dumps({"step": 9}) + "\n")     # replaced by a shorter file
    reader.read_new()
    assert [r["step"] for r in reader.rows] == [9]


@pytest.mark.parametrize("damage", ["[1]", '"hello"', "{not json", b"\xff\xfe"])
def test_a_malformed_record_is_listed_unreadable_and_stops_nothing(tmp_path, damage, capsys):
    from cifar_core import jobs
    from cifar_core.cli import main
    from cifar_core.config import RunConfig
    store = RunStore(tmp_path)
    good = store.create(RunConfig(model="lenet"), run_id="good-run", state="completed")
    good.update_status(test_acc=0.5)
    bad_status = store.create(RunConfig(model="lenet"), run_id="bad-status", state="running")
    bad_config = store.create(RunConfig(model="lenet"), run_id="bad-config", state="completed")
    for path in (bad_status.status_path, bad_config.config_path):
        path.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    assert bad_status.status()["state"] == "unreadable" and "status.json" in bad_status.problem()
    assert bad_config.config_dict() is None and "config.json" in bad_config.problem()
    jobs.reconcile(store)  # crashed with AttributeError on every pass before
    assert jobs.Supervisor(store).tick() is False  # a whole supervisor pass goes through
    assert main(["--runs-root", str(tmp_path), "runs"]) == 0
    out = capsys.readouterr().out
    assert "good-run" in out and "50.00%" in out
    assert out.count("unreadable") >= 2 and "bad-status: status.json" in out and "bad-config: config.json" in out
    bad_status.update_status(state="failed")  # a writer keeps the damaged file aside, never loses it
    assert bad_status.state() == "failed" and list(bad_status.path.glob("status.json.damaged-*"))


# ---- annotations (tags and a note per run) and comparing runs (issue 13, app item 6) ------------
def test_annotations_round_trip_apart_from_status(tmp_path):
    from cifar_core.runs import parse_tags
    store = RunStore(tmp_path)
    rec = store.create(RunConfig(model="lenet"), run_id="r1", state="running")
    assert rec.annotations().tags == () and rec.annotations().note == "" and rec.annotations().problem is None
    saved = rec.write_annotations(parse_tags("baseline, seed-sweep lr=0.1 baseline"), "  first try, lr too high\n")
    assert saved.tags == ("baseline", "seed-sweep", "lr=0.1") and saved.note == "first try, lr too high"
    again = store.record("r1").annotations()
    assert again == saved
    assert json.loads(rec.annotations_path.read_text()) == {"tags": ["baseline", "seed-sweep", "lr=0.1"],
                                                            "note": "first try, lr too high"}
    rec.update_status(step=10)  # the trainer writes status.json only: the annotations stay
    assert "tags" not in rec.status() and store.record("r1").annotations().tags == saved.tags
    assert rec.write_annotations(note="second").tags == saved.tags  # None keeps the other field
    assert rec.write_annotations(tags=[]).note == "second"


@pytest.mark.parametrize("tags, note", [(["bad tag"], ""), (["../x"], ""), (["x" * 33], ""), ([""], ""),
                                        ([f"t{i}" for i in range(17)], ""), ("baseline", ""), ([1], ""),
                                        ([], "n" * 2001), ([], 5)])
def test_annotations_are_validated(tmp_path, tags, note):
    from cifar_core.runs import parse_tags
    rec = RunStore(tmp_path).create(RunConfig(model="lenet"), run_id="r1")
    rec.write_annotations(["keep"], "kept")
    with pytest.raises(ConfigError):
        rec.write_annotations(tags, note)
    assert rec.annotations().tags == ("keep",) and rec.annotations().note == "kept"  # nothing written
    with pytest.raises(ConfigError, match="invalid tag 'no!'"):
        parse_tags("fine, no!")


@pytest.mark.parametrize("damage", ["[1]", "{not json", b"\xff\xfe", '{"tags": "x", "note": 1}',
                                    '{"tags": ["a b"]}'])
def test_damaged_annotations_read_empty_with_a_problem(tmp_path, damage):
    rec = RunStore(tmp_path).create(RunConfig(model="lenet"), run_id="r1")
    rec.annotations_path.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    ann = rec.annotations()
    assert ann.tags == () and ann.note == "" and "annotations.json" in ann.problem
    assert rec.write_annotations(["fixed"], "").tags == ("fixed",)  # a save replaces the damaged file
    assert rec.annotations().problem is None


def test_aggregate_curves_mean_and_std_at_aligned_steps():
    from cifar_core.runs import aggregate_curves
    a = ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    b = ([1, 2, 3], [3.0, 4.0, float("nan")])     # stopped early; NaN at step 3
    c = ([1, 2, 2, 3], [5.0, 9.0, 6.0, 7.0])       # step 2 written twice (a resume): the last counts
    agg = aggregate_curves([a, b, c])
    assert list(agg.steps) == [1.0, 2.0] and list(agg.n) == [3, 3]   # the steps all three runs reached
    assert list(agg.mean) == [3.0, 4.0]
    assert list(agg.std) == pytest.approx([2.0, 2.0])               # sample std of (1,3,5) and (2,4,6)
    loose = aggregate_curves([a, b, c], min_runs=1)
    assert list(loose.steps) == [1.0, 2.0, 3.0, 4.0] and list(loose.n) == [3, 3, 2, 1]
    assert list(loose.mean) == pytest.approx([3.0, 4.0, 5.0, 4.0])
    assert list(loose.std) == pytest.approx([2.0, 2.0, 2 ** 0.5 * 2, 0.0])
    assert len(aggregate_curves([]).steps) == 0


def test_groups_summaries_and_baseline_deltas():
    from cifar_core.runs import (deltas_to_baseline, group_by_config, group_by_tag, mean_std, summarize_groups,
                                 val_accuracy_summary)
    assert mean_std([0.8, 0.9, None, float("nan")]) == (pytest.approx(0.85), pytest.approx(0.0707106781), 2)
    assert mean_std([0.5]) == (0.5, None, 1) and mean_std([]) == (None, None, 0)
    tags = {"r1": ("a",), "r2": ("a", "b"), "r3": (), "r4": ("b",)}
    assert group_by_tag(tags) == {"a": ["r1", "r2"], "b": ["r2", "r4"], "(no tag)": ["r3"]}
    assert group_by_tag(tags, only=["b"]) == {"b": ["r2", "r4"], "(no tag)": ["r1", "r3"]}
    base = RunConfig(model="lenet").to_dict()
    configs = {"s0": {**base, "seed": 0}, "s1": {**base, "seed": 1, "name": "x"}, "hi": {**base, "lr": 0.5}}
    groups = group_by_config(configs)
    assert sorted(groups.values()) == [["hi"], ["s0", "s1"]]
    assert any(label.startswith("lr=") for label in groups)
    assert group_by_config({"s0": configs["s0"], "s1": configs["s1"]}) == {"all runs": ["s0", "s1"]}
    metrics = {"r1": {"test_acc": 0.8}, "r2": {"test_acc": 0.9}, "r4": {"test_acc": None}}
    rows = summarize_groups({"a": ["r1", "r2"], "b": ["r2", "r4"]}, metrics, ["test_acc"])
    assert rows[0]["group"] == "a" and rows[0]["n"] == 2
    assert rows[0]["test_acc"] == (pytest.approx(0.85), pytest.approx(0.0707106781), 2)
    assert rows[1]["test_acc"] == (0.9, None, 1)
    deltas = deltas_to_baseline(metrics, "r1", ["test_acc"])
    assert deltas["r2"]["test_acc"] == pytest.approx(0.1) and deltas["r1"]["test_acc"] == 0.0
    assert deltas["r4"]["test_acc"] is None
    assert val_accuracy_summary({}, [0.5, 0.7, float("nan"), 0.6]) == {"best_val_acc": 0.7, "last_val_acc": 0.6}
    assert val_accuracy_summary({"best_val_acc": -1}, []) == {"best_val_acc": None, "last_val_acc": None}
