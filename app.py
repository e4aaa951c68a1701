"""CIFAR-10 Lab — home: data, device, the job queue at a glance, and the way to every page."""
from __future__ import annotations

import streamlit as st

from cifar_core import jobs
from cifar_core.params import ConfigError
from ui.common import clear_data_status, data_status, device_info, friendly_errors, get_store

st.set_page_config(page_title="CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("CIFAR-10 Lab")
st.caption("Explore what really makes a CIFAR-10 classifier work: real data, real background "
           "training jobs, honest numbers.")

store = get_store()
data_col, device_col, jobs_col = st.columns(3)

with data_col:
    st.subheader("Dataset")
    status = data_status()
    if status["ok"]:
        st.success(f"CIFAR-10 found: {status['train']:,} training and {status['test']:,} test images")
        st.caption(f"from {status['origin']}")
    else:
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

with device_col:
    st.subheader("Device")
    info = device_info()
    if info["kind"] == "cuda":
        st.success(f"GPU: {info['name']} ({info['memory_gib']:.0f} GiB)")
    else:
        st.info(f"{info['name']}: no CUDA GPU, training runs on the CPU")
    limits = jobs.slots()
    st.caption(f"Concurrent jobs: {limits['cpu']} on the CPU, {limits['cuda']} on the GPU "
               "(CIFAR_LAB_SLOTS_CPU / CIFAR_LAB_SLOTS_CUDA)")

with jobs_col:
    st.subheader("Runs")
    with friendly_errors("Reading the runs folder"):
        jobs.reconcile(store)
        table = jobs.job_table(store)
        running = len(table.get("running", [])) + len(table.get("starting", []))
        a, b, c = st.columns(3)
        a.metric("running", running)
        b.metric("queued", len(table.get("queued", [])))
        c.metric("finished", sum(len(table.get(s, [])) for s in ("completed", "failed", "cancelled")))
        st.caption(f"runs folder: {store.root.resolve()}")

st.divider()
st.subheader("Pages")
for path, label, text in (
    ("pages/1_Train.py", "Train", "launch a run with any mix of tricks, from presets or from scratch"),
    ("pages/2_Runs.py", "Runs", "the queue, live curves, final metrics, confusion matrices"),
    ("pages/3_Compare.py", "Compare", "overlay runs, diff their configs, compare final metrics"),
    ("pages/4_Studies.py", "Studies", "one-click studies: BN vs GN, samplers on imbalanced data, trick ablation"),
    ("pages/5_Preview.py", "Augmentation previewer", "every augmentation, live on real images or your own, "
                                                      "with the parameters each tile drew"),
    ("pages/6_Classify.py", "Classify", "your own photos through a shipped or exported ONNX model"),
):
    st.page_link(path, label=f"**{label}** — {text}")
