"""Bad command lines end in one clear message and a non-zero exit, never a traceback."""
from __future__ import annotations

import json

import pytest

from cifar_core.cli import main


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("make, expected", [
    (lambda p: (p.mkdir(), p)[1], "is a folder"),
    (lambda p: (p.write_bytes(b"\xff\xfe{\x00"), p)[1], "not UTF-8"),
    (lambda p: (p.write_text("[1, 2]"), p)[1], "must hold a JSON object"),
])
def test_bad_config_files(tmp_path, capsys, make, expected):
    path = make(tmp_path / "cfg.json")
    code, out = run(["--runs-root", str(tmp_path / "runs"), "train", "--config", str(path), "--print-config"], capsys)
    assert code == 2 and expected in out and "Traceback" not in out


def test_runs_root_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    for argv in (["runs"], ["train", "--model", "lenet", "--epochs", "1"]):
        code, out = run(["--runs-root", str(blocker)] + argv, capsys)
        assert code == 2 and "is a file, not a folder" in out


def test_submit_without_data_fails_before_queueing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("CIFAR10_NPZ", raising=False)
    code, out = run(["--runs-root", str(tmp_path / "runs"), "submit", "--model", "lenet",
                     "--data", str(tmp_path / "missing.npz")], capsys)
    assert code == 2 and "CIFAR-10 not found" in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden"])
def test_traversal_run_ids_are_refused_even_with_print_config(tmp_path, capsys, bad):
    code, out = run(["--runs-root", str(tmp_path), "train", "--run-id", bad, "--print-config"], capsys)
    assert code == 2 and "invalid run id" in out
    code, _ = run(["--runs-root", str(tmp_path), "train", "--resume", bad], capsys)
    assert code == 2


def test_a_good_config_file_still_prints(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "lenet", "epochs": 3}))
    code, out = run(["--runs-root", str(tmp_path), "train", "--config", str(path), "--print-config"], capsys)
    assert code == 0 and json.loads(out)["epochs"] == 3
