"""Train one config over several seeds, one run after another, and report mean ± std: the accuracy
targets of the issues ("≥ X% mean over 3 seeds in ≤ Y min per run") are measured with this.

Everything after `--` is passed to `python -m cifar_core train` as it is (a preset, flags, --data);
this script adds only `--seed K` and a runs root of its own per seed (--runs-root/seed-K), so that each
folder holds that seed's run alone.

    python bench/bench_seeds.py --seeds 0,1,2 --runs-root /tmp/bseeds/muon --out /tmp/bseeds/muon.json \\
        -- --preset "fast muon" --data /tmp/cifar10.npz

A reference command (--reference, run through the shell from --reference-dir, e.g. a public script kept in
a scratch folder outside the repository) runs after each seed's run, so that both are timed on the same
machine one run after the other; `{seed}` in it becomes the seed; --reference-regex takes its accuracy
from its output (the first group of the last match, a percentage or a fraction).

Per seed: the run's test accuracy, balanced accuracy, macro-F1, train seconds (the engine's training loop)
and wall seconds (the command, start-up and final evaluation included); mean ± std of each; for the
reference the same wall time and accuracy, and the ratio of the two mean wall times. A seed whose run
already completed under --runs-root is read again, not retrained, so the benchmark can be stopped and
restarted (its wall time is taken from the summary left in --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from cifar_core import runs

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("test_acc", "balanced_acc", "macro_f1", "train_seconds")


def completed_run(root: Path) -> Path | None:
    """The one completed run folder under `root` (a results.json and status completed), if any."""
    for folder in sorted(root.glob("*/results.json")) if root.is_dir() else []:
        status = folder.parent / "status.json"
        if status.exists() and json.loads(status.read_text()).get("state") == "completed":
            return folder.parent
    return None


def train_seed(args, seed: int) -> dict:
    root = Path(args.runs_root) / f"seed-{seed}"
    cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(root), "train", *args.train_args,
           "--seed", str(seed)]
    start = time.perf_counter()
    with open(Path(args.runs_root) / f"seed-{seed}.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    run = completed_run(root)
    if code or run is None:
        raise SystemExit(f"seed {seed}: the run did not complete (exit {code}); see {root}.log")
    return {"run": str(run), "wall_seconds": wall, **read_results(run)}


def read_results(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    return {key: results.get(key) for key in RESULT_KEYS}


def run_reference(args, seed: int) -> dict:
    start = time.perf_counter()
    command = args.reference.replace("{seed}", str(seed))
    done = subprocess.run(command, shell=True, cwd=args.reference_dir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    (Path(args.runs_root) / f"reference-{seed}.log").write_text(output)
    if done.returncode:
        raise SystemExit(f"the reference command failed (exit {done.returncode}): {output[-2000:]}")
    matches = re.findall(args.reference_regex, output) if args.reference_regex else []
    accuracy = float(matches[-1]) if matches else None
    if accuracy is not None and accuracy > 1:
        accuracy /= 100
    return {"wall_seconds": wall, "test_acc": accuracy}


def mean_std(values: list) -> dict:
    mean, std, n = runs.mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def summarize(seeds: dict, references: dict) -> dict:
    summary = {key: mean_std([row[key] for row in seeds.values()]) for key in (*RESULT_KEYS, "wall_seconds")}
    if references:
        summary["reference"] = {key: mean_std([row[key] for row in references.values()])
                                for key in ("test_acc", "wall_seconds")}
        ours, theirs = summary["wall_seconds"]["mean"], summary["reference"]["wall_seconds"]["mean"]
        summary["wall_ratio_ours_to_reference"] = ours / theirs if ours and theirs else None
    return summary


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--runs-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", default=None, help="a shell command to run after each seed's run ({seed}: the seed)")
    parser.add_argument("--reference-dir", default=None, help="its working folder")
    parser.add_argument("--reference-regex", default=None, help="its accuracy in its output: a regex with one group")
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1:]
    if not args.train_args:
        parser.error("give the train flags after --, e.g. -- --preset fast --data /tmp/cifar10.npz")
    Path(args.runs_root).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    seeds, references = {}, {}
    for seed in (int(s) for s in args.seeds.split(",")):
        key = str(seed)
        run = completed_run(Path(args.runs_root) / f"seed-{seed}")
        if run is not None and key in previous.get("seeds", {}):
            seeds[key] = previous["seeds"][key]
            if key in previous.get("references", {}):
                references[key] = previous["references"][key]
        else:
            seeds[key] = train_seed(args, seed)
            print(f"seed {seed}: {100 * seeds[key]['test_acc']:.2f}% in {seeds[key]['wall_seconds']:.0f} s wall "
                  f"({seeds[key]['train_seconds']:.0f} s training)", flush=True)
        if args.reference and key not in references:
            references[key] = run_reference(args, seed)
            accuracy = references[key]["test_acc"]
            print(f"reference after seed {seed}: {references[key]['wall_seconds']:.0f} s wall"
                  + (f", {100 * accuracy:.2f}%" if accuracy is not None else ""), flush=True)
        out.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "train_args": args.train_args,
            "reference": args.reference, "seeds": seeds, "references": references,
            "summary": summarize(seeds, references)}, indent=1))
    print(json.dumps(summarize(seeds, references), indent=1))


if __name__ == "__main__":
    main()
