"""bench/bench_few_labels.py part (a) on 250 real labels for seconds: every run scored with one view and
with test-time views from its final weights, a resumed summary scored without training again, and a resume
refused where the machine steps more slowly than the summary's calibration."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "bench_few_labels.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_part_a_scores_each_run_by_views_and_a_resume_rescores_without_training(tmp_path, cifar_npz):
    runs_root, first = tmp_path / "runs", tmp_path / "a.json"
    common = ["--data", str(cifar_npz), "--runs-root", str(runs_root), "--parts", "a", "--methods", "supervised",
              "--minutes", "0.1", "--seeds", "1", "--test-size", "200", "--calibrate-steps", "4",
              "--precision", "fp32"]
    out = bench(*common, "--out", str(first))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(first.read_text())
    assert report["complete"] is True
    method = report["a_equal_time"]["methods"]["supervised"]
    run = method["runs"][0]
    views = run["tta_test_acc"]
    assert set(views) == {"none", "flip", "flip+translate"}
    # the same weights, the same 200 test images, one view: the run's own evaluation
    assert abs(views["none"] - run["test_acc"]) <= 0.01
    assert method["tta_test_acc"]["flip+translate"]["values"] == [views["flip+translate"]]

    # a summary from before the view scores: --resume scores its finished run, trains nothing
    del run["tta_test_acc"]
    first.write_text(json.dumps(report))
    runs_before = sorted(p.name for p in runs_root.iterdir())
    resumed_path = tmp_path / "resumed.json"
    out = bench(*common, "--resume", str(first), "--out", str(resumed_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in runs_root.iterdir()) == runs_before
    resumed = json.loads(resumed_path.read_text())["a_equal_time"]["methods"]["supervised"]["runs"][0]
    assert resumed["run_id"] == run["run_id"] and resumed["tta_test_acc"] == views

    # a resume with seeds left to train, on a machine slower than the calibration: refused before training
    report["a_equal_time"]["methods"]["supervised"]["calibrated_s_per_step"] = 1e-5
    first.write_text(json.dumps(report))
    two_seeds = list(common)
    two_seeds[two_seeds.index("--seeds") + 1] = "2"
    out = bench(*two_seeds, "--resume", str(first), "--out", str(tmp_path / "x.json"))
    assert out.returncode != 0
    assert "more than the 1e-05 s the earlier summary calibrated" in out.stderr, out.stdout + out.stderr
    trained = [p.name for p in runs_root.iterdir() if not p.name.startswith("calibrate-")]
    assert trained == [n for n in runs_before if not n.startswith("calibrate-")]
