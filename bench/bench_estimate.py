"""Estimated vs actual duration of real runs (issue 12's cases), one after the other.

For each case: a fresh runs root, the estimate (from a probe, since nothing has finished there
yet), the real run(s) timed as a user waits for them — the wall time of `python -m cifar_core train`
as a subprocess; a study's runs are queued records started one after the other with the very command
the job supervisor uses — then a second estimate from the finished runs. Prints estimate, actual and
actual/estimate for each case. Run it on a quiet machine: the timings are the point.

    .venv/bin/python bench/bench_estimate.py --data /tmp/cifar10.npz            # all four cases
    .venv/bin/python bench/bench_estimate.py --data /tmp/cifar10.npz --cases 4   # the shortest only
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.experiments import estimate, studies
from cifar_core.experiments.presets import preset
from cifar_core.runs import RunStore

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    label: str
    fields: dict | None = None  # one run: its config fields (run with the equivalent train flags)
    study: str = ""             # or a study at its cpu-quick scale


CASES = {
    1: Case("tiny preset, 60 epochs", {**preset("tiny (smoke test)"), "epochs": 60}),
    2: Case("resnet18 on 200 random images, 6 epochs",
            {"model": "resnet18", "subset": "random", "subset_size": 200, "epochs": 6}),
    3: Case("ablation study, cpu-quick (7 runs)", study="ablation"),
    4: Case("fastnet on 5,000 random images, 2 epochs",
            {"model": "fastnet", "subset": "random", "subset_size": 5000, "epochs": 2}),
}


def configs(case: Case) -> list[RunConfig]:
    if case.study:
        return [cfg for _, cfg in studies.build_study(case.study, {"scale": "cpu-quick"})]
    return [RunConfig.from_dict(case.fields)]


def train_command(root: Path, run_id: str, data: str | None) -> list[str]:
    """What jobs.Supervisor starts for a queued run."""
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(root), "train", "--resume", run_id, "--no-progress"]
    return cmd + (["--data", data] if data else [])


def run_for_real(case: Case, store: RunStore, data: str | None) -> float:
    """Wall seconds of the case's runs, one process after the other."""
    total = 0.0
    for cfg in configs(case):
        if case.study:
            run_id = jobs.submit(cfg, store, data_source=data, start_worker=False).run_id
            cmd = train_command(store.root, run_id, data)
        else:  # what a user types: the config as train flags
            cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(store.root), "train",
                   *cfg.to_flags(), "--no-progress"] + (["--data", data] if data else [])
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        total += time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return total


def measure(number: int, case: Case, data: str | None) -> dict:
    estimate.clear_memory()  # this process measures again for every case, as a new machine would
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        store = RunStore(Path(tmp) / "runs")
        started = time.perf_counter()
        before = estimate.estimate_runs(configs(case), store, data)
        estimate_s = time.perf_counter() - started
        actual = run_for_real(case, store, data)
        after = estimate.estimate_runs(configs(case), store, data)
    return {"number": number, "case": case, "before": before, "estimate_s": estimate_s, "actual": actual,
            "after": after}


def show(result: dict) -> None:
    before, after, actual = result["before"], result["after"], result["actual"]
    print(f"case {result['number']}: {result['case'].label}")
    print(f"  estimate  {before.seconds:7.1f} s  {before.text} ({before.range_text}), {before.basis}; "
          f"took {result['estimate_s']:.1f} s to make")
    print(f"            {before.parts_text()}")
    print(f"  actual    {actual:7.1f} s  ({estimate.human_duration(actual)})   actual/estimate "
          f"{actual / before.seconds:.2f}")
    print(f"  after     {after.seconds:7.1f} s  {after.text}, {after.basis}   actual/estimate "
          f"{actual / after.seconds:.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("CIFAR10_NPZ"),
                        help="CIFAR-10 .npz or offline folder (default: $CIFAR10_NPZ, else the cache)")
    parser.add_argument("--cases", default=",".join(map(str, CASES)),
                        help="comma-separated case numbers: " + "; ".join(f"{n} = {c.label}" for n, c in CASES.items()))
    args = parser.parse_args()
    try:
        numbers = [int(n) for n in args.cases.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--cases: whole numbers from {sorted(CASES)}, comma-separated")
    unknown = [n for n in numbers if n not in CASES]
    if unknown or not numbers:
        parser.error(f"--cases: unknown case(s) {unknown}; choose from {sorted(CASES)}")
    results = []
    for number in numbers:
        results.append(measure(number, CASES[number], args.data))
        show(results[-1])
    print("\ncase  estimate s  actual s  actual/estimate  estimate within ±30% of actual")
    for r in results:
        ratio = r["actual"] / r["before"].seconds
        within = abs(r["before"].seconds - r["actual"]) <= 0.3 * r["actual"]
        print(f"{r['number']:>4}  {r['before'].seconds:10.1f}  {r['actual']:8.1f}  {ratio:15.2f}  "
              f"{'yes' if within else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
