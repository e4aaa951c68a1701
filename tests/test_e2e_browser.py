"""End to end in a real headless Chromium (Debian's package) driven by Playwright.

Starts `streamlit run app.py` on a loopback port with a temporary runs folder, launches a training
from the Train page, watches its curve grow on the Runs page, queues two more, cancels one, restarts
the Streamlit server and checks the remaining run is still tracked.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from urllib.parse import quote

import pytest

from cifar_core import jobs
from cifar_core.runs import RunStore
from tests.streamlit_server import Server, chromium_page, free_port, require_chromium

require_chromium()


@pytest.fixture
def lab(tmp_path, cifar_npz):
    runs = tmp_path / "runs"
    env = {**os.environ, "CIFAR_LAB_RUNS": str(runs), "CIFAR10_NPZ": str(cifar_npz),
           "CIFAR_LAB_SLOTS_CPU": "1", "CIFAR_LAB_CANCEL_GRACE": "10", "CIFAR_LAB_WORKER_IDLE": "20",
           "PYTHONUNBUFFERED": "1"}
    server = Server(env, free_port())
    server.start()
    store = RunStore(runs)
    yield server, store
    server.stop()
    for record in store.records():
        status = record.status()
        if jobs.process_alive(status.get("pid"), status.get("pid_start")):
            os.killpg(status["pid"], signal.SIGKILL)
    subprocess.run(["pkill", "-f", "--", f"--runs-root {runs} worker"])


def progress_step(page) -> int:
    """The step number of the live view's progress text ('step 12 / 80 · ...')."""
    text = page.get_by_text(re.compile(r"step [\d,]+ / [\d,]+")).first.inner_text(timeout=60_000)
    return int(re.search(r"step ([\d,]+) /", text).group(1).replace(",", ""))


def launch_from_train_page(page, base: str, epochs: int) -> None:
    page.goto(f"{base}/Train?preset={quote('tiny (smoke test)')}")
    epochs_input = page.get_by_label("Epochs", exact=True)
    epochs_input.wait_for(timeout=60_000)
    epochs_input.fill(str(epochs))
    epochs_input.press("Enter")
    page.wait_for_timeout(1500)  # the form reruns and re-validates
    confirm = page.get_by_text(re.compile("I understand this run takes about"))
    if confirm.count():  # a busy machine can make even this run's estimate long
        confirm.first.click()
        page.wait_for_timeout(1000)
    launch = page.get_by_role("button", name=re.compile("Launch"))
    launch.click()
    page.wait_for_url(re.compile(r".*/Runs.*"), timeout=60_000)


def wait_state(store: RunStore, run_id: str, wanted: str, timeout: float = 120) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if store.record(run_id).state() == wanted:
            return True
        time.sleep(0.3)
    return False


def test_launch_watch_queue_cancel_restart(lab, tmp_path):
    server, store = lab
    base = f"http://127.0.0.1:{server.port}"
    with chromium_page(1400, 1600) as page:
        # 1. launch a training from the Train page; the app takes us to its live view
        launch_from_train_page(page, base, epochs=60)
        assert len(store.ids()) == 1
        first = store.ids()[0]
        assert f"run={first}" in page.url

        # 2. the curve appears and grows, without reloading the page
        start = time.time()
        first_step = 0
        while time.time() - start < 120 and first_step < 1:
            first_step = progress_step(page)
            page.wait_for_timeout(500)
        assert first_step >= 1
        page.locator("[data-testid='stVegaLiteChart'], .vega-embed").first.wait_for(timeout=60_000)
        grown = first_step
        deadline = time.time() + 60
        while time.time() < deadline and grown <= first_step:
            page.wait_for_timeout(1000)
            grown = progress_step(page)
        assert grown > first_step, "the live view did not update"
        page.screenshot(path=str(tmp_path / "runs_live.png"))

        # 3. launch two more: the CPU slot is taken, so they wait in the queue
        launch_from_train_page(page, base, epochs=60)
        launch_from_train_page(page, base, epochs=60)
        ids = store.ids()
        assert len(ids) == 3
        others = sorted((i for i in ids if i != first), key=lambda i: store.record(i).status()["created"])
        assert store.record(first).state() == "running"
        assert [store.record(i).state() for i in others] == ["queued", "queued"]
        page.goto(f"{base}/Runs")
        page.get_by_text("queued").first.wait_for()

        # 4. cancel the running one from its live view: cancelled, process gone, queue moves on
        pid = store.record(first).status()["pid"]
        page.goto(f"{base}/Runs?run={first}")
        page.get_by_role("button", name=re.compile("Cancel run")).click()
        assert wait_state(store, first, "cancelled", timeout=60)
        end = time.time() + 30
        while time.time() < end and jobs.process_alive(pid):
            time.sleep(0.3)
        assert not jobs.process_alive(pid), "the cancelled training process is still alive"
        page.get_by_text("cancelled").first.wait_for()
        second = others[0]
        assert wait_state(store, second, "running", timeout=120)

        # 5. restart the Streamlit server: the running job keeps going and is still tracked
        server.stop()
        server.start()
        page.goto(f"{base}/Runs?run={second}")
        page.get_by_text("running").first.wait_for()
        step_a = progress_step(page)
        deadline = time.time() + 60
        step_b = step_a
        while time.time() < deadline and step_b <= step_a:
            page.wait_for_timeout(1000)
            step_b = progress_step(page)
        assert step_b > step_a
        assert store.record(second).state() == "running"
        page.screenshot(path=str(tmp_path / "runs_after_restart.png"))


def test_a_bookmarked_page_on_a_fresh_server_gets_the_declared_navigation(lab):
    """The first visit after the server starts is a deep link: Streamlit must run app.py's st.navigation
    (Home first, the declared titles), not its legacy navigation built from a `pages/` folder, which would
    run the page without the app's frame and list "app" and the files in name order."""
    server, _ = lab
    with chromium_page(1300, 900) as page:
        page.goto(f"http://127.0.0.1:{server.port}/Search")
        page.get_by_role("heading", name="Search").first.wait_for(timeout=60_000)
        nav = page.get_by_test_id("stSidebarNav")
        nav.wait_for(timeout=60_000)
        entries = [line.strip() for line in nav.inner_text().splitlines() if line.strip()]
        assert "Home" in entries and "app" not in entries, entries
        titles = [e for e in entries if e in ("Home", "Train", "Search", "Active learning", "Classify")]
        assert titles == ["Home", "Train", "Search", "Active learning", "Classify"], entries  # app.py's order
