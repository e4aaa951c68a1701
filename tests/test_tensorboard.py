"""A run's metrics in TensorBoard: the event files the trainer writes live and `python -m cifar_core
tensorboard` rewrites, read back with TensorBoard's own EventAccumulator and compared with metrics.jsonl
and results.json. Tiny real runs (LeNet on 300 CIFAR-10 images, 4 steps an epoch)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from cifar_core import tensorboard_export
from cifar_core.cli import main as cli_main
from cifar_core.config import RunConfig
from cifar_core.engine import train_run
from cifar_core.processes import process_start_time
from cifar_core.runs import RunStore
from tests.test_engine_faults import tiny as fault_tiny

REPO = Path(__file__).resolve().parents[1]
# metrics.jsonl keys → the TensorBoard tags the export promises
TRAIN_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr",
              "grad_norm": "train/grad_norm", "images_per_s": "train/images_per_s"}
EVAL_TAGS = {"val_loss": "val/loss", "val_acc": "val/acc"}
FINAL_TAGS = {"test_acc": "final/test_acc", "test_loss": "final/test_loss", "balanced_acc": "final/balanced_acc",
              "macro_f1": "final/macro_f1", "ece": "final/ece"}


def tiny(**changes) -> RunConfig:
    """test_engine_faults' tiny run, logging every 3 steps (so epochs end between two log lines)."""
    return fault_tiny(**{"log_every": 3, **changes})


def read_events(run_dir: Path) -> event_accumulator.EventAccumulator:
    """The run's tensorboard/ folder as TensorBoard loads it (every event file, all points kept)."""
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                             size_guidance={event_accumulator.SCALARS: 0,
                                                            event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """(step, value, elapsed) per tag, from metrics.jsonl (good lines) and results.json."""
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or row.get("kind") not in ("train", "eval"):
            continue
        tags = TRAIN_TAGS if row["kind"] == "train" else EVAL_TAGS
        for key, tag in tags.items():
            if row.get(key) is not None:
                out.setdefault(tag, []).append((row["step"], row[key], row["elapsed"]))
    results = json.loads((run_dir / "results.json").read_text())
    for key, tag in FINAL_TAGS.items():
        out[tag] = [(results["steps"], results[key], results["train_seconds"])]
    return out


def assert_events_match_metrics(run_dir: Path) -> event_accumulator.EventAccumulator:
    acc = read_events(run_dir)
    expected = expected_scalars(run_dir)
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    train_rows = [r for r in expected["train/loss"]]
    start = None
    for tag, points in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [step for step, _, _ in points], tag  # each step once, in order
        assert [e.value for e in events] == pytest.approx([value for _, value, _ in points], rel=1e-6), tag
        if start is None:
            start = events[0].wall_time - points[0][2]
        # wall time = the run's start + the row's elapsed training time: the relative axis is training time
        assert [e.wall_time - start for e in events] == pytest.approx([el for _, _, el in points], abs=1e-3), tag
    assert len(train_rows) >= 4
    assert [p.name for p in (run_dir / "tensorboard").iterdir()] == ["events.out.tfevents.cifar-lab"]
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_npz):
    """A completed tiny run, its events written live by the trainer."""
    store = RunStore(tmp_path_factory.mktemp("tb"))
    record = train_run(tiny(), store, run_id="live", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    return record


def copy_run(record, root: Path, run_id: str) -> Path:
    shutil.copytree(record.path, root / run_id)
    return root / run_id


# ---- live -----------------------------------------------------------------------------------------
def test_training_writes_events_that_match_metrics_jsonl(trained):
    acc = assert_events_match_metrics(trained.path)
    tensors = acc.Tags()["tensors"]
    assert "config/text_summary" in tensors and "results/text_summary" in tensors
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model | `lenet` |" in config_text and "| lr | `0.05` |" in config_text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and "_hparams_/experiment" in hparams


def test_resume_after_a_kill_rewrites_the_events_without_repeating_steps(tmp_path, cifar_npz, trained):
    store = RunStore(tmp_path)
    part = train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), stop_at_step=7)
    assert part.state() == "cancelled"
    steps_before = [e.step for e in read_events(part.path).Scalars("train/loss")]
    assert steps_before == [3, 4, 6, 7]
    # as a kill in epoch 2 leaves it: the newest checkpoint is the end of epoch 1 (step 4), while the
    # metrics and the events already hold steps 6 and 7
    shutil.copy(part.checkpoint_path("best"), part.checkpoint_path("last"))
    part.update_status(state="failed", error="process lost")
    train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), resume=True)
    assert part.state() == "completed" and part.status()["resumed_at_step"] == 4
    acc = assert_events_match_metrics(part.path)
    full = read_events(trained.path)
    for tag in ("train/loss", "val/acc", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [e.step for e in full.Scalars(tag)], tag


def test_resume_before_the_first_checkpoint_drops_the_earlier_events(tmp_path, cifar_npz, trained):
    store = RunStore(tmp_path)
    part = train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), stop_at_step=3)
    part.checkpoint_path("last").unlink()  # killed in epoch 1: no checkpoint was written yet
    part.update_status(state="failed", error="process lost")
    assert [e.step for e in read_events(part.path).Scalars("train/loss")] == [3]
    train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), resume=True)
    acc = assert_events_match_metrics(part.path)
    assert [e.step for e in acc.Scalars("train/loss")] == [e.step for e in read_events(trained.path).Scalars(
        "train/loss")]


def test_without_the_tensorboard_package_training_logs_one_line(tmp_path, monkeypatch, trained):
    def missing():
        raise tensorboard_export.TensorBoardUnavailable("the tensorboard package is not installed")

    record = RunStore(tmp_path).record("x")
    shutil.copytree(trained.path, record.path)
    shutil.rmtree(record.path / "tensorboard")
    monkeypatch.setattr(tensorboard_export, "tensorboard_modules", missing)
    lines = []
    events = tensorboard_export.live_events(record, log=lines.append)
    events.add({"kind": "train", "step": 1, "train_loss": 1.0})
    events.close()
    assert len(lines) == 1 and "not installed" in lines[0] and "python -m cifar_core tensorboard x" in lines[0]
    assert not (record.path / "tensorboard" / "events.out.tfevents.cifar-lab").exists()
    monkeypatch.undo()
    monkeypatch.setenv("CIFAR_LAB_TENSORBOARD", "0")
    assert isinstance(tensorboard_export.live_events(record, log=lines.append), tensorboard_export.NoEvents)
    assert not (record.path / "tensorboard").exists() and len(lines) == 1


# ---- the conversion command -----------------------------------------------------------------------
def test_conversion_matches_the_live_events_and_never_duplicates(tmp_path, capsys, trained):
    run = copy_run(trained, tmp_path, "conv")
    shutil.rmtree(run / "tensorboard")
    for _ in range(2):  # converting again replaces the file: no point twice
        assert cli_main(["--runs-root", str(tmp_path), "tensorboard", "conv"]) == 0
        out = capsys.readouterr().out
        assert "conv: " in out and "final test metrics" in out and str(run / "tensorboard") in out
        assert f"open them: tensorboard --logdir {tmp_path}" in out
        acc = assert_events_match_metrics(run)
    live = read_events(trained.path)
    for tag in acc.Tags()["scalars"]:
        assert [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] == \
            [(e.step, e.value, e.wall_time) for e in live.Scalars(tag)], tag


def test_damaged_metric_lines_are_skipped_and_counted(tmp_path, capsys, trained):
    run = copy_run(trained, tmp_path, "damaged")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(2, '{"kind": "train", "step": 4, "train_lo\n')  # a torn line
    lines.insert(5, "[1, 2]\n")  # JSON, not an object
    lines.insert(7, '{"kind": "train", "step": "seven"}\n')  # no usable step
    (run / "metrics.jsonl").write_text("".join(lines) + '{"kind": "eval", "st')  # and a half-written last line
    assert cli_main(["--runs-root", str(tmp_path), "tensorboard", "--all"]) == 0
    out = capsys.readouterr().out
    assert "damaged: " in out and "skipped 4 damaged metrics.jsonl lines" in out
    assert_events_match_metrics(run)


def test_bad_run_ids_get_clear_errors_without_a_traceback(tmp_path, trained):
    copy_run(trained, tmp_path, "good")
    (tmp_path / "not-a-run").mkdir()
    out = subprocess.run([sys.executable, "-m", "cifar_core", "--runs-root", str(tmp_path), "tensorboard",
                          "../etc", "nope", "not-a-run", "good"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, out.stderr
    assert "'../etc'" in errors[0] and "run id" in errors[0]
    assert "run 'nope' was not found" in errors[1] and "run 'not-a-run' was not found" in errors[2]
    assert "good: " in out.stdout and "open them: tensorboard --logdir" in out.stdout  # the good one still converts
    assert (tmp_path / "good" / "tensorboard" / "events.out.tfevents.cifar-lab").is_file()


def test_cli_usage_errors_and_a_run_that_trains_now(tmp_path, capsys, trained):
    assert cli_main(["--runs-root", str(tmp_path), "tensorboard"]) == 2
    assert "name the runs to convert" in capsys.readouterr().err
    assert cli_main(["--runs-root", str(tmp_path), "tensorboard", "--all"]) == 0
    assert f"no runs in {tmp_path}" in capsys.readouterr().out
    busy = RunStore(tmp_path).record("busy")
    shutil.copytree(trained.path, busy.path)
    before = (busy.path / "tensorboard" / "events.out.tfevents.cifar-lab").read_bytes()
    busy.update_status(state="running", pid=os.getpid(), pid_start=process_start_time(os.getpid()))
    assert cli_main(["--runs-root", str(tmp_path), "tensorboard", "busy"]) == 2
    assert "its trainer writes the TensorBoard events live" in capsys.readouterr().err
    assert cli_main(["--runs-root", str(tmp_path), "tensorboard", "--all"]) == 0  # with --all: a note
    assert "busy: skipped" in capsys.readouterr().out
    assert (busy.path / "tensorboard" / "events.out.tfevents.cifar-lab").read_bytes() == before
