"""Run one one-click study end to end, as the Studies page launches it, and report its wall time, its
estimate before launch, the per-cell mean ± std and the verdict (whether the claim held).

    python bench/bench_study.py samplers --scale cpu --data /tmp/cifar10.npz
    python bench/bench_study.py samplers --scale cpu --params '{"profile": "long_tail"}' --data ...
    python bench/bench_study.py bn_vs_gn --scale cpu --data /tmp/cifar10.npz

The runs go to a fresh runs root (--runs-root, default a temporary folder) and are trained one after
another by the ordinary supervisor. Nothing else should run on the machine meanwhile: the wall time
is the figure the cpu scale promises (<= 30 min on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cifar_core import jobs
from cifar_core.experiments import studies
from cifar_core.experiments.verdicts import verdict
from cifar_core.runs import RunStore


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=studies.STUDIES.names())
    ap.add_argument("--scale", default="cpu", choices=studies.SCALES)
    ap.add_argument("--params", default="{}", help="JSON of the study's parameters (the rest: the scale's)")
    ap.add_argument("--seeds", type=int, default=None, help="default: the scale's")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (npz or the offline folder)")
    ap.add_argument("--runs-root", default=None)
    ap.add_argument("--poll", type=float, default=10.0)
    args = ap.parse_args()

    root = Path(args.runs_root or tempfile.mkdtemp(prefix="bench-study-")) / "runs"
    store = RunStore(root)
    params = {"scale": args.scale, **json.loads(args.params)}
    estimate = studies.estimate_study(args.kind, params, args.seeds, store, args.data)
    print(f"{args.kind} at {args.scale}: estimate {estimate.text} ({estimate.range_text}), {estimate.basis}",
          flush=True)
    started = time.time()
    study_id = studies.launch_study(args.kind, params, store, args.data, args.seeds)
    print(f"study {study_id} in {root}", flush=True)
    while True:
        time.sleep(args.poll)
        jobs.refresh(store)
        df = studies.study_results(store, study_id)
        done = int((df["state"] == "completed").sum())
        print(f"  {time.time() - started:7.0f} s  {done}/{len(df)} completed", flush=True)
        if studies.is_finished(df):
            break
    wall = time.time() - started
    summary = studies.summarize(df)
    cols = [c for c in summary.columns if c in df.attrs["cell_keys"] or c.endswith(("acc_mean", "acc_std"))
            or c in ("done", "train_seconds_mean")]
    print(summary[cols].to_string(index=False))
    result = verdict(df)
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min), estimate was {estimate.seconds:.0f} s")
    print(f"verdict: {result.headline}\n  claim: {result.claim}\n  {result.summary}")
    for row in result.rows:
        print("  ", row)
    return 0 if studies.is_finished(df) else 1


if __name__ == "__main__":
    sys.exit(main())
