"""Server time of one augmentation-previewer grid: 64 variants of one image through a 3-step chain.

Measures exactly what the Preview page runs for a grid (cifar_core/augment/preview.py): validate and build the
chain, augment 64 copies of one sample image in one batched, seeded, recorded chain call, then
assemble the grid (display conversion, nearest-neighbour enlargement, PNG encoding, base64, HTML
with the sampled parameters of every tile). A new seed every repeat. Optionally (--page) also the
whole page rerun under Streamlit's AppTest (script, widgets, grid and code snippet).
Prints a table; asserts nothing (target: <= 200 ms for augment + grid).

    .venv/bin/python bench/bench_preview.py [--repeat 50] [--chain "..."] [--scale 2] [--page 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


TARGET_MS = 200.0
DEFAULT_CHAIN = "random_resized_crop;rotation:degrees=15;hue:strength=0.1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_grid(chain_text: str, repeat: int, warmup: int, scale: int, rows: int, cols: int):
    from cifar_core.augment import preview as pv
    from cifar_core.config import parse_chain

    xs, ys, _ = pv.sample()
    i = 60  # a cat (the page's default image)
    n = rows * cols
    aug, grid, total, size = [], [], [], 0
    for r in range(warmup + repeat):
        t0 = time.perf_counter()
        chain = pv.make_chain(parse_chain(chain_text))
        v = pv.run_variants(chain, xs[i], int(ys[i]), n, seed=r, pool_x=xs, pool_y=ys)
        t1 = time.perf_counter()
        body = pv.grid_html(v, cols, scale, captions=True, partner_tiles=xs, source_tile=xs[i])
        t2 = time.perf_counter()
        if r >= warmup:
            aug.append(1000 * (t1 - t0))
            grid.append(1000 * (t2 - t1))
            total.append(1000 * (t2 - t0))
            size = len(body)
    return aug, grid, total, size


def bench_page(repeat: int) -> list[float]:
    """Whole reruns of app_pages/5_Preview.py under AppTest (default chain, 8×8), new seed each time."""
    from streamlit.testing.v1 import AppTest
    page = str(Path(__file__).resolve().parents[1] / "app_pages" / "5_Preview.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    times = []
    for r in range(repeat):
        at.number_input(key="preview.seed").set_value(r + 1)
        t0 = time.perf_counter()
        at.run()
        times.append(1000 * (time.perf_counter() - t0))
        assert not at.exception, [e.value for e in at.exception]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chain", default=DEFAULT_CHAIN, help=f"the chain (CLI syntax), default {DEFAULT_CHAIN!r}")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scale", type=int, default=2, help="tile enlargement (the page's default is 2)")
    ap.add_argument("--grid", default="8x8", help="rows x cols (default 8x8 = 64 tiles)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--page", type=int, default=0, help="also time N whole-page reruns under AppTest")
    args = ap.parse_args()

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cols = (int(v) for v in args.grid.lower().split("x"))
    load = os.getloadavg()
    print(f"chain: {args.chain}")
    print(f"{rows * cols} tiles of one 32x32 image, tiles x{args.scale}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}")
    aug, grid, total, size = bench_grid(args.chain, args.repeat, args.warmup, args.scale, rows, cols)
    print(f"\n| {args.repeat} repeats | augment | grid (enlarge + PNG + HTML) | total (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, fn in (("median", statistics.median), ("p90", lambda v: percentile(v, 0.9)), ("max", max)):
        print(f"| {name} | {fn(aug):.1f} | {fn(grid):.1f} | {fn(total):.1f} |")
    print(f"\ngrid HTML: {size / 1024:.0f} KiB; target <= {TARGET_MS:.0f} ms: "
          f"{'met' if statistics.median(total) <= TARGET_MS else 'NOT met'} (median), "
          f"{'met' if percentile(total, 0.9) <= TARGET_MS else 'NOT met'} (p90)")
    if args.page:
        times = bench_page(args.page)
        print(f"whole page rerun under AppTest ({args.page} reruns, default chain, 8x8): median "
              f"{statistics.median(times):.0f} ms, p90 {percentile(times, 0.9):.0f} ms")


if __name__ == "__main__":
    main()
