"""Active learning on this machine (issue 15): query strategies against random, over seeds.

For each seed and each strategy (--strategies) runs one active-learning loop exactly as a user would,
`python -m cifar_core active --strategy S --seed K --loop bench-S-sK` (oracle labels, the loop's
default per-round config: the fast net at half width, 8 epochs per round; here with bf16 autocast and
channels_last, as the fast preset on this CPU), from --initial labels
adding --per-round each round for --rounds rounds (the issue's 1,000 → 10,000: 10 rounds of 1,000).
Each loop's wall time is measured from the command's start to its end: every round's training run,
its process start-up, the scoring of the unlabeled pool and the selection.

Loops run one after another (seeds outermost, so that a stopped benchmark leaves whole seeds), and a loop
that already completed in --runs-root is not run again: its time is read from the summary it left
(--out's `loops`), or, for a loop that completed while this script was not running, from its manifest
(created to last update; `seconds_from: manifest`), so the benchmark can be stopped and restarted.

Prints the JSON summary and writes it to --out: per loop its curve and wall seconds; per strategy and
number of labels the mean ± std of the test accuracy; each strategy minus random at every budget, paired
by seed (the same initial draw and per-round config), with its 95% t-interval.

    python bench/bench_active.py --data /tmp/cifar10.npz --runs-root /tmp/bactive/runs \\
        --strategies random,margin,entropy,coreset --seeds 3 --out /tmp/bactive/result.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cifar_core.experiments.active_loop import COMPLETED, loop_report, manifest_path, read_loop
from cifar_core.experiments.verdicts import difference
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore, mean_std

REPO = Path(__file__).resolve().parents[1]
BASELINE = "random"


def loop_id(strategy: str, seed: int) -> str:
    return f"bench-{strategy}-s{seed}"


def finished(store: RunStore, loop: str) -> bool:
    try:
        return read_loop(store, loop).state == COMPLETED
    except ConfigError:  # no such loop yet
        return False


def run_loop(args, strategy: str, seed: int) -> float:
    """Runs one loop to its end in a child process (the CLI, as a user runs it); its wall seconds."""
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", args.runs_root, "active", "--strategy", strategy,
           "--seed", str(seed), "--loop", loop_id(strategy, seed), "--initial", str(args.initial),
           "--per-round", str(args.per_round), "--rounds", str(args.rounds), "--data", args.data]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs), "--eval-every", str(args.epochs)]
    if args.precision:
        cmd += ["--precision", args.precision, "--channels-last"]
    start = time.perf_counter()
    with open(Path(args.runs_root).parent / f"{loop_id(strategy, seed)}.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"loop {loop_id(strategy, seed)} failed (exit {code}); see its log beside the runs root")
    return seconds


def t_interval(values: list[float]) -> dict:
    """Mean, std and the 95% t-interval (verdicts.difference) of per-seed values; no interval for one."""
    if len(values) < 2:
        mean, _, n = mean_std(values)
        return {"mean": mean, "std": None, "n": n, "low": None, "high": None}
    diff = difference(values)
    return {"mean": diff.mean, "std": diff.std, "n": diff.n, "low": diff.low, "high": diff.high}


def summarize(args, loops: dict) -> dict:
    """Per strategy the mean curve and its seconds; each strategy minus random per budget, by seed."""
    curves: dict[str, dict[int, dict[int, float]]] = {}  # strategy -> seed -> labels -> test acc
    seconds: dict[str, list[float]] = {}
    for info in loops.values():
        curves.setdefault(info["strategy"], {})[info["seed"]] = {row["labels"]: row["test_acc"] for row in info["curve"]}
        seconds.setdefault(info["strategy"], []).append(info["seconds"])
    strategies = {}
    for strategy, by_seed in curves.items():
        budgets = sorted({labels for curve in by_seed.values() for labels in curve})
        strategies[strategy] = {
            "seeds": sorted(by_seed), "seconds": t_interval(seconds[strategy]),
            "max_seconds": max(seconds[strategy]),
            "curve": {labels: t_interval([c[labels] for c in by_seed.values() if labels in c]) for labels in budgets}}
        if strategy != BASELINE and BASELINE in curves:
            paired = [s for s in by_seed if s in curves[BASELINE]]
            strategies[strategy]["minus_random"] = {
                labels: t_interval([by_seed[s][labels] - curves[BASELINE][s][labels] for s in paired
                                    if labels in by_seed[s] and labels in curves[BASELINE][s]])
                for labels in budgets}
    return {"strategies": strategies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 .npz or offline folder")
    parser.add_argument("--runs-root", required=True)
    parser.add_argument("--strategies", default="random,margin,entropy,coreset")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--initial", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=0, help="epochs per round (0: the loop's default)")
    parser.add_argument("--precision", default="bf16", help="each round's autocast dtype, with channels_last "
                        "(bf16: as the fast preset on a CPU with AVX-512 BF16; empty: the loop's default, fp32)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.runs_root).mkdir(parents=True, exist_ok=True)
    store = RunStore(args.runs_root)
    out = Path(args.out)
    previous = json.loads(out.read_text()).get("loops", {}) if out.exists() else {}
    loops = {}
    for seed in range(args.seeds):
        for strategy in args.strategies.split(","):
            name = loop_id(strategy, seed)
            if finished(store, name) and name in previous:
                loops[name] = previous[name]
            elif finished(store, name):  # completed while this script was stopped: its manifest's times
                loop = read_loop(store, name)
                report = loop_report(store, name)
                updated = json.loads(manifest_path(store, name).read_text()).get("updated", loop.created)
                loops[name] = {"strategy": strategy, "seed": seed, "seconds": updated - loop.created,
                               "seconds_from": "manifest", "epochs": report["epochs"], "curve": report["curve"]}
            else:
                seconds = run_loop(args, strategy, seed)
                report = loop_report(store, name)
                loops[name] = {"strategy": strategy, "seed": seed, "seconds": seconds, "epochs": report["epochs"],
                               "curve": report["curve"]}
                print(f"{name}: {seconds:.0f} s, final {100 * report['curve'][-1]['test_acc']:.2f}% at "
                      f"{report['curve'][-1]['labels']:,} labels", flush=True)
            summary = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                       "args": vars(args), "loops": loops, **summarize(args, loops)}
            out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summarize(args, loops), indent=1))


if __name__ == "__main__":
    main()
