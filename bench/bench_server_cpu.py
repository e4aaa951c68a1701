"""CPU the Streamlit server uses while a run streams and a browser shows it on the Runs page.

A real `streamlit run app.py` (the flags of `make run`), a real headless Chromium on
`/Runs?run=<id>`, and a run whose metrics.jsonl grows as a training run's does: a small writer
process appends a train line every `--interval` seconds (an eval line every 20) and owns the run's
pid, so the page treats it as live. The writer stands in for the trainer so that its own CPU does not
compete with the server's on a small machine; what is measured is the server process's CPU time
(user + system, from /proc) over `--seconds`, with no browser and then with the Runs page open, for
three server settings: today's (.streamlit/config.toml: no file watcher, no forced gc.collect(2) after
every rerun), the watcher off but Streamlit's post-run GC on (the last session's `make run`), and
both on (`make run` before issue 13; the runs root then sits inside the repository, where the old
default `runs/` was, so the watcher sees it).

    PYTHONPATH=. .venv/bin/python bench/bench_server_cpu.py [--seconds 60] [--interval 0.25] [--only-now]

Prints a table; asserts nothing (target: <= 5% of one core with the Runs page open).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from cifar_core.config import RunConfig
from cifar_core.processes import process_start_time
from cifar_core.runs import RunStore
from tests.streamlit_server import CHROMIUM, CHROMIUM_ARGS, REPO, Server, free_port

TARGET_PERCENT = 5.0
RUN_ID = "streaming-run"

WRITER = textwrap.dedent("""
    import json, sys, time
    metrics, interval = sys.argv[1], float(sys.argv[2])
    t0 = time.time()
    step = 0
    while True:
        step += 1
        now = time.time()
        row = {"kind": "train", "step": step, "epoch": step / 100, "train_loss": 2.3 / (1 + step / 300),
               "train_acc": min(0.99, step / 3000), "lr": 0.05, "grad_norm": 1.0, "images_per_s": 900.0,
               "elapsed": now - t0, "time": now}
        lines = [row]
        if step % 20 == 0:
            lines.append({"kind": "eval", "step": step, "epoch": step / 100, "val_loss": 1.8 / (1 + step / 500),
                          "val_acc": min(0.95, step / 3500), "eval_split": "val", "elapsed": now - t0})
        with open(metrics, "a") as fh:
            fh.write("".join(json.dumps(r) + "\\n" for r in lines))
        time.sleep(interval)
""")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def start_streaming_run(root: Path, interval: float) -> subprocess.Popen:
    store = RunStore(root)
    record = store.create(RunConfig(name="streaming", epochs=50).validated(), run_id=RUN_ID)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(record.metrics_path), str(interval)])
    record.update_status(state="running", pid=writer.pid, pid_start=process_start_time(writer.pid),
                         started=time.time(), total_steps=5000, steps_per_epoch=100)
    return writer


def measure(server: Server, seconds: float) -> float:
    """Percent of one core the server used over `seconds`."""
    pid = server.proc.pid
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)


SETTINGS = {
    # label: (file watcher, extra streamlit flags)
    "now: no watcher, no post-run GC": ("none", ()),
    "no watcher, post-run GC": ("none", ("--runner.postScriptGC", "true")),
    "before: watcher auto, post-run GC": ("auto", ("--runner.postScriptGC", "true")),
}


def phase(root: Path, setting: str, seconds: float, interval: float, browser, shots: Path) -> tuple[float, float]:
    """(server CPU % with no browser, with the Runs page open) for one server setting."""
    watcher, extra = SETTINGS[setting]
    writer = start_streaming_run(root, interval)
    env = {**os.environ, "CIFAR_LAB_RUNS": str(root)}
    server = Server(env, free_port(), watcher=watcher, extra_args=extra)
    server.start()
    try:
        time.sleep(10)  # start-up settles
        idle = measure(server, seconds)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{server.port}/Runs?run={RUN_ID}")
        page.get_by_text("step", exact=False).first.wait_for()
        time.sleep(10)  # the page's first full read and chart build
        live = measure(server, seconds)
        page.screenshot(path=str(shots / f"runs-page-{list(SETTINGS).index(setting)}.png"))
        page.close()
        return idle, live
    finally:
        server.stop()
        writer.kill()
        writer.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measurement")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between metric lines")
    parser.add_argument("--only-now", action="store_true", help="only today's setting")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    outside = Path(tempfile.mkdtemp(prefix="bench_server_cpu_"))
    inside = Path(tempfile.mkdtemp(prefix=".bench_server_cpu_", dir=REPO / "runs"
                                   if (REPO / "runs").is_dir() else REPO))
    rows = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for i, setting in enumerate(list(SETTINGS)[:1] if args.only_now else SETTINGS):
                root = (inside if SETTINGS[setting][0] == "auto" else outside) / f"runs{i}"
                rows.append((setting, *phase(root, setting, args.seconds, args.interval, browser, outside)))
            browser.close()
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    print(f"server CPU, % of one core, over {args.seconds:.0f} s, a metric line every {args.interval} s")
    print("| server setting | no browser | Runs page open |")
    print("| --- | ---: | ---: |")
    for name, idle, live in rows:
        print(f"| {name} | {idle:.1f} | {live:.1f} |")
    print(f"target <= {TARGET_PERCENT:.0f}% with the Runs page open (today's setting): "
          + ("met" if rows[0][2] <= TARGET_PERCENT else "NOT met"))
    print(f"screenshots: {outside}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
