"""View helpers of the Active learning page (app_pages/9_Active_learning.py): the learning-curve chart, the
picked images, the class balance of a batch and the labelling controls. Nothing here runs a loop: that
is cifar_core.experiments.active_loop."""
from __future__ import annotations

from typing import Callable

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from cifar_core.data import CLASSES
from cifar_core.images import enlarge

ZOOM = 8  # the image being labelled is shown at 32 × ZOOM pixels, each pixel a crisp square
GRID_COLUMNS = 10
STATE_BOXES = {"training": st.info, "scoring": st.info, "awaiting labels": st.warning, "completed": st.success,
               "failed": st.error, "stopped": st.warning}


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def state_box(state: str, text: str) -> None:
    STATE_BOXES.get(state, st.info)(text)


def curves_chart(rows: list[dict], height: int = 340):
    """Test accuracy against the number of labels, one line per group of loops (strategy and settings),
    with a ± std band where a group repeats over seeds; None before any round finished."""
    if not rows:
        return None
    data = pd.DataFrame(rows)
    data["low"] = data["mean"] - data["std"].fillna(0.0)
    data["high"] = data["mean"] + data["std"].fillna(0.0)
    # labelExpr: the streamlit theme shows the axis' "," format as 1e+3; tableau10: distinct hues per strategy
    x = alt.X("labels:Q", title="labeled images", axis=alt.Axis(labelExpr="format(datum.value, ',')"))
    color = alt.Color("group:N", title="strategy", scale=alt.Scale(scheme="tableau10"))
    tooltip = ["group:N", alt.Tooltip("labels:Q", format=","), alt.Tooltip("mean:Q", format=".2%", title="test acc"),
               alt.Tooltip("std:Q", format=".2%", title="std over seeds"), alt.Tooltip("n:Q", title="loops")]
    band = alt.Chart(data[data["n"] > 1]).mark_area(opacity=0.2).encode(x=x, y="low:Q", y2="high:Q", color=color)
    lines = alt.Chart(data).mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title="test accuracy", axis=alt.Axis(format=".1%"), scale=alt.Scale(zero=False)),
        color=color, tooltip=tooltip)
    return (band + lines).properties(height=height)


def curve_table(curve: list[dict], runs_url: str) -> None:
    """One row per finished round: labels, test accuracy and its run (a link to the Runs page)."""
    frame = pd.DataFrame(curve, columns=["round", "labels", "test_acc", "run_id"])
    frame["test_acc"] = 100 * frame["test_acc"]
    frame["open"] = [f"{runs_url}?run={rid}" for rid in frame["run_id"]]
    st.dataframe(frame, hide_index=True, width="stretch", column_config={
        "test_acc": st.column_config.NumberColumn("test acc", format="%.2f %%"),
        "labels": st.column_config.NumberColumn("labeled images", format="%d"),
        "run_id": st.column_config.TextColumn("run id"),
        "open": st.column_config.LinkColumn("Runs page", display_text="open ↗")})


def class_balance_chart(counts: dict[str, int], height: int = 220):
    """How many picked images each class got (by CIFAR-10's labels)."""
    data = pd.DataFrame({"class": list(counts), "images": list(counts.values())})
    return alt.Chart(data).mark_bar(color="#4c78a8").encode(
        x=alt.X("class:N", sort=list(counts), title=None, axis=alt.Axis(labelAngle=-45)),
        y=alt.Y("images:Q", title="picked images"), tooltip=["class:N", "images:Q"]).properties(height=height)


def score_text(score) -> str:
    return "—" if score is None else f"{score:.3g}"


def image_grid(images: np.ndarray, captions: list[str], columns: int = GRID_COLUMNS) -> None:
    """Small images in rows of `columns`, each with its caption."""
    for start in range(0, len(images), columns):
        cells = st.columns(columns)
        for cell, image, caption in zip(cells, images[start:start + columns], captions[start:start + columns]):
            cell.image(image, caption=caption, width="stretch", clamp=True)


def large_image(image: np.ndarray, caption: str) -> None:
    """One image blown up by nearest neighbour (a browser would blur a small image scaled up)."""
    st.image(enlarge(image, ZOOM), caption=caption)


def class_buttons(key: str, on_pick: Callable[[int], None], chosen: int | None) -> None:
    """Ten buttons, one per class, with the keys 0–9 as shortcuts; the current label is highlighted."""
    rows = (range(0, 5), range(5, 10))
    for row in rows:
        for col, c in zip(st.columns(len(row)), row):
            col.button(f"{c} · {CLASSES[c]}", key=f"{key}.{c}", shortcut=str(c), width="stretch",
                       type="primary" if chosen == c else "secondary", on_click=on_pick, args=(c,))


def agreement_table(rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    frame["human"] = [CLASSES[c] for c in frame["human"]]
    frame["cifar10"] = [CLASSES[c] for c in frame["cifar10"]]
    st.dataframe(frame, hide_index=True, width="stretch", height=min(38 + 35 * len(frame), 400),
                 column_config={"index": st.column_config.NumberColumn("training image", format="%d"),
                                "human": "your label", "cifar10": "CIFAR-10's label"})
