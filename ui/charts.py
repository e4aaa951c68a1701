"""Altair charts for runs: training curves (one run or several overlaid), per-class accuracy,
confusion matrix. Builders return Altair charts and do not touch Streamlit except `curve_controls`
and `show_curves`, which draw the shared controls and the chart row.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from ui.live import MAX_POINTS, thin_index

# x axis choices: label -> metrics column
X_AXES = {"step": "step", "epoch": "epoch", "wall time": "elapsed"}
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e"}
CURVE_HEIGHT = 200
# height = the plot's own height; Streamlit's default ("fit") squeezes plots with titles and legends
FIT_X = {"type": "fit-x", "contains": "padding"}
METRICS = {
    # name: (train column, val column, axis title, axis format)
    "loss": ("train_loss", "val_loss", "loss", ".3~g"),
    "accuracy": ("train_acc", "val_acc", "accuracy", ".0%"),
    "learning rate": ("lr", None, "learning rate", "~g"),
}


def ema(values: pd.Series, weight: float) -> pd.Series:
    """Debiased exponential moving average (TensorBoard-style); weight 0 = no smoothing."""
    if weight <= 0 or values.empty:
        return values
    return values.ewm(alpha=1.0 - min(weight, 0.999), adjust=True, ignore_na=True).mean()


def _x_values(df: pd.DataFrame, x: str, minutes: bool) -> pd.Series:
    col = df[x] if x in df else pd.Series(np.nan, index=df.index)
    return col / 60.0 if (x == "elapsed" and minutes) else col


def _x_title(x: str, minutes: bool) -> str:
    if x == "elapsed":
        return "wall time (min)" if minutes else "wall time (s)"
    return x


@dataclass(frozen=True)
class CurveChart:
    """A Vega-Lite spec (authored with Altair once per layout, then cached) and its rows.

    Building and validating Altair objects costs tens of milliseconds per chart, far too much for a
    once-a-second refresh; only the rows change between refreshes, so the spec is made once per
    layout and the rows travel next to it (st.vega_lite_chart sends them as Arrow).
    """

    spec: dict
    data: pd.DataFrame

    def show(self, width="stretch") -> None:
        st.vega_lite_chart(self.data, copy.deepcopy(self.spec), width=width)


def curve_data(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str = "step",
               smoothing: float = 0.0, max_points: int = MAX_POINTS) -> tuple[dict[str, pd.DataFrame], str]:
    """{metric: long-form rows (run, split, kind, x, value)} for the curve charts, and the x title.

    The train series are smoothed on the full-resolution rows, then every series is thinned to at
    most `max_points` points. kind is "smoothed" (or the plain series when smoothing is 0) or "raw".
    """
    max_elapsed = 0.0
    for train, evl in frames.values():
        for df in (train, evl):
            if "elapsed" in df and len(df):
                m = df["elapsed"].max()
                if m == m:  # not NaN
                    max_elapsed = max(max_elapsed, float(m))
    minutes = x == "elapsed" and max_elapsed >= 600
    parts: dict[str, list] = {m: [] for m in METRICS}

    def add(metric, label, split, kind, xs: np.ndarray, values: np.ndarray):
        keep = ~(np.isnan(xs) | np.isnan(values))
        xs, values = xs[keep], values[keep]
        if len(xs) > max_points:
            idx = thin_index(len(xs), max_points)
            xs, values = xs[idx], values[idx]
        if len(xs):
            parts[metric].append((label, split, kind, xs, values))

    for label, (train, evl) in frames.items():
        if len(train):
            xs = _x_values(train, x, minutes).to_numpy(dtype=float)
            for metric, (tcol, _vcol, _t, _f) in METRICS.items():
                if tcol not in train:
                    continue
                series = train[tcol].astype(float)
                if metric != "learning rate" and smoothing > 0:
                    add(metric, label, "train", "smoothed", xs, ema(series, smoothing).to_numpy())
                    add(metric, label, "train", "raw", xs, series.to_numpy())
                else:
                    add(metric, label, "train", "smoothed", xs, series.to_numpy())
        if len(evl):
            xs = _x_values(evl, x, minutes).to_numpy(dtype=float)
            for metric, (_tcol, vcol, _t, _f) in METRICS.items():
                if vcol is not None and vcol in evl:
                    add(metric, label, "val", "smoothed", xs, evl[vcol].to_numpy(dtype=float))
    out = {}
    for metric, items in parts.items():
        if not items:
            continue
        sizes = [len(it[3]) for it in items]
        out[metric] = pd.DataFrame({
            "run": np.repeat(np.array([it[0] for it in items], dtype=object), sizes),
            "split": np.repeat(np.array([it[1] for it in items], dtype=object), sizes),
            "kind": np.repeat(np.array([it[2] for it in items], dtype=object), sizes),
            "x": np.concatenate([it[3] for it in items]),
            "value": np.concatenate([it[4] for it in items])})
    return out, _x_title(x, minutes)


@functools.lru_cache(maxsize=64)
def curve_spec(metric: str, x_title: str, multi_run: bool, has_raw: bool, has_val: bool,
               height: int = CURVE_HEIGHT) -> dict:
    """The Vega-Lite spec of one metric's curves (no data), authored with Altair."""
    _tcol, _vcol, y_title, y_format = METRICS[metric]
    if multi_run:
        color = alt.Color("run:N", title="run", scale=alt.Scale(scheme="tableau10"), legend=alt.Legend(
            orient="bottom", columns=2, labelLimit=260, symbolType="stroke", symbolOpacity=1,
            symbolStrokeWidth=2))
        dash = alt.StrokeDash("split:N", legend=None,  # explained by a caption under the charts
                              scale=alt.Scale(domain=["train", "val"], range=[[1, 0], [5, 3]]))
    else:
        splits = list(SPLIT_COLORS) if has_val else ["train"]
        color = alt.Color("split:N", title=None,
                          scale=alt.Scale(domain=splits, range=[SPLIT_COLORS[s] for s in splits]),
                          legend=alt.Legend(orient="top", direction="horizontal", symbolType="stroke",
                                            symbolOpacity=1, symbolStrokeWidth=2) if has_val else None)
        dash = alt.StrokeDash("split:N", legend=None,
                              scale=alt.Scale(domain=["train", "val"], range=[[1, 0], [1, 0]]))
    y_scale = alt.Scale(zero=False)
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("split:N"),
               alt.Tooltip("x:Q", title=x_title, format=",.4~g"),
               alt.Tooltip("value:Q", title=y_title, format=".4~g")]
    base = alt.Chart().encode(
        x=alt.X("x:Q", title=x_title),
        y=alt.Y("value:Q", title=y_title, scale=y_scale, axis=alt.Axis(format=y_format)),
        color=color, detail="run:N")
    layers = []
    if has_raw:
        layers.append(base.transform_filter(alt.datum.kind == "raw")
                      .mark_line(opacity=0.22, strokeWidth=1))
    layers.append(base.transform_filter((alt.datum.kind == "smoothed") & (alt.datum.split == "train"))
                  .mark_line(strokeWidth=1.8).encode(strokeDash=dash, tooltip=tooltip))
    if has_val:
        val = base.transform_filter(alt.datum.split == "val")
        layers.append(val.mark_line(strokeWidth=1.8).encode(strokeDash=dash))
        layers.append(val.mark_point(filled=True, size=28).encode(tooltip=tooltip))
    chart = alt.layer(*layers).properties(height=height, title=alt.Title(y_title, fontSize=13))
    spec = chart.to_dict()
    spec.pop("config", None)  # Altair's default theme sizes; Streamlit applies its own theme
    # Altair gives data-less charts a placeholder dataset; the layers must use the rows that
    # st.vega_lite_chart sends as the top-level data instead
    spec.pop("datasets", None)
    for layer in spec["layer"]:
        layer.pop("data", None)
    spec["autosize"] = dict(FIT_X)
    return spec


def curve_charts(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str = "step",
                 smoothing: float = 0.0, max_points: int = MAX_POINTS,
                 heights: dict[str, int] | None = None) -> dict[str, CurveChart]:
    """{metric: chart} for loss, accuracy and learning rate (those with data)."""
    data, x_title = curve_data(frames, x, smoothing, max_points)
    multi = len(frames) > 1
    heights = {"learning rate": 110, **(heights or {})}
    out = {}
    for metric, rows in data.items():
        spec = curve_spec(metric, x_title, multi, bool((rows["kind"] == "raw").any()),
                          bool((rows["split"] == "val").any()), heights.get(metric, CURVE_HEIGHT))
        out[metric] = CurveChart(spec, rows)
    return out


def curve_controls(key: str) -> tuple[str, float]:
    """x-axis choice and smoothing weight, drawn side by side. Returns (metrics column, weight)."""
    left, right = st.columns([3, 2])
    with left:
        label = st.radio("x axis", list(X_AXES), horizontal=True, key=f"{key}_x")
    with right:
        weight = st.slider("Smoothing (EMA of train curves)", 0.0, 0.99, 0.6, 0.01, key=f"{key}_smooth",
                           help="0 = raw values. The raw train series stays visible, faint.")
    return X_AXES[label or "step"], float(weight)


def show_curves(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str, smoothing: float,
                empty_message: str = "No metrics yet.") -> None:
    charts = curve_charts(frames, x, smoothing)
    if not charts:
        st.info(empty_message)
        return
    top = [m for m in ("loss", "accuracy") if m in charts]
    for col, metric in zip(st.columns(len(top)) if top else [], top):
        with col:
            charts[metric].show()
    if "learning rate" in charts:
        charts["learning rate"].show()
    if len(frames) > 1:
        st.caption("Solid lines: training (smoothed; faint: raw). Dashed lines with dots: validation.")


def per_class_chart(per_class: dict[str, dict[str, float]], height: int = 200) -> alt.Chart | None:
    """Per-class accuracy bars; several runs side by side (grouped) when more than one label."""
    rows = [{"run": label, "class": cls, "acc": float(acc)}
            for label, accs in per_class.items() if accs
            for cls, acc in accs.items() if isinstance(acc, (int, float))]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    classes = list(dict.fromkeys(df["class"]))
    multi = df["run"].nunique() > 1
    enc = {
        "x": alt.X("class:N", sort=classes, title=None, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        "y": alt.Y("acc:Q", title="test accuracy", scale=alt.Scale(domain=[0, 1]),
                   axis=alt.Axis(format=".0%")),
        "tooltip": [alt.Tooltip("run:N"), alt.Tooltip("class:N"), alt.Tooltip("acc:Q", format=".2%")],
    }
    if multi:
        enc["xOffset"] = alt.XOffset("run:N")
        enc["color"] = alt.Color("run:N", scale=alt.Scale(scheme="tableau10"),
                                 legend=alt.Legend(orient="bottom", columns=2, labelLimit=260))
    else:
        enc["color"] = alt.value("#1f77b4")
    bars = alt.Chart(df).mark_bar().encode(**enc)
    if not multi:
        text = alt.Chart(df).mark_text(dy=-6, fontSize=10).encode(
            x=enc["x"], y=enc["y"], text=alt.Text("acc:Q", format=".0%"))
        return alt.layer(bars, text).properties(height=height, autosize=FIT_X)
    return bars.properties(height=height, autosize=FIT_X)


def confusion_chart(matrix, classes: list[str], size: int = 380) -> alt.LayerChart | None:
    """Heatmap of a confusion matrix (rows: true class, columns: predicted) with the counts."""
    cm = np.asarray(matrix, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        return None
    n = cm.shape[0]
    classes = list(classes) if classes and len(classes) == n else [str(i) for i in range(n)]
    totals = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, np.maximum(totals, 1))
    ti, pi = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    df = pd.DataFrame({"true": np.asarray(classes)[ti.ravel()], "predicted": np.asarray(classes)[pi.ravel()],
                       "count": cm.ravel().astype(int), "rate": rate.ravel()})
    x = alt.X("predicted:N", sort=classes, title="predicted", axis=alt.Axis(labelAngle=-90, labelOverlap=False))
    y = alt.Y("true:N", sort=classes, title="true class")
    heat = alt.Chart(df).mark_rect().encode(
        x=x, y=y,
        color=alt.Color("rate:Q", title="row share", scale=alt.Scale(scheme="blues", domain=[0, 1]),
                        legend=alt.Legend(format=".0%", orient="right")),
        tooltip=[alt.Tooltip("true:N"), alt.Tooltip("predicted:N"), alt.Tooltip("count:Q", format=","),
                 alt.Tooltip("rate:Q", format=".1%")])
    text = alt.Chart(df).mark_text(fontSize=10).encode(
        x=x, y=y, text=alt.Text("count:Q", format="d"),
        color=alt.condition(alt.datum.rate > 0.5, alt.value("white"), alt.value("#333")))
    return alt.layer(heat, text).properties(width=size, height=size)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"
