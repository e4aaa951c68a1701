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
