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
