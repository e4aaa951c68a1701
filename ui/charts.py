"""Altair charts for runs: training curves (one run, several overlaid, or groups of runs as a mean
line and a ± std band), per-class accuracy, confusion matrix, reliability diagram. Builders return Altair charts and do not touch Streamlit except `curve_controls`
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

from cifar_core import runs
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
    layout and the rows travel next to it (st.vega_lite_chart sends them as Arrow). `note` says what
    was left out or clipped (shown as a caption under the chart row).
    """

    spec: dict
    data: pd.DataFrame
    note: str = ""

    def show(self, width="stretch") -> None:
        st.vega_lite_chart(self.data, copy.deepcopy(self.spec), width=width)


# ---- axes: tick steps and label formats that give distinct labels ------------------------------
TICK_COUNT = 5
FEW_POINTS = 25       # a series with at most this many points is drawn with a marker on each point
CLIP_FACTOR = 10.0    # clipping: values above this many times the typical level count as outliers


def tick_step(lo: float, hi: float, count: int = TICK_COUNT) -> float:
    """The step between ticks that Vega (d3's tickStep) picks for about `count` ticks over [lo, hi]."""
    span = abs(float(hi) - float(lo))
    if not math.isfinite(span) or span <= 0:
        return 0.0
    raw = span / max(1, count)
    power = math.floor(math.log10(raw))
    err = raw / 10 ** power
    factor = 10 if err >= math.sqrt(50) else 5 if err >= math.sqrt(10) else 2 if err >= math.sqrt(2) else 1
    return factor * 10.0 ** power


def axis_format(lo: float, hi: float, percent: bool = False, count: int = TICK_COUNT) -> str:
    """A d3 format with just enough decimals that ticks `tick_step` apart get distinct labels
    (".1%" for accuracies between 11.5% and 12.5%, ".2f" for losses between 2.30 and 2.34)."""
    step = tick_step(lo, hi, count)
    if step <= 0:
        return ".1%" if percent else "~g"
    if percent:
        step *= 100
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if percent:
        return f".{min(decimals, 4)}%"
    biggest = max(abs(float(lo)), abs(float(hi)))
    if biggest >= 1e4:
        return "~s"  # 7M, 20k
    if decimals > 6:
        return ".2~e"
    return f",.{decimals}f"


def padded_domain(value: float, percent: bool = False) -> tuple[float, float]:
    """A y domain around a single value (one point, or all points equal): a flat domain has no ticks."""
    pad = 0.01 if percent else max(abs(value) * 0.05, 1e-3)
    return value - pad, value + pad


# ---- outliers -------------------------------------------------------------------------------------
def clip_limit(rows: pd.DataFrame, factor: float = CLIP_FACTOR) -> float | None:
    """The top of the y range that keeps every normal curve whole: within each series (run, split,
    kind), values above `factor` x the series' median are spikes; across series, one whose top is above
    `factor` x the (lower) median of the series' tops diverged. The limit is the highest top of the
    rest; None when nothing lies above it (or the values are not positive)."""
    if rows.empty:
        return None
    values = rows["value"].astype(float).where(np.isfinite(rows["value"].astype(float)))
    series = rows.groupby(["run", "split", "kind"], sort=False).ngroup()
    median = values.groupby(series).transform("median")
    typical = values.where((median <= 0) | (values <= factor * median))  # without the series' spikes
    tops = typical.groupby(series).max().dropna().tolist()
    if not tops:
        return None
    ordered = sorted(tops)
    ref = ordered[(len(ordered) - 1) // 2]
    kept = [t for t in tops if ref <= 0 or t <= factor * ref]
    limit = max(kept) if kept else None
    if limit is None or not (rows["value"] > limit).any():
        return None
    return limit


def clip_rows(rows: pd.DataFrame, limit: float) -> tuple[pd.DataFrame, int, list[str]]:
    """(rows with values above `limit` drawn at the limit, their count, the runs they belong to). The
    true values stay in the "actual" column for the tooltips."""
    over = rows["value"] > limit
    out = rows.copy()
    out["actual"] = out["value"]
    out.loc[over, "value"] = limit
    for col in ("lo", "hi"):
        if col in out:
            out[col] = out[col].clip(upper=limit)
    return out, int(over.sum()), list(dict.fromkeys(rows.loc[over, "run"]))


def curve_data(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str = "step",
               smoothing: float = 0.0, max_points: int = MAX_POINTS) -> tuple[dict[str, pd.DataFrame], str]:
    """{metric: long-form rows (run, split, kind, x, value, points)} for the curve charts, and the x title.

    The train series are smoothed on the full-resolution rows, then every series is thinned to at
    most `max_points` points. kind is "smoothed" (or the plain series when smoothing is 0) or "raw";
    points is True on the rows of a series short enough (FEW_POINTS) to be drawn with markers.
    A frame with a "<column>_std" beside a metric column (a group's mean, see group_frames) adds the
    columns lo and hi (mean -/+ std) for the band.
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
    with_band = any(f"{col}_std" in df for train, evl in frames.values() for df in (train, evl)
                    for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"))

    def add(metric, label, split, kind, xs: np.ndarray, values: np.ndarray, std: np.ndarray | None = None):
        keep = np.isfinite(xs) & np.isfinite(values)
        xs, values = xs[keep], values[keep]
        std = std[keep] if std is not None else np.full(len(xs), np.nan)
        if len(xs) > max_points:
            idx = thin_index(len(xs), max_points)
            xs, values, std = xs[idx], values[idx], std[idx]
        if len(xs):
            parts[metric].append((label, split, kind, xs, values, std))

    def std_of(df, col, smooth: bool):
        if f"{col}_std" not in df:
            return None
        std = df[f"{col}_std"].astype(float)
        return (ema(std, smoothing) if smooth else std).to_numpy()

    for label, (train, evl) in frames.items():
        if len(train):
            xs = _x_values(train, x, minutes).to_numpy(dtype=float)
            for metric, (tcol, _vcol, _t, _f) in METRICS.items():
                if tcol not in train:
                    continue
                series = train[tcol].astype(float)
                if metric != "learning rate" and smoothing > 0:
                    add(metric, label, "train", "smoothed", xs, ema(series, smoothing).to_numpy(),
                        std_of(train, tcol, True))
                    add(metric, label, "train", "raw", xs, series.to_numpy())
                else:
                    add(metric, label, "train", "smoothed", xs, series.to_numpy(), std_of(train, tcol, False))
        if len(evl):
            xs = _x_values(evl, x, minutes).to_numpy(dtype=float)
            for metric, (_tcol, vcol, _t, _f) in METRICS.items():
                if vcol is not None and vcol in evl:
                    add(metric, label, "val", "smoothed", xs, evl[vcol].to_numpy(dtype=float),
                        std_of(evl, vcol, False))
    out = {}
    for metric, items in parts.items():
        if not items:
            continue
        sizes = [len(it[3]) for it in items]
        rows = pd.DataFrame({
            "run": np.repeat(np.array([it[0] for it in items], dtype=object), sizes),
            "split": np.repeat(np.array([it[1] for it in items], dtype=object), sizes),
            "kind": np.repeat(np.array([it[2] for it in items], dtype=object), sizes),
            "x": np.concatenate([it[3] for it in items]),
            "value": np.concatenate([it[4] for it in items]),
            "points": np.repeat(np.array([n <= FEW_POINTS for n in sizes], dtype=bool), sizes)})
        if with_band:
            std = np.concatenate([it[5] for it in items])
            rows["lo"] = rows["value"] - std
            rows["hi"] = rows["value"] + std
        out[metric] = rows
    return out, _x_title(x, minutes)


@functools.lru_cache(maxsize=128)
def curve_spec(metric: str, x_title: str, multi_run: bool, has_raw: bool, has_val: bool,
               height: int = CURVE_HEIGHT, *, x_format: str | None = None, x_integer: bool = False,
               x_domain: tuple[float, float] | None = None, y_format: str | None = None,
               y_domain: tuple[float, float] | None = None, log_y: bool = False, band: bool = False,
               clipped: bool = False, many_runs: bool = False) -> dict:
    """The Vega-Lite spec of one metric's curves (no data), authored with Altair.

    x_integer: integer ticks only (a step or epoch axis); x_format / y_format: d3 formats (see
    axis_format); x_domain / y_domain: fixed domains (for a single point); log_y: a log y scale;
    band: a mean -/+ std area from the lo and hi columns; clipped: the tooltips show the "actual"
    column; many_runs: a 20-colour palette. The train series get markers where their rows' `points`
    is true; the validation series always have them.
    """
    _tcol, _vcol, y_title, default_format = METRICS[metric]
    y_format = y_format or ("~g" if log_y else default_format)
    if multi_run:
        color = alt.Color("run:N", title="run", scale=alt.Scale(scheme="tableau20" if many_runs else "tableau10"),
                          legend=alt.Legend(orient="bottom", columns=3 if many_runs else 2, labelLimit=260,
                                            symbolType="stroke", symbolOpacity=1, symbolStrokeWidth=2))
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
    y_scale = alt.Scale(type="log", nice=True) if log_y else alt.Scale(zero=False, nice=True)
    if y_domain is not None and not log_y:
        y_scale = alt.Scale(zero=False, nice=True, domain=list(y_domain))
    y_axis = alt.Axis(format=y_format, tickCount=TICK_COUNT)
    x_axis = alt.Axis(format=",d" if x_integer else (x_format or ",.4~g"), tickMinStep=1 if x_integer else alt.Undefined,
                      tickCount=TICK_COUNT)
    x_scale = alt.Scale(domain=list(x_domain)) if x_domain is not None else alt.Undefined
    value_field = "actual" if clipped else "value"
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("split:N"),
               alt.Tooltip("x:Q", title=x_title, format=",.4~g"),
               alt.Tooltip(f"{value_field}:Q", title=y_title, format=".4~g")]
    base = alt.Chart().encode(
        x=alt.X("x:Q", title=x_title, axis=x_axis, scale=x_scale),
        y=alt.Y("value:Q", title=y_title, scale=y_scale, axis=y_axis),
        color=color, detail="run:N")
    layers = []
    if band:
        layers.append(base.transform_filter("datum.kind === 'smoothed' && isValid(datum.lo)")
                      .mark_area(opacity=0.18, strokeWidth=0)
                      .encode(y=alt.Y("lo:Q", title=y_title, scale=y_scale, axis=y_axis), y2="hi:Q"))
    if has_raw:
        layers.append(base.transform_filter(alt.datum.kind == "raw")
                      .mark_line(opacity=0.22, strokeWidth=1))
    train = base.transform_filter((alt.datum.kind == "smoothed") & (alt.datum.split == "train"))
    layers.append(train.mark_line(strokeWidth=1.8).encode(strokeDash=dash, tooltip=tooltip))
    # a series of a few points (one step: one point, which a line does not draw) gets markers
    layers.append(train.transform_filter("datum.points").mark_point(filled=True, size=28)
                  .encode(tooltip=tooltip))
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


def _x_layout(all_x: np.ndarray, x: str) -> tuple[bool, str | None, tuple[float, float] | None]:
    """(integer ticks, format, fixed domain) of the x axis over these x values."""
    xs = all_x[np.isfinite(all_x)]
    if not len(xs):
        return x == "step", None, None
    lo, hi = min(0.0, float(xs.min())), float(xs.max())  # the x scale starts at zero
    integer = x == "step" or (x == "epoch" and hi - lo >= 2)
    if hi - lo <= 0:  # one point at x = 0
        return integer, None, (-1.0, 1.0)
    return integer, None if integer else axis_format(lo, hi), None


def curve_charts(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str = "step",
                 smoothing: float = 0.0, max_points: int = MAX_POINTS,
                 heights: dict[str, int] | None = None, *, log_y: bool = False, clip: bool = False,
                 clip_factor: float = CLIP_FACTOR) -> dict[str, CurveChart]:
    """{metric: chart} for loss, accuracy and learning rate (those with data).

    log_y: the loss on a log scale (values <= 0 left out, and counted in the note); clip: loss values
    above clip_limit drawn at the top edge (counted in the note), so one diverging run does not flatten
    the others.
    """
    data, x_title = curve_data(frames, x, smoothing, max_points)
    multi = len(frames) > 1
    heights = {"learning rate": 110, **(heights or {})}
    all_x = np.concatenate([rows["x"].to_numpy(dtype=float) for rows in data.values()]) if data else np.zeros(0)
    x_integer, x_format, x_domain = _x_layout(all_x, x)
    out = {}
    for metric, rows in data.items():
        notes = []
        clipped = False
        log = log_y and metric == "loss"
        if log:
            bad = rows["value"] <= 0
            if bad.any():
                notes.append(f"{int(bad.sum())} loss value{'s' if bad.sum() != 1 else ''} <= 0 left out "
                             "(log scale).")
                rows = rows[~bad].reset_index(drop=True)
            if "lo" in rows and len(rows):
                rows["lo"] = rows["lo"].where(rows["lo"] > 0, rows["value"].min())
        if clip and metric == "loss" and len(rows):
            limit = clip_limit(rows, clip_factor)
            if limit is not None:
                rows, count, runs_ = clip_rows(rows, limit)
                clipped = True
                who = ", ".join(runs_[:3]) + (" …" if len(runs_) > 3 else "") if multi else ""
                notes.append(f"{count} loss value{'s' if count != 1 else ''} above {limit:.4g} "
                             f"drawn at the top edge (clipped{': ' + who if who else ''}).")
        if rows.empty:
            continue
        values = rows["value"].to_numpy(dtype=float)
        if "lo" in rows:
            values = np.concatenate([values, rows["lo"].to_numpy(dtype=float), rows["hi"].to_numpy(dtype=float)])
        values = values[np.isfinite(values)]
        lo, hi = float(values.min()), float(values.max())
        percent = metric == "accuracy"
        y_domain = padded_domain(lo, percent) if hi - lo <= 0 and not log else None
        y_format = "~g" if log else axis_format(*(y_domain or (lo, hi)), percent=percent)
        spec = curve_spec(metric, x_title, multi, bool((rows["kind"] == "raw").any()),
                          bool((rows["split"] == "val").any()), heights.get(metric, CURVE_HEIGHT),
                          x_format=x_format, x_integer=x_integer, x_domain=x_domain, y_format=y_format,
                          y_domain=y_domain, log_y=log, band="lo" in rows, clipped=clipped,
                          many_runs=len(frames) > 10)
        out[metric] = CurveChart(spec, rows, " ".join(notes))
    return out


def group_frames(groups: dict[str, list[tuple[pd.DataFrame, pd.DataFrame]]],
                 min_runs: int | None = None) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """{group: (train, eval)} whose metric columns are the mean across the group's runs at the steps
    they share (runs.aggregate_curves), each with a "<column>_std" beside it; the x columns (epoch,
    elapsed) are the runs' mean at each step."""
    out = {}
    for name, members in groups.items():
        pair = []
        for which, cols in ((0, ("train_loss", "train_acc", "lr")), (1, ("val_loss", "val_acc"))):
            frames = [m[which] for m in members if len(m[which]) and "step" in m[which]]
            merged = None
            for col in (*cols, "epoch", "elapsed"):
                have = [f for f in frames if col in f]
                if not have or len(have) < len(frames):
                    continue
                agg = runs.aggregate_curves([(f["step"].to_numpy(), f[col].to_numpy()) for f in have], min_runs)
                part = pd.DataFrame({"step": agg.steps, col: agg.mean})
                if col in cols:
                    part[f"{col}_std"] = agg.std
                merged = part if merged is None else merged.merge(part, on="step", how="outer")
            pair.append(merged.sort_values("step").reset_index(drop=True) if merged is not None
                        else pd.DataFrame({"step": []}))
        out[name] = (pair[0], pair[1])
    return out


def curve_controls(key: str, *, scale_options: bool = False, clip_default: bool = False) -> tuple[str, float]:
    """x-axis choice and smoothing weight, drawn side by side. Returns (metrics column, weight).

    scale_options: also draw the "log scale" and "clip outliers" toggles of the loss chart (keys
    `{key}_log_y` and `{key}_clip`; pass `controls=key` to show_curves to apply them)."""
    if scale_options:
        left, right, extra = st.columns([3, 2, 2])
    else:
        left, right = st.columns([3, 2])
    with left:
        label = st.radio("x axis", list(X_AXES), horizontal=True, key=f"{key}_x")
    with right:
        weight = st.slider("Smoothing (EMA of train curves)", 0.0, 0.99, 0.6, 0.01, key=f"{key}_smooth",
                           help="0 = raw values. The raw train series stays visible, faint.")
    if scale_options:
        with extra:
            st.checkbox("Log scale (loss)", key=f"{key}_log_y")
            st.checkbox("Clip outliers (loss)", value=clip_default, key=f"{key}_clip",
                        help=f"Loss values more than {CLIP_FACTOR:g}x above the other runs' (or the run's "
                             "own typical) level are drawn at the top edge, so one diverging run does not "
                             "flatten every other curve.")
    return X_AXES[label or "step"], float(weight)


def show_curves(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], x: str, smoothing: float,
                empty_message: str = "No metrics yet.", *, controls: str | None = None,
                log_y: bool | None = None, clip: bool | None = None) -> None:
    """The loss and accuracy charts side by side, the learning rate under them, and their notes.

    controls: the key of the curve_controls(scale_options=True) whose toggles apply; log_y / clip
    given here override them."""
    if controls is not None:
        log_y = bool(st.session_state.get(f"{controls}_log_y", False)) if log_y is None else log_y
        clip = bool(st.session_state.get(f"{controls}_clip", False)) if clip is None else clip
    charts = curve_charts(frames, x, smoothing, log_y=bool(log_y), clip=bool(clip))
    if not charts:
        st.info(empty_message)
        return
    top = [m for m in ("loss", "accuracy") if m in charts]
    for col, metric in zip(st.columns(len(top)) if top else [], top):
        with col:
            charts[metric].show()
    if "learning rate" in charts:
        charts["learning rate"].show()
    notes = [c.note for c in charts.values() if c.note]
    if len(frames) > 1:
        notes.insert(0, "Solid lines: training (smoothed; faint: raw). Dashed lines with dots: validation.")
    if any("lo" in c.data for c in charts.values()):
        notes.append("Lines: the mean across each group's runs at the steps they all reached; "
                     "band: ± one standard deviation.")
    for note in notes:
        st.caption(note)


SPLIT_PARTS = {"labeled": "#1f77b4", "unlabeled": "#aec7e8", "validation": "#ff7f0e"}


def split_chart(counts: dict, height: int = 220) -> alt.Chart:
    """Stacked per-class bars of a training split (labeled, unlabeled, validation), from
    `engine.prepare.split_counts`."""
    rows = [{"class": cls, "part": part, "images": n}
            for part in SPLIT_PARTS for cls, n in counts[part].items()]
    df = pd.DataFrame(rows)
    classes = list(counts["labeled"])
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("class:N", sort=classes, title=None, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        y=alt.Y("images:Q", title="images", stack="zero"),
        color=alt.Color("part:N", sort=list(SPLIT_PARTS), title=None, legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=list(SPLIT_PARTS), range=list(SPLIT_PARTS.values()))),
        order=alt.Order("part_order:Q"),
        tooltip=[alt.Tooltip("class:N"), alt.Tooltip("part:N"), alt.Tooltip("images:Q", format=",")],
    ).transform_calculate(part_order=f"indexof({list(SPLIT_PARTS)!r}, datum.part)").properties(
        height=height, autosize=FIT_X)


GROUP_COLORS = {"many": "#1f77b4", "medium": "#9467bd", "few": "#d62728"}


def per_class_chart(per_class: dict[str, dict[str, float]], height: int = 200, *,
                    title: str = "test accuracy", groups: dict[str, list[str]] | None = None) -> alt.Chart | None:
    """Per-class accuracy (recall) bars; several runs side by side (grouped) when more than one label.
    `groups` (one run): {"many" | "medium" | "few": class names} colours each bar by its group."""
    group_of = {cls: name for name, members in (groups or {}).items() for cls in members}
    rows = [{"run": label, "class": cls, "acc": float(acc), "group": group_of.get(cls, "")}
            for label, accs in per_class.items() if accs
            for cls, acc in accs.items() if isinstance(acc, (int, float))]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    classes = list(dict.fromkeys(df["class"]))
    multi = df["run"].nunique() > 1
    enc = {
        "x": alt.X("class:N", sort=classes, title=None, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        "y": alt.Y("acc:Q", title=title, scale=alt.Scale(domain=[0, 1]),
                   axis=alt.Axis(format=".0%")),
        "tooltip": [alt.Tooltip("run:N"), alt.Tooltip("class:N"), alt.Tooltip("acc:Q", format=".2%")],
    }
    if multi:
        enc["xOffset"] = alt.XOffset("run:N")
        enc["color"] = alt.Color("run:N", scale=alt.Scale(scheme="tableau10"),
                                 legend=alt.Legend(orient="bottom", columns=2, labelLimit=260))
    elif group_of:
        enc["color"] = alt.Color("group:N", title="training count", sort=list(GROUP_COLORS),
                                 scale=alt.Scale(domain=list(GROUP_COLORS), range=list(GROUP_COLORS.values())),
                                 legend=alt.Legend(orient="top"))
        enc["tooltip"].append(alt.Tooltip("group:N"))
    else:
        enc["color"] = alt.value("#1f77b4")
    bars = alt.Chart(df).mark_bar().encode(**enc)
    if not multi:
        text = alt.Chart(df).mark_text(dy=-6, fontSize=10).encode(
            x=enc["x"], y=enc["y"], text=alt.Text("acc:Q", format=".0%"))
        return alt.layer(bars, text).properties(height=height, autosize=FIT_X)
    return bars.properties(height=height, autosize=FIT_X)


def reliability_chart(bins: list[dict], height: int = 260) -> alt.LayerChart | None:
    """Reliability diagram: each confidence bin's accuracy as a bar over the bin, its mean confidence as
    a tick, and the diagonal (perfect calibration). Bars below the diagonal: over-confident."""
    rows = [{"lower": b["lower"], "upper": b["upper"], "count": int(b["count"]),
             "accuracy": float(b["accuracy"]), "confidence": float(b["confidence"]),
             "gap": float(b["confidence"]) - float(b["accuracy"])}
            for b in bins or [] if isinstance(b, dict) and b.get("count")
            and isinstance(b.get("accuracy"), (int, float)) and isinstance(b.get("confidence"), (int, float))]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    unit = alt.Scale(domain=[0, 1])
    x = alt.X("lower:Q", title="confidence (top probability)", scale=unit, axis=alt.Axis(format=".0%"))
    y = alt.Y("accuracy:Q", title="accuracy", scale=unit, axis=alt.Axis(format=".0%"))
    tooltip = [alt.Tooltip("lower:Q", title="from", format=".0%"), alt.Tooltip("upper:Q", title="to", format=".0%"),
               alt.Tooltip("count:Q", title="images", format=","), alt.Tooltip("accuracy:Q", format=".1%"),
               alt.Tooltip("confidence:Q", title="mean confidence", format=".1%"),
               alt.Tooltip("gap:Q", title="confidence - accuracy", format="+.1%")]
    bars = alt.Chart(df).mark_bar(color="#1f77b4", opacity=0.85, stroke="white", strokeWidth=0.5).encode(
        x=x, x2="upper:Q", y=y, tooltip=tooltip)
    ticks = alt.Chart(df).mark_tick(color="#d62728", thickness=2).encode(
        x=alt.X("mid:Q", scale=unit), y=alt.Y("confidence:Q", scale=unit), tooltip=tooltip
    ).transform_calculate(mid="(datum.lower + datum.upper) / 2")
    diagonal = alt.Chart(pd.DataFrame({"p": [0.0, 1.0]})).mark_line(color="#888", strokeDash=[4, 4]).encode(
        x=alt.X("p:Q", scale=unit), y=alt.Y("p:Q", scale=unit))
    return alt.layer(bars, ticks, diagonal).properties(height=height, autosize=FIT_X)


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
