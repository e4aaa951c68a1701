"""Time from clicking Launch on the Train page to the first metric point on the Runs page.

Real headless Chromium (Debian's package) + a real `streamlit run app.py` + the real job supervisor,
on the "tiny (smoke test)" preset. Prints one line per repetition and the median.

    PYTHONPATH=. .venv/bin/python bench/bench_launch.py --data ../shared/data/cifar10 --repeat 3
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote


from tests.streamlit_server import CHROMIUM, CHROMIUM_ARGS, Server, free_port


def one_launch(page, base: str) -> tuple[float, float]:
    page.goto(f"{base}/Train?preset={quote('tiny (smoke test)')}")
    launch = page.get_by_role("button", name=re.compile("Launch"))
    launch.wait_for()
    page.wait_for_timeout(1000)
    clicked = time.perf_counter()
    launch.click()
    page.wait_for_url(re.compile(r".*/Runs.*"))
    on_runs = time.perf_counter() - clicked
    page.get_by_text(re.compile(r"step [1-9][\d,]* / ")).first.wait_for(timeout=120_000)
    return on_runs, time.perf_counter() - clicked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("CIFAR10_NPZ", "../shared/data/cifar10"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    runs = Path(tempfile.mkdtemp(prefix="bench_launch_")) / "runs"
    env = {**os.environ, "CIFAR_LAB_RUNS": str(runs), "CIFAR10_NPZ": str(Path(args.data).resolve())}
    server = Server(env, free_port())
    server.start()
    totals = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(60_000)
            for i in range(args.repeat):
                on_runs, first_metric = one_launch(page, f"http://127.0.0.1:{server.port}")
                totals.append(first_metric)
                print(f"launch {i + 1}: live view after {on_runs:.2f} s, first metric point after "
                      f"{first_metric:.2f} s", flush=True)
                page.wait_for_timeout(8000)  # let the tiny run finish so the next one gets the slot
            browser.close()
    finally:
        server.stop()
        subprocess.run(["pkill", "-f", "--", f"--runs-root {runs} worker"])
    print(f"median time from Launch to the first metric point: {statistics.median(totals):.2f} s "
          f"({len(totals)} launches, tiny preset)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
