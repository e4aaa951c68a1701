"""The curve charts' data and Vega-Lite specs, checked without a browser (issue 13, app item 3): a
one-step run draws markers on every series and a non-empty LR chart, step axes have integer ticks,
tick labels do not repeat, the loss can use a log scale, and clipping keeps one diverging run from
flattening the others."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ui import charts


def one_step_run() -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the tiny preset leaves: one train row and one eval row, both at step 1."""
    train = pd.DataFrame({"step": [1.0], "epoch": [0.02], "train_loss": [2.31], "train_acc": [0.117],
                          "lr": [0.05], "elapsed": [0.8]})
    evl = pd.DataFrame({"step": [1.0], "epoch": [0.02], "val_loss": [2.30], "val_acc": [0.121], "elapsed": [0.9]})
    return train, evl


def run(steps: int, start: float = 2.3, end: float = 0.5, every: int = 1, diverge_from: int | None = None):
    s = np.arange(every, steps + 1, every, dtype=float)
    loss = start + (end - start) * s / steps
    if diverge_from is not None:
        loss = np.where(s >= diverge_from, 7e6, loss)
    train = pd.DataFrame({"step": s, "epoch": s / 10, "train_loss": loss, "train_acc": 0.1 + 0.8 * s / steps,
                          "lr": 0.1 * (1 - s / steps), "elapsed": s * 0.5})
    evl = pd.DataFrame({"step": s[::10], "epoch": s[::10] / 10, "val_loss": loss[::10],
                        "val_acc": 0.1 + 0.7 * s[::10] / steps, "elapsed": s[::10] * 0.5})
    return train, evl


def point_layers(spec: dict) -> list[dict]:
    return [layer for layer in spec["layer"] if layer["mark"]["type"] == "point"]


def train_marker_layer(spec: dict) -> dict:
    """The point layer of the train series (its filters mention split 'train')."""
    found = [layer for layer in point_layers(spec) if any("'train'" in str(t.get("filter")) for t in layer["transform"])]
    assert len(found) == 1, "no marker layer for the train series"
    return found[0]


def test_a_single_step_run_draws_both_series_with_markers():
    charts.curve_spec.cache_clear()
    out = charts.curve_charts({"tiny": one_step_run()}, x="step", smoothing=0.6)
    for metric in ("loss", "accuracy"):
        rows, spec = out[metric].data, out[metric].spec
        train = rows[(rows["split"] == "train") & (rows["kind"] == "smoothed")]
        assert len(train) == 1 and bool(train["points"].iloc[0]), "the one train point is not marked"
        layer = train_marker_layer(spec)
        assert {"filter": "datum.points"} in layer["transform"]
        assert any("'val'" in str(layer.get("transform")) for layer in point_layers(spec))
    # a long series gets no markers: its rows say points=False
    long = charts.curve_charts({"long": run(500)}, x="step")["loss"].data
    assert not long[long["split"] == "train"]["points"].any()


def test_the_lr_chart_of_one_step_shows_its_point():
    lr = charts.curve_charts({"tiny": one_step_run()}, x="step")["learning rate"]
    assert len(lr.data) == 1 and bool(lr.data["points"].iloc[0])
    assert train_marker_layer(lr.spec)  # a line alone draws nothing for one point


def test_integer_x_axes_get_integer_ticks():
    spec = charts.curve_charts({"tiny": one_step_run()}, x="step")["loss"].spec
    axis = spec["layer"][0]["encoding"]["x"]["axis"]
    assert axis["format"].endswith("d") and axis["tickMinStep"] == 1
    spec = charts.curve_charts({"r": run(100)}, x="epoch")["loss"].spec  # 10 epochs
    assert spec["layer"][0]["encoding"]["x"]["axis"]["format"].endswith("d")
    spec = charts.curve_charts({"r": run(100)}, x="elapsed")["loss"].spec  # wall time is not an integer axis
    axis = spec["layer"][0]["encoding"]["x"]["axis"]
    assert not axis["format"].endswith("d") and "tickMinStep" not in axis


def tick_labels(lo: float, hi: float, fmt: str) -> list[str]:
    """The labels Vega would print: ticks tick_step apart over [lo, hi], formatted like d3 does."""
    step = charts.tick_step(lo, hi)
    ticks = np.arange(math.ceil(lo / step) * step, hi + step / 2, step)
    decimals = int(fmt.strip(",.%f"))
    if fmt.endswith("%"):
        return [f"{100 * t:.{decimals}f}%" for t in ticks]
    return [f"{t:.{decimals}f}" for t in ticks]


@pytest.mark.parametrize("lo, hi, percent", [(0.115, 0.125, True), (0.5, 0.9, True), (0.112, 0.1135, True),
                                             (2.30, 2.34, False), (0.001, 0.0013, False), (0.0, 2.5, False)])
def test_tick_labels_do_not_repeat(lo, hi, percent):
    fmt = charts.axis_format(lo, hi, percent=percent)
    labels = tick_labels(lo, hi, fmt)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), (fmt, labels)


def test_the_one_step_accuracy_axis_has_distinct_ticks():
    acc = charts.curve_charts({"tiny": one_step_run()}, x="step")["accuracy"]
    y = acc.spec["layer"][0]["encoding"]["y"]
    assert y["axis"]["format"] == ".1%" and y["axis"]["tickCount"] == charts.TICK_COUNT
    assert y["scale"]["nice"] is True
    lo, hi = 0.117, 0.121
    labels = tick_labels(lo, hi, y["axis"]["format"])
    assert len(set(labels)) == len(labels)
    # all points equal: a padded domain instead of a flat one (Vega draws no sensible ticks on a flat one)
    train, evl = one_step_run()
    flat = charts.curve_charts({"tiny": (train, evl.iloc[0:0])}, x="step")["accuracy"]
    domain = flat.spec["layer"][0]["encoding"]["y"]["scale"]["domain"]
    assert domain[0] < 0.117 < domain[1]
    # the formats come from the data's range, yet a growing run keeps its specs (built once per layout)
    charts.curve_spec.cache_clear()
    charts.curve_charts({"r": run(100)}, x="step")
    misses = charts.curve_spec.cache_info().misses
    charts.curve_charts({"r": run(110)}, x="step")
    assert charts.curve_spec.cache_info().misses == misses


def test_log_scale_changes_the_loss_scale_only():
    plain = charts.curve_charts({"r": run(100)}, x="step")
    logged = charts.curve_charts({"r": run(100)}, x="step", log_y=True)
    assert plain["loss"].spec["layer"][0]["encoding"]["y"]["scale"].get("type") is None
    assert logged["loss"].spec["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"
    assert logged["accuracy"].spec["layer"][0]["encoding"]["y"]["scale"].get("type") is None
    train, evl = run(100)
    train.loc[3, "train_loss"] = 0.0  # no place on a log axis: left out and said so
    chart = charts.curve_charts({"r": (train, evl)}, x="step", log_y=True)["loss"]
    assert (chart.data["value"] > 0).all() and "1 loss value <= 0 left out" in chart.note


def test_clipping_keeps_the_other_runs_range():
    frames = {"good-a": run(200), "good-b": run(200, start=2.2, end=0.7), "bad": run(200, diverge_from=120)}
    flat = charts.curve_charts(frames, x="step")["loss"]
    assert flat.data["value"].max() == 7e6  # the diverging run sets the range: every other curve is flat
    clipped = charts.curve_charts(frames, x="step", clip=True)["loss"]
    rows = clipped.data
    good = rows[rows["run"] != "bad"]
    assert rows["value"].max() == pytest.approx(good["value"].max())
    assert rows["value"].max() <= 2.31  # the normal runs' own range
    before = flat.data[flat.data["run"] != "bad"]
    assert np.allclose(good["value"].to_numpy(), before["value"].to_numpy())  # normal runs untouched
    bad = rows[rows["run"] == "bad"]
    assert (bad["value"] <= rows["value"].max()).all() and (bad["actual"] == 7e6).any()
    n = int((flat.data["value"] > rows["value"].max()).sum())
    assert n > 0 and f"{n} loss values above" in clipped.note and "bad" in clipped.note
    tips = [t for layer in clipped.spec["layer"] for t in layer["encoding"].get("tooltip", [])]
    assert any(t.get("field") == "actual" for t in tips) and not any(t.get("field") == "value" for t in tips)
    # nothing to clip: no note, the data unchanged
    calm = charts.curve_charts({"a": run(200), "b": run(200, start=2.0)}, x="step", clip=True)["loss"]
    assert calm.note == "" and "actual" not in calm.data


def test_clipping_a_single_run_that_diverges_at_the_end():
    chart = charts.curve_charts({"r": run(300, diverge_from=280)}, x="step", clip=True)["loss"]
    assert chart.data["value"].max() <= 2.31 and "drawn at the top edge" in chart.note


def test_groups_draw_a_mean_line_and_a_std_band():
    a, b = run(100), run(100)
    b = (b[0].assign(train_loss=b[0]["train_loss"] + 0.2), b[1].assign(val_acc=b[1]["val_acc"] + 0.1))
    grouped = charts.group_frames({"g (n=2)": [a, b]})
    train, evl = grouped["g (n=2)"]
    assert np.allclose(train["train_loss"], a[0]["train_loss"] + 0.1)
    assert np.allclose(train["train_loss_std"], np.std([0.0, 0.2], ddof=1))
    assert np.allclose(evl["val_acc_std"], np.std([0.0, 0.1], ddof=1))
    out = charts.curve_charts(grouped, x="step", smoothing=0.0)
    rows = out["loss"].data
    mean = rows[(rows["split"] == "train")]
    assert np.allclose(mean["hi"] - mean["lo"], 2 * np.std([0.0, 0.2], ddof=1))
    assert any(layer["mark"]["type"] == "area" and layer["encoding"]["y2"]["field"] == "hi"
               for layer in out["loss"].spec["layer"])

