"""Server time of one live-view refresh of the Runs page, for a run with 10,000 metric lines.

Measures the data path the live fragment runs every second: read the bytes appended to
metrics.jsonl, rebuild the DataFrames, build the charts (specs authored with Altair, cached per
layout; thinned long-form rows) and serialise them the way st.vega_lite_chart does (rows as Arrow,
spec as JSON). First the full read of an existing 10,000-line file (what the first view of a run
costs), then N refreshes with one new line each.
Prints a table; asserts nothing (target: <= 200 ms per refresh).

    .venv/bin/python bench/bench_live_view.py [--lines 10000] [--refreshes 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


TARGET_MS = 200.0


def fabricate(root: Path, lines: int):
    """A run record with `lines` metric lines (train every step, an eval row every 100)."""
    from cifar_core.config import RunConfig
    from cifar_core.runs import RunStore

    store = RunStore(root)
    record = store.create(RunConfig(name="bench", epochs=100).validated(), run_id="bench-run")
    record.update_status(state="running", started=time.time() - 3600, total_steps=20_000,
                         steps_per_epoch=200)
    t0 = time.time() - 3600
    rows = []
    for i in range(1, lines + 1):
        rows.append(train_row(i, t0) if i % 100 else eval_row(i, t0))
    import json
    record.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return record, t0


def train_row(step: int, t0: float) -> dict:
    return {"kind": "train", "step": step, "epoch": round(step / 200, 4), "train_loss": 2.3 / (1 + step / 500),
            "train_acc": min(0.99, step / 12_000), "lr": 0.05 * (1 - step / 20_000), "grad_norm": 1.2,
            "images_per_s": 1500.0, "elapsed": step * 0.3, "time": t0 + step * 0.3}


def eval_row(step: int, t0: float) -> dict:
    return {"kind": "eval", "step": step, "epoch": round(step / 200, 4), "val_loss": 1.6 / (1 + step / 900),
            "val_acc": min(0.95, step / 11_000), "eval_split": "val", "elapsed": step * 0.3 + 0.1}


def serialize(chart) -> int:
    """What st.vega_lite_chart does with a CurveChart on the server: the rows to Arrow bytes and
    the spec to JSON. Returns the payload size in bytes."""
    import copy
    import json

    from streamlit import dataframe_util

    arrow = dataframe_util.convert_anything_to_arrow_bytes(chart.data)
    return len(arrow) + len(json.dumps(copy.deepcopy(chart.spec)))


def refresh(live, x: str, smoothing: float) -> dict:
    """One live-view refresh; returns the time of each phase in ms."""
    from ui import charts

    t = time.perf_counter()
    live.refresh()
    t_read = time.perf_counter()
    train, evl = live.frames()
    t_frames = time.perf_counter()
    built = charts.curve_charts({"bench": (train, evl)}, x=x, smoothing=smoothing)
    t_build = time.perf_counter()
    for chart in built.values():
        serialize(chart)
    t_spec = time.perf_counter()
    return {"read": 1e3 * (t_read - t), "frames": 1e3 * (t_frames - t_read),
            "charts": 1e3 * (t_build - t_frames), "spec": 1e3 * (t_spec - t_build),
            "total": 1e3 * (t_spec - t)}


def page_reruns(record, t0: float, args) -> list[float]:
    """Whole Runs page reruns through AppTest (one new line before each): an upper bound, since
    the live fragment reruns only part of the page."""
    import os

    from streamlit.testing.v1 import AppTest

    os.environ["CIFAR_LAB_RUNS"] = str(record.root)
    page = str(Path(__file__).resolve().parents[1] / "app_pages" / "2_Runs.py")
    at = AppTest.from_file(page, default_timeout=120)
    at.query_params["run"] = record.run_id
    at.run()  # first view: full read
    times = []
    for i in range(args.page_reruns):
        record.append_metrics(train_row(args.lines + args.refreshes + 1 + i, t0))
        t = time.perf_counter()
        at.run()
        times.append(1e3 * (time.perf_counter() - t))
        if at.exception:
            raise RuntimeError(at.exception[0].value)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--refreshes", type=int, default=50)
    parser.add_argument("--x", default="step", choices=("step", "epoch", "elapsed"))
    parser.add_argument("--smoothing", type=float, default=0.6)
    parser.add_argument("--page-reruns", type=int, default=10,
                        help="also time this many whole-page reruns with AppTest (0: skip)")
    args = parser.parse_args()

    import logging
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from ui import charts
    from ui.live import LiveMetrics

    with tempfile.TemporaryDirectory() as tmp:
        record, t0 = fabricate(Path(tmp) / "runs", args.lines)
        size_mb = record.metrics_path.stat().st_size / 2**20
        refresh(LiveMetrics(record.metrics_path), args.x, args.smoothing)  # warm imports
        charts.curve_spec.cache_clear()  # the first view also pays for building the chart specs

        live = LiveMetrics(record.metrics_path)
        first = refresh(live, args.x, args.smoothing)
        rows = live.n_rows
        samples = []
        for i in range(args.refreshes):
            record.append_metrics(train_row(args.lines + 1 + i, t0))
            samples.append(refresh(live, args.x, args.smoothing))
        assert live.n_rows == rows + args.refreshes
        page = page_reruns(record, t0, args) if args.page_reruns else []

    print(f"live-view refresh, {args.lines:,} metric lines ({size_mb:.1f} MiB), x={args.x}, "
          f"smoothing={args.smoothing}, {args.refreshes} refreshes with one new line each")
    phases = ("read", "frames", "charts", "spec", "total")
    print(f"{'':<22}" + "".join(f"{p:>10}" for p in phases) + "   (ms)")
    print(f"{'first full read':<22}" + "".join(f"{first[p]:>10.1f}" for p in phases))
    for name, fn in (("refresh median", statistics.median),
                     ("refresh p90", lambda v: sorted(v)[int(0.9 * (len(v) - 1))]),
                     ("refresh max", max)):
        print(f"{name:<22}" + "".join(f"{fn([s[p] for s in samples]):>10.1f}" for p in phases))
    if page:
        print(f"{'whole page (AppTest)':<22}" + f"{'':>40}{statistics.median(page):>10.1f}"
              f"   median of {len(page)} full reruns incl. table, widgets (upper bound)")
    median = statistics.median(s["total"] for s in samples)
    verdict = "within" if median <= TARGET_MS else "OVER"
    print(f"median refresh {median:.1f} ms: {verdict} the {TARGET_MS:.0f} ms target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
