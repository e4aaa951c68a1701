"""The augmentation previewer's Streamlit parts (app_pages/5_Preview.py): image sources, uploads, the
cached fits, and drawing a chain's grid, notes, histograms and code. The computing lives in
cifar_core.augment.preview.
"""
from __future__ import annotations

import html
import json
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from cifar_core.augment import AugmentChain
from cifar_core.augment import preview as ap
from cifar_core.data import CLASSES
from cifar_core.images import (MAX_PIXELS, MAX_UPLOAD_BYTES, PREPROCESS_DESCRIPTION, UPLOAD_TYPES, ImageReadError,
                               enlarge, png_bytes, read_image)
from ui.common import data_source, data_status

GRIDS = {"2×2": (2, 2), "3×3": (3, 3), "4×4": (4, 4), "6×6": (6, 6), "8×8": (8, 8), "8×12": (8, 12)}
MAX_FILES = 8  # uploads read per page view
MAX_PREVIEWED = 4  # uploaded images with a grid at once
SOURCE_LABELS = {"sample": "Bundled sample (200 test images)", "dataset": "CIFAR-10 dataset",
                 "upload": "Your images (upload)"}


def _random_pick(prefix: str, labels: np.ndarray) -> None:
    """Callback: a random class and a random image of it (before the widgets are drawn)."""
    c = random.randrange(len(CLASSES))
    st.session_state[f"{prefix}.class"] = CLASSES[c]
    st.session_state[f"{prefix}.index"] = random.randrange(int((labels == c).sum()))


def _class_and_index(prefix: str, labels: np.ndarray, slider: bool) -> tuple[str, int, int]:
    """Class selectbox + index-within-class control; returns (class, k, index into labels)."""
    st.session_state.setdefault(f"{prefix}.class", "cat")
    cls = st.selectbox("Class", CLASSES, key=f"{prefix}.class")
    members = np.flatnonzero(labels == CLASSES.index(cls))
    key = f"{prefix}.index"
    st.session_state[key] = int(min(max(0, st.session_state.get(key, 0)), len(members) - 1))
    if slider:
        k = st.slider("Image of that class", 0, len(members) - 1, key=key)
    else:
        k = st.number_input(f"Image of that class (0 … {len(members) - 1:,})", 0, len(members) - 1,
                            step=1, key=key)
    st.button("Random image", key=f"{prefix}.random", on_click=_random_pick, args=(prefix, labels),
              icon=":material/shuffle:")
    return cls, int(k), int(members[int(k)])


def pick_sample() -> ap.Source:
    _, ys, _ = ap.sample()
    _, k, i = _class_and_index("preview.sample", ys, slider=True)
    return ap.sample_source(i, k)


@st.cache_resource(show_spinner="Loading CIFAR-10…", max_entries=2)
def dataset(source: str | None, data_dir: str | None):
    """The CIFAR-10 arrays, shared by every session (read-only)."""
    from cifar_core.data import load_cifar10
    return load_cifar10(source, data_dir)


def current_dataset():
    return dataset(data_source(), os.environ.get("CIFAR10_DATA_DIR"))


def pick_dataset() -> ap.Source:
    arrays = current_dataset()
    st.session_state.setdefault("preview.data.split", "test")
    split = st.radio("Split", ["train", "test"], horizontal=True, key="preview.data.split")
    x, y = (arrays.x_train, arrays.y_train) if split == "train" else (arrays.x_test, arrays.y_test)
    _, _, i = _class_and_index("preview.data", y, slider=False)
    return ap.dataset_source(x, y, split, i)


@dataclass
class Upload:
    """One uploaded file as read: the image (and a small PNG to show it) or the refusal message."""
    name: str
    image: Any = None  # LoadedImage
    error: str = ""
    display: bytes = b""  # the upright RGB original, at most DISPLAY_SIDE px, PNG-encoded once


DISPLAY_SIDE = 480


def read_uploads(files) -> list[Upload]:
    """The uploaded files, each read with cifar_core.images.read_image once per file (per session)."""
    from PIL import Image
    cache = st.session_state.setdefault("preview.decoded", {})
    out, keep, seen = [], set(), {}
    for f in files[:MAX_FILES]:
        fid = getattr(f, "file_id", None) or f"{f.name}:{f.size}"
        keep.add(fid)
        if fid not in cache:
            try:
                if f.size > MAX_UPLOAD_BYTES:  # before touching the bytes
                    raise ImageReadError(f"{f.name}: the file is {f.size / 2**20:.1f} MB; the limit is "
                                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB")
                img = read_image(f.getvalue(), f.name)
                thumb = img.original.copy()
                thumb.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
                cache[fid] = Upload(f.name, img, display=png_bytes(np.asarray(thumb), compress_level=6))
            except ImageReadError as exc:
                cache[fid] = Upload(f.name, error=str(exc))
        item = cache[fid]
        seen[item.name] = seen.get(item.name, 0) + 1
        if item.image is not None and seen[item.name] > 1:  # two files with one name: tell them apart
            item = Upload(f"{item.name} ({seen[item.name]})", item.image, item.error, item.display)
        out.append(item)
    for fid in [k for k in cache if k not in keep]:
        del cache[fid]
    return out


def upload_limits_text() -> str:
    return (f"Up to {MAX_FILES} files of at most {MAX_UPLOAD_BYTES / 2**20:.0f} MB and "
            f"{MAX_PIXELS / 1e6:g} million pixels each (bigger images are refused before decoding). "
            f"{PREPROCESS_DESCRIPTION}")


def pick_uploads() -> list[Upload]:
    files = st.file_uploader("Your images", type=list(UPLOAD_TYPES), accept_multiple_files=True,
                             key="preview.upload", help=upload_limits_text(),
                             max_upload_size=MAX_UPLOAD_BYTES // 2**20)
    files = list(files or [])
    if len(files) > MAX_FILES:
        st.warning(f"{len(files)} files: only the first {MAX_FILES} are read.")
    return read_uploads(files)


def show_upload(item: Upload) -> None:
    """One uploaded file: the upload beside its 32×32 tile and how it was reduced, or why not."""
    if item.image is None:
        st.error(item.error)
        return
    img = item.image
    with st.container(border=True):
        a, b, c = st.columns([2, 1, 3])
        a.image(item.display, caption=f"{item.name}: {img.original_size[0]}×{img.original_size[1]}, "
                                      f"mode {img.original_mode}", width=240)
        b.image(enlarge(img.tile, 4), caption="32×32 tile (what the models get), ×4", output_format="PNG")
        c.markdown("**How it was reduced**\n" + "\n".join(f"1. {html.escape(s)}" for s in img.steps))


# ---- fitting (zca) --------------------------------------------------------------------------------

def fit_source() -> tuple[tuple, str]:
    """(cache key, description) of the images steps like zca are fitted on."""
    status = data_status()
    if status["ok"]:
        return ("train", data_source(), os.environ.get("CIFAR10_DATA_DIR")), "the CIFAR-10 training set"
    return ("sample",), "the bundled sample (CIFAR-10 was not found)"


def _fit(op, fit_key: tuple, **kw):
    # one thread: the lab's training jobs usually keep the cores busy, and then the 3,072² eigh took
    # 5.4 s on 1 thread vs 13-16 s on 2 on this 2-core machine (bench/README.md)
    with warnings.catch_warnings(), ap.one_thread():  # arrays are read-only on purpose; fit only reads
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return op.fit(_fit_images(fit_key), **kw)


def _fit_images(fit_key: tuple) -> np.ndarray:
    if fit_key[0] == "train":
        return dataset(fit_key[1], fit_key[2]).x_train
    return ap.sample()[0]


@st.cache_resource(max_entries=3, show_spinner=False)
def _zca_base(fit_key: tuple, fit_images: int):
    from cifar_core.augment import ZCAOp
    return _fit(ZCAOp(1e-2, fit_images), fit_key, keep_eigenvectors=True)


@st.cache_resource(max_entries=8, show_spinner=False)
def _zca(fit_key: tuple, fit_images: int, epsilon: float):
    return _zca_base(fit_key, fit_images).with_epsilon(epsilon)


@st.cache_resource(max_entries=4, show_spinner=False)
def _fitted_other(fit_key: tuple, name: str, params_json: str):
    from cifar_core.augment import AUGMENTATIONS
    op = AUGMENTATIONS.build(name, json.loads(params_json))
    _fit(op, fit_key)
    return op


@dataclass
class Fit:
    """A fitted step for the page: the op, its step name and index, and how many images it used of
    how many the step asks for (fewer when the previewer's cap applied)."""
    name: str
    index: int
    op: Any
    requested: int
    available: int

    @property
    def capped(self) -> bool:
        count = getattr(self.op, "fit_count", None)
        return count is not None and count < min(self.requested, self.available)


def needs_fit(chain: AugmentChain) -> bool:
    return any(getattr(op, "needs_fit", False) for op in chain.ops)


def fit_steps(chain: AugmentChain, full: bool = False) -> tuple[dict[int, Any], list[Fit]]:
    """Fitted ops for the steps that need a fit, cached across reruns and sessions (a zca fit takes
    seconds; changing epsilon reuses its eigendecomposition). Unless `full`, a fit uses at most
    ap.PREVIEW_FIT_IMAGES images (ap.fit_count)."""
    from cifar_core.augment import ZCAOp
    fitted, notes = {}, []
    fit_key, what = fit_source()
    for i, (step, op) in enumerate(zip(chain.specs, chain.ops)):
        if not getattr(op, "needs_fit", False):
            continue
        available = len(_fit_images(fit_key))
        requested = int(getattr(op, "fit_images", available))
        count = ap.fit_count(requested, available, full)
        with st.spinner(f"Fitting {step['name']} on {what} ({count:,} images): once, then cached…"):
            if isinstance(op, ZCAOp):
                # fit_images beyond the available images all give the same fit: one cache entry
                fitted[i] = _zca(fit_key, count, float(op.epsilon))
            else:
                fitted[i] = _fitted_other(fit_key, step["name"], json.dumps(step["params"], default=list))
        notes.append(Fit(step["name"], i, fitted[i], requested, available))
    return fitted, notes


# ---- one chain's result -----------------------------------------------------------------------------

def render_variants(v: ap.Variants, source: ap.Source, cols: int, scale: int, captions: bool, css_class: str,
                    fit_notes) -> None:
    xs, _, _ = ap.sample()
    st.html(ap.grid_html(v, cols, scale, captions, css_class=css_class,
                         partner_tiles=xs if v.batch_level else None, source_tile=source.tile))
    if v.batch_level:
        st.caption(f"Mixing steps draw each variant's partner from the batch: these {v.n} copies plus "
                   f"{len(v.pool)} other images of the bundled sample, as in a training batch. Under each "
                   f"tile: the partner and the resulting label weights; on average "
                   f"**{ap.label_kept(v, source.label):.2f}** of the label stays '{ap.LABELS[source.label]}'.")
    if v.normalizes:
        s = ap.value_stats(v)
        st.caption(f"Values after the chain (what the model sees): **min {s['min']:.2f}, max {s['max']:.2f}**; "
                   f"per-tile mean {s['mean_lo']:.3f} … {s['mean_hi']:.3f}, std {s['std_lo']:.3f} … "
                   f"{s['std_hi']:.3f}. The tiles are stretched from their own min … max for display.")
    for fit in fit_notes:
        render_fit_note(fit, source)
    if "color" in ap.step_tags(v.specs):
        render_histograms(source, v)


def render_fit_note(fit: Fit, source: ap.Source) -> None:
    fit_key, what = fit_source()
    name, op = fit.name, fit.op
    count = getattr(op, "fit_count", 0)
    text = f"**{name}** is fitted on {what}" + (f", {count:,} images" if count else "")
    if fit.capped:
        text += (f" (of the {min(fit.requested, fit.available):,} that training uses: the previewer fits on "
                 f"at most {ap.PREVIEW_FIT_IMAGES:,} for speed; turn on *Fit as training does* in the "
                 "sidebar for the exact fit)")
    if fit_key[0] == "sample":
        text += (" — fewer images than the 3,072 values per image, so most directions are only "
                 "regularized by epsilon; with CIFAR-10 present it is fitted on the training set")
    eps = getattr(op, "epsilon", None)
    st.caption(text + (f"; epsilon {eps:g}." if eps is not None else "."))
    if getattr(op, "matrix", None) is None or getattr(op, "shape", None) != (3, 32, 32):
        return
    filters = ap.zca_filters(op)
    st.image([enlarge(source.tile, 3), enlarge(ap.alone_tile(op, source.tile), 3)] + [enlarge(f, 9) for f in filters],
             caption=["original", f"{name} alone (stretched)", "weights → centre R", "weights → centre G",
                      "weights → centre B"], output_format="PNG")
    st.caption("The fitted transform: each output pixel is a weighted sum of all input pixels. The last "
               "three images show the weights feeding the centre pixel's red, green and blue outputs, over "
               "the 11×11 pixels around it (grey = 0, brighter = positive; the pixel's weight on itself "
               "is off the scale). A tight centre-surround pattern means the whitening mostly sharpens "
               "edges; a smaller epsilon makes it tighter.")


def render_histograms(source: ap.Source, v: ap.Variants) -> None:
    import altair as alt
    df = ap.channel_histograms(source.tile, v)
    chart = (alt.Chart(df).mark_line(interpolate="step-after")
             .encode(x=alt.X("value:Q", title="pixel value"), y=alt.Y("fraction:Q", title="fraction"),
                     color=alt.Color("stage:N", scale=alt.Scale(domain=["before", "after"],
                                                                range=["#888888", "#e4572e"])),
                     strokeDash=alt.StrokeDash("stage:N", legend=None))
             .properties(height=120, width=150)
             .facet(column=alt.Column("channel:N", sort=["R", "G", "B"], title=None)))
    st.caption(f"Per-channel histograms: the original tile (before) and all {v.n} variants (after).")
    st.altair_chart(chart)


def reproduce(label: str, chain: AugmentChain, source: ap.Source, n: int, seed: int,
              fits: list[Fit] | None = None) -> None:
    """The snippet that reproduces the grid, and the link that takes the chain to the Train page."""
    capped = {fit.index: fit.op.fit_count for fit in fits or [] if fit.capped}
    fit_line, fit_imports = ap.fit_code_line(chain, on_training_set=fit_source()[0][0] == "train",
                                             fit_images=capped)
    st.code(ap.code_snippet(chain.specs, source, n, seed, ap.mixes_images(chain), fit_line, fit_imports),
            language="python")
    value = ap.chain_link_value(chain.specs)
    try:
        st.page_link("app_pages/1_Train.py", label=f"Use {label} in training", icon=":material/model_training:",
                     query_params={"chain": value})
    except Exception:  # this page run on its own (no Train page in the app): a plain link
        from urllib.parse import quote
        st.markdown(f"[Use {label} in training](Train?chain={quote(value)})")
    st.caption("Opens the Train page with this chain in its form (every other field from the first preset).")
