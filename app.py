"""CIFAR-10 Lab: the app's frame. `st.navigation` declares every page (the sidebar lists them, Home
first); Home shows the data, the device, the job queue at a glance and the way to every page."""
from __future__ import annotations

import streamlit as st

from cifar_core import jobs
from cifar_core.params import ConfigError
from cifar_core.runs import FINAL_STATES
from ui.common import clear_data_status, data_status, device_info, friendly_errors, get_store

# (file, title, url path, icon, what it is for): the URLs are part of the app's interface (links,
# bookmarks, the browser tests)
PAGES = (
    ("app_pages/1_Train.py", "Train", "Train", ":material/model_training:",
     "launch a run with any mix of tricks, from presets or from scratch"),
    ("app_pages/2_Runs.py", "Runs", "Runs", ":material/monitoring:",
     "the queue, live curves, final metrics, confusion matrices"),
    ("app_pages/3_Compare.py", "Compare", "Compare", ":material/compare_arrows:",
     "overlay runs, diff their configs, compare final metrics"),
    ("app_pages/4_Studies.py", "Studies", "Studies", ":material/science:",
     "one-click studies: BN vs GN, samplers on imbalanced data, trick ablation"),
    ("app_pages/8_Search.py", "Search", "Search", ":material/travel_explore:",
     "AutoML over the tricks: an Optuna search whose trials are background runs, followed live, with "
     "pruning, parameter importances and the best config trained fully"),
    ("app_pages/9_Active_learning.py", "Active learning", "Active_learning", ":material/touch_app:",
     "which images are worth labelling: query strategies in rounds of training, learning curves per "
     "strategy, and labelling the picked images yourself"),
    ("app_pages/7_Imbalance.py", "Imbalance", "Imbalance", ":material/balance:",
     "the class-imbalance lab: imbalanced training sets, balancing strategies side by side, threshold "
     "moving on any finished run, cRT and EasyEnsemble"),
    ("app_pages/5_Preview.py", "Preview", "Preview", ":material/auto_awesome_mosaic:",
     "the augmentation previewer: every augmentation, live on real images or your own, with the "
     "parameters each tile drew"),
    ("app_pages/6_Classify.py", "Classify", "Classify", ":material/image_search:",
     "your own photos through a shipped or exported ONNX model"),
)


def data_section() -> None:
    st.subheader("Dataset")
    status = data_status()
    if status["ok"]:
        st.success(f"CIFAR-10 found: {status['train']:,} training and {status['test']:,} test images")
        st.caption(f"from {status['origin']}")
        return
    st.warning(status["message"])
    if st.button("Download CIFAR-10 (about 170 MB, needs internet)"):
        bar = st.progress(0.0, text="starting download…")
        with friendly_errors("The download"):
            from cifar_core.data import load_cifar10
            try:
                load_cifar10(download=True,
                             progress=lambda frac, msg="": bar.progress(min(1.0, max(0.0, frac)), text=msg))
                clear_data_status()
                st.rerun()
            except ConfigError:
                raise
            except OSError as exc:
                raise ConfigError(f"download failed ({exc}); on an offline machine set CIFAR10_NPZ "
                                  "to a Keras-layout .npz or to the offline CIFAR-10 folder") from None


def device_section() -> None:
    st.subheader("Device")
    info = device_info()
    if info["kind"] == "cuda":
        st.success(f"GPU: {info['name']} ({info['memory_gib']:.0f} GiB)")
    else:
        st.info(f"{info['name']}: no CUDA GPU, training runs on the CPU")
    limits = jobs.slots()
    st.caption(f"Concurrent jobs: {limits['cpu']} on the CPU, {limits['cuda']} on the GPU "
               "(CIFAR_LAB_SLOTS_CPU / CIFAR_LAB_SLOTS_CUDA)")


def runs_section(store) -> None:
    st.subheader("Runs")
    with friendly_errors("Reading the runs folder"):
        jobs.refresh(store)
        table = jobs.job_table(store)
        a, b, c = st.columns(3)
        a.metric("running", sum(len(table.get(s, [])) for s in jobs.ACTIVE_STATES))
        b.metric("queued", len(table.get("queued", [])))
        c.metric("finished", sum(len(table.get(s, [])) for s in FINAL_STATES))
        st.caption(f"runs folder: {store.root.resolve()}")


def home() -> None:
    st.title("CIFAR-10 Lab")
    st.caption("Explore what really makes a CIFAR-10 classifier work: real data, real background "
               "training jobs, honest numbers.")
    data_col, device_col, jobs_col = st.columns(3)
    with data_col:
        data_section()
    with device_col:
        device_section()
    with jobs_col:
        runs_section(get_store())
    st.divider()
    st.subheader("Pages")
    for path, title, _url, icon, text in PAGES:
        st.page_link(path, label=f"**{title}** — {text}", icon=icon)


st.set_page_config(page_title="CIFAR-10 Lab", page_icon="🧪", layout="wide")
navigation = st.navigation(
    [st.Page(home, title="Home", icon=":material/home:", default=True)]
    + [st.Page(path, title=title, icon=icon, url_path=url) for path, title, url, icon, _text in PAGES])
navigation.run()
