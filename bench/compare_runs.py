"""Compare two run folders: every metrics.jsonl line and results.json, apart from timings.

    python bench/compare_runs.py RUN_DIR_A RUN_DIR_B [--tol 1e-6]

For checking that a refactor keeps training identical: train the same config.json twice (before and
after) and compare. Ignored: the time keys of metrics lines (time, elapsed, images_per_s) and
train_seconds in results.json. Floats are equal within --tol (absolute or relative); everything
else must be equal. Prints each difference; exit status 1 when there is any, 2 on unreadable input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS_TIME_KEYS = frozenset({"time", "elapsed", "images_per_s"})
RESULTS_TIME_KEYS = frozenset({"train_seconds"})


def differences(a, b, tol: float, where: str = "") -> list[str]:
    """Where `a` and `b` (JSON values) differ, floats compared within `tol`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in the first" for k in a.keys() - b.keys()]
        out += [f"{where}.{k}: only in the second" for k in b.keys() - a.keys()]
        for key in sorted(a.keys() & b.keys()):
            out += differences(a[key], b[key], tol, f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, tol, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b or math.isclose(a, b, rel_tol=tol, abs_tol=tol):
            return []
        return [f"{where}: {a!r} vs {b!r} (difference {b - a:.3g})"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def without(row: dict, keys: frozenset) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


def read_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [without(json.loads(line), METRICS_TIME_KEYS) for line in lines if line.strip()]


def compare(run_a: Path, run_b: Path, tol: float) -> list[str]:
    rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
    out = []
    if len(rows_a) != len(rows_b):
        out.append(f"metrics.jsonl: {len(rows_a)} lines vs {len(rows_b)}")
    for i, (a, b) in enumerate(zip(rows_a, rows_b), start=1):
        out += differences(a, b, tol, f"metrics.jsonl line {i} ({a.get('kind')}, step {a.get('step')})")
    results_a = without(json.loads((run_a / "results.json").read_text()), RESULTS_TIME_KEYS)
    results_b = without(json.loads((run_b / "results.json").read_text()), RESULTS_TIME_KEYS)
    out += differences(results_a, results_b, tol, "results.json")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6, help="float tolerance (default 1e-6)")
    args = parser.parse_args(argv)
    try:
        found = compare(args.run_a, args.run_b, args.tol)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in found:
        print(line)
    n_lines = len(read_metrics(args.run_a))
    if found:
        print(f"{len(found)} difference(s) between {args.run_a} and {args.run_b}")
        return 1
    print(f"identical: {args.run_a} and {args.run_b} ({n_lines} metrics lines and results.json, "
          f"timings ignored, tolerance {args.tol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
