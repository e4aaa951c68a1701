"""The augmentation previewer's workings (pages/5_Preview.py).

The first half computes, without touching the page: a batch of N copies of one 32×32 image (plus
partner images when a step mixes images) goes through one `AugmentChain` call with record=True, so
the N variants are augmented in one batched pass and every tile knows the parameters sampled for
it. The grid is one HTML block: each tile is enlarged with nearest neighbour on the server (pixels
stay square), PNG-encoded and inlined, with its sampled parameters as a hover title and a caption.
bench/bench_preview.py times exactly these functions.

The second half renders with Streamlit (sources, fits, grids, histograms, code, links).
"""
from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cifar_core.augment import AugmentChain
from cifar_core.data import CLASSES, load_sample
from cifar_core.images import enlarge, png_bytes

UPLOAD_LABEL = len(CLASSES)  # uploads get an 11th class, "your image", for Mixup/CutMix label weights
LABELS = tuple(CLASSES) + ("your image",)
NUM_CLASSES = len(LABELS)
GRIDS = {"2×2": (2, 2), "3×3": (3, 3), "4×4": (4, 4), "6×6": (6, 6), "8×8": (8, 8), "8×12": (8, 12)}
POOL_FACTOR = 3  # partner pool for batch-level steps: 3 other images per variant (sample images)


# ---------------------------------------------------------------------------------------------------
# pure computation (no Streamlit calls)
# ---------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One image to augment."""
    tile: np.ndarray  # uint8 (32, 32, 3)
    label: int  # class index, UPLOAD_LABEL for uploads
    title: str  # e.g. "cat · sample image 3 of its class"
    code: str  # Python lines that set `image` and `label` (for the snippet)
    imports: tuple[str, ...] = ()  # import lines those need
    key: str = ""


@dataclass
class Variants:
    """The result of one chain on N copies of one image."""
    specs: list[dict]
    out: np.ndarray  # float32 (n, 3, 32, 32), the values the model would see
    soft: np.ndarray | None  # float (n, NUM_CLASSES) label weights
    records: list[dict]  # per tile: {step key: {param: value, "applied": bool}}
    n: int
    pool: np.ndarray  # indices into the sample used as partners (empty when nothing mixes)
    normalizes: bool
    batch_level: bool
    keys: list[str] = field(default_factory=list)  # step keys as in records ("rotation", "hflip#2")


@contextlib.contextmanager
def one_thread():
    """Run torch ops on one intra-op thread. A grid is a tiny batch (64 images of 32×32) that more
    threads do not speed up, and while other processes keep the cores busy (a training job) the
    OpenMP threads wait on each other: the 3-step chain of bench/bench_preview.py measured 6.5 ms
    with 1 thread and 33-1000 ms with 2 on this 2-core machine under load. torch's setting is
    process-wide, so it is restored afterwards (another session running at the same moment only
    changes speed, never results)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def partner_pool(n: int, seed: int, pool_size_max: int) -> np.ndarray:
    """Indices of sample images that join the batch as Mixup/CutMix partners (seeded)."""
    size = min(POOL_FACTOR * n, pool_size_max)
    return np.random.default_rng(seed).choice(pool_size_max, size, replace=False)


def make_chain(specs: list[dict], fitted: dict[int, Any] | None = None) -> AugmentChain:
    """The chain, with already-fitted ops (zca) put in place of the steps that need a fit."""
    chain = AugmentChain(specs, num_classes=NUM_CLASSES)
    for i, op in (fitted or {}).items():
        chain.ops[i] = op
    return chain


def run_variants(chain: AugmentChain, tile: np.ndarray, label: int, n: int, seed: int,
                 pool_x: np.ndarray | None = None, pool_y: np.ndarray | None = None) -> Variants:
    """N augmented copies of `tile` in one batched chain call (seeded, parameters recorded).

    Steps that mix images (Mixup, CutMix) draw partners from the whole batch, so when the chain has
    one, a seeded pool of other images (pool_x, pool_y: the sample) joins the batch; only the N
    variants are returned."""
    batch_level = any(op.batch_level for op in chain.ops)
    x = np.repeat(np.asarray(tile, dtype=np.uint8)[None], n, axis=0)
    y = np.full(n, label, dtype=np.int64)
    pool = np.zeros(0, dtype=np.int64)
    if batch_level and pool_x is not None:
        pool = partner_pool(n, seed, len(pool_x))
        x = np.concatenate([x, pool_x[pool]])
        y = np.concatenate([y, np.asarray(pool_y, dtype=np.int64)[pool]])
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad(), one_thread():
        out, soft, records = chain(torch.from_numpy(x), torch.from_numpy(y), gen, record=True)
    return Variants(specs=chain.specs, out=out[:n].numpy(), soft=None if soft is None else soft[:n].numpy(),
                    records=records[:n], n=n, pool=pool, normalizes=chain.normalizes,
                    batch_level=batch_level, keys=list(chain.keys))


def is_deterministic(chain: AugmentChain) -> bool:
    """True when every step always applies and draws nothing: all variants would be identical."""
    return all(step["p"] >= 1 and not getattr(op, "stochastic", True)
               for step, op in zip(chain.specs, chain.ops))


def display_tiles(v: Variants) -> np.ndarray:
    """uint8 (n, 32, 32, 3) for display: clipped to [0, 1], or, when the chain normalizes (values
    leave [0, 1]), each tile stretched from its own min..max."""
    x = v.out
    if v.normalizes:
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-12)
    x = np.clip(x, 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


@functools.lru_cache(maxsize=1)
def sample() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The bundled sample, read once per process (shared: never modify the arrays)."""
    return load_sample()


def partner_name(p: int, v: Variants) -> str:
    """Who partner index p (in the batch) is: another copy of this image, or a pool image."""
    if p < v.n:
        return f"copy {p + 1} of this image"
    _, ys, _ = sample()
    idx = int(v.pool[p - v.n])
    return f"{CLASSES[int(ys[idx])]} (sample #{idx})"


def describe(v: Variants, i: int) -> list[str]:
    """One line per step: what was sampled for tile i ('–' when the step did not apply)."""
    lines = []
    for key, entry in v.records[i].items():
        applied = entry.get("applied", True)
        values = {k: val for k, val in entry.items() if k != "applied"}
        if not applied:
            lines.append(f"{key}: –")
            continue
        parts = []
        for k, val in values.items():
            if k == "partner":
                parts.append(f"partner={partner_name(int(val), v)}")
            elif k == "lam":
                parts.append(f"λ={_fmt(float(val))}")
            else:
                parts.append(f"{k}={_fmt(val)}")
        lines.append(f"{key} " + ", ".join(parts) if parts else f"{key} ✓")
    return lines


def label_weights(v: Variants, i: int) -> list[tuple[str, float]]:
    if v.soft is None:
        return []
    row = v.soft[i]
    order = np.argsort(-row)
    return [(LABELS[int(c)], float(row[c])) for c in order if row[c] >= 0.005]


def _data_uri(array: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def grid_html(v: Variants, cols: int, scale: int, captions: bool = True, css_class: str = "pv-grid",
              partner_tiles: np.ndarray | None = None, source_tile: np.ndarray | None = None) -> str:
    """The N variants as an HTML grid of enlarged PNG tiles: sampled parameters as the hover title
    and (captions=True) as small text under each tile; for mixing steps the partner image and the
    label weights too. Tiles are 32*scale px, shrunk (still pixelated) when the column is narrower."""
    tiles = display_tiles(v)
    px = 32 * scale
    cells = []
    mixing = [k for k in v.keys if any("partner" in r.get(k, {}) for r in v.records)]
    for i in range(v.n):
        lines = describe(v, i)
        weights = label_weights(v, i)
        labels = ", ".join(f"{name} {w:.2f}" for name, w in weights)
        hover = lines + ([f"labels: {labels}"] if v.batch_level and weights else [])
        title = html.escape(f"variant {i + 1}\n" + "\n".join(hover), quote=True)
        extra = ""
        if mixing and partner_tiles is not None and source_tile is not None:
            thumbs = []
            for key in mixing:
                entry = v.records[i].get(key, {})
                if not entry.get("applied") or "partner" not in entry:
                    continue
                p = int(entry["partner"])
                thumb = source_tile if p < v.n else partner_tiles[int(v.pool[p - v.n])]
                thumbs.append(f'<img src="{_data_uri(thumb)}" width="32" height="32" '
                              f'title="{html.escape(key + " partner: " + partner_name(p, v), quote=True)}" '
                              'style="image-rendering:pixelated;vertical-align:middle;margin-right:3px"/>')
            extra = ('<div style="font-size:10px;line-height:1.2;margin-top:2px">'
                     + (f'with {"".join(thumbs)}<br/>' if thumbs else "")
                     + f"<b>{html.escape(labels)}</b></div>")
        caption = ""
        if captions:
            caption = ('<figcaption style="font-size:10px;line-height:1.25;opacity:.8;margin-top:2px;'
                       'overflow-wrap:anywhere">' + "<br/>".join(html.escape(s) for s in lines) + "</figcaption>")
        cells.append(f'<figure style="margin:0;min-width:0"><img src="{_data_uri(enlarge(tiles[i], scale))}" '
                     f'width="{px}" height="{px}" alt="variant {i + 1}" title="{title}" '
                     'style="image-rendering:pixelated;display:block;width:100%;height:auto"/>'
                     f'{extra}{caption}</figure>')
    return (f'<div class="{css_class}" style="display:grid;grid-template-columns:repeat({cols},'
            f'minmax(0,{px}px));gap:6px;align-items:start">' + "".join(cells) + "</div>")


def channel_histograms(tile: np.ndarray, v: Variants, bins: int = 32):
    """Per-channel value histograms of the original tile and of all N variants (fractions)."""
    import pandas as pd
    before = tile.astype(np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)
    after = v.out.transpose(1, 0, 2, 3).reshape(3, -1)  # (3, n*H*W)
    lo, hi = min(0.0, float(after.min())), max(1.0, float(after.max()))
    edges = np.linspace(lo, hi, bins + 1)
    rows = []
    for c, name in enumerate("RGB"):
        for stage, values in (("before", before[c].ravel()), ("after", after[c])):
            counts, _ = np.histogram(values, edges)
            frac = counts / max(1, values.size)
            rows += [{"channel": name, "stage": stage, "value": float(edges[b]), "fraction": float(frac[b])}
                     for b in range(bins)]
    return pd.DataFrame(rows)


def value_stats(v: Variants) -> dict:
    x = v.out.reshape(v.n, -1)
    means, stds = x.mean(1), x.std(1)
    return {"min": float(x.min()), "max": float(x.max()), "mean_lo": float(means.min()),
            "mean_hi": float(means.max()), "std_lo": float(stds.min()), "std_hi": float(stds.max())}


def code_snippet(specs: list[dict], source: Source, n: int, seed: int, mixing: bool,
                 fit_line: str | None) -> str:
    """Python that reproduces the grid with cifar_core (same images, seed and draws)."""
    pretty = "[\n" + "".join(f"    {dict(step)!r},\n" for step in specs) + "]"  # Python literals
    uploads = source.label == UPLOAD_LABEL
    lines = ["import numpy as np", "import torch", "",
             "from cifar_core.augment import AugmentChain",
             "from cifar_core.data import load_sample"]
    lines += list(source.imports)
    lines += ["", f"chain = AugmentChain({pretty}{', num_classes=11' if uploads else ''})"]
    if uploads:
        lines[-1] += "  # 11: the ten classes + 'your image'"
    lines += ["xs, ys, classes = load_sample()  # the bundled sample (200 CIFAR-10 test images)"]
    if fit_line:
        lines.append(fit_line)
    lines += [source.code, f"n, seed = {n}, {seed}",
              "batch = np.repeat(image[None], n, axis=0)  # n copies of one image, uint8 (n, 32, 32, 3)",
              "labels = np.full(n, label)"]
    if mixing:
        lines += ["# mixup/cutmix draw partners from the batch: add other images as partners",
                  f"pool = np.random.default_rng(seed).choice(len(xs), min({POOL_FACTOR} * n, len(xs)), "
                  "replace=False)",
                  "batch, labels = np.concatenate([batch, xs[pool]]), np.concatenate([labels, ys[pool]])"]
    lines += ["gen = torch.Generator().manual_seed(seed)",
              "out, soft_labels, records = chain(torch.from_numpy(batch), torch.from_numpy(labels), gen, "
              "record=True)",
              "out, soft_labels, records = out[:n], soft_labels[:n], records[:n]  # float (n, 3, 32, 32)",
              "print(records[0])  # the parameters sampled for the first tile"]
    return "\n".join(lines) + "\n"


def chain_link_value(specs: list[dict]) -> str:
    """The chain as the Train page's ?chain= value (compact JSON)."""
    return json.dumps(specs, separators=(",", ":"), default=list)


def zca_filters(op, crop: int = 11) -> np.ndarray:
    """uint8 (3, crop, crop, 3): the whitening weights feeding the centre pixel's R, G and B outputs
    (a row of the symmetric matrix as an image), cut to the crop×crop pixels around the centre, grey
    = 0. The large weight of the pixel on itself is left out of the scale (clipped), so the
    surround shows."""
    c, h, w = op.shape
    cy, cx = h // 2, w // 2
    rows = op.matrix[[ch * h * w + cy * w + cx for ch in range(c)]].numpy().reshape(c, c, h, w)
    y0, x0 = cy - crop // 2, cx - crop // 2
    out = []
    for r in rows:
        r = r[:, y0:y0 + crop, x0:x0 + crop].copy()
        around = r.copy()
        around[:, crop // 2, crop // 2] = 0.0
        m = float(np.abs(around).max()) or 1.0
        img = np.clip(0.5 + 0.5 * r / m, 0.0, 1.0)
        out.append(np.rint(img * 255).astype(np.uint8).transpose(1, 2, 0))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------------
# Streamlit rendering
# ---------------------------------------------------------------------------------------------------

import os  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402

import streamlit as st  # noqa: E402

from cifar_core.images import (MAX_PIXELS, MAX_UPLOAD_BYTES, PREPROCESS_DESCRIPTION, UPLOAD_TYPES,  # noqa: E402
                               ImageReadError, read_image)
from ui.common import data_source, data_status  # noqa: E402

MAX_FILES = 8  # uploads read per page view
MAX_PREVIEWED = 4  # uploaded images with a grid at once
SOURCE_LABELS = {"sample": "Bundled sample (200 test images)", "dataset": "CIFAR-10 dataset",
                 "upload": "Your images (upload)"}


def _set_state(key: str, value) -> None:
    st.session_state[key] = value


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


def sample_source(i: int, k: int | None = None) -> Source:
    xs, ys, _ = sample()
    cls = CLASSES[int(ys[i])]
    which = f"sample image {k} of its class (sample #{i})" if k is not None else f"sample #{i}"
    return Source(tile=xs[i], label=int(ys[i]), title=f"{cls} · {which}",
                  code=f"image, label = xs[{i}], int(ys[{i}])  # {cls}, sample #{i}", key=f"sample:{i}")


def pick_sample() -> Source:
    _, ys, _ = sample()
    _, k, i = _class_and_index("preview.sample", ys, slider=True)
    return sample_source(i, k)


@st.cache_resource(show_spinner="Loading CIFAR-10…", max_entries=2)
def dataset(source: str | None, data_dir: str | None):
    """The CIFAR-10 arrays, shared by every session (read-only)."""
    from cifar_core.data import load_cifar10
    return load_cifar10(source, data_dir)


def current_dataset():
    return dataset(data_source(), os.environ.get("CIFAR10_DATA_DIR"))


def pick_dataset() -> Source:
    arrays = current_dataset()
    st.session_state.setdefault("preview.data.split", "test")
    split = st.radio("Split", ["train", "test"], horizontal=True, key="preview.data.split")
    x, y = (arrays.x_train, arrays.y_train) if split == "train" else (arrays.x_test, arrays.y_test)
    cls, k, i = _class_and_index("preview.data", y, slider=False)
    return Source(tile=np.asarray(x[i]), label=int(y[i]), title=f"{cls} · {split} image #{i:,}",
                  code=(f"data = load_cifar10()  # finds CIFAR-10 as the app does (CIFAR10_NPZ, the cache)\n"
                        f"image, label = data.x_{split}[{i}], int(data.y_{split}[{i}])  # {cls}"),
                  imports=("from cifar_core.data import load_cifar10",), key=f"{split}:{i}")


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


def upload_source(item: Upload) -> Source:
    img = item.image
    name = img.name.replace("\\", "/").split("/")[-1]
    return Source(tile=img.tile, label=UPLOAD_LABEL, title=f"{item.name} (your image)",
                  code=f"image, label = read_image({name!r}).tile, 10  # your file reduced to 32×32; "
                       "10 = 'your image'",
                  imports=("from cifar_core.images import read_image",), key=f"upload:{item.name}")


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
    with warnings.catch_warnings(), one_thread():  # arrays are read-only on purpose; fit only reads
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return op.fit(_fit_images(fit_key), **kw)


def _fit_images(fit_key: tuple) -> np.ndarray:
    if fit_key[0] == "train":
        return dataset(fit_key[1], fit_key[2]).x_train
    return sample()[0]


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


def fit_steps(chain: AugmentChain) -> tuple[dict[int, Any], list[tuple[str, Any]]]:
    """Fitted ops for the steps that need a fit, cached across reruns and sessions (a zca fit on
    the training set takes seconds; changing epsilon reuses its eigendecomposition)."""
    from cifar_core.augment import ZCAOp
    fitted, notes = {}, []
    fit_key, what = fit_source()
    for i, (step, op) in enumerate(zip(chain.specs, chain.ops)):
        if not getattr(op, "needs_fit", False):
            continue
        available = len(_fit_images(fit_key))
        count = min(int(getattr(op, "fit_images", available)), available)
        with st.spinner(f"Fitting {step['name']} on {what} ({count:,} images): once, then cached…"):
            if isinstance(op, ZCAOp):
                # fit_images beyond the available images all give the same fit: one cache entry
                fitted[i] = _zca(fit_key, count, float(op.epsilon))
            else:
                fitted[i] = _fitted_other(fit_key, step["name"], json.dumps(step["params"], default=list))
        notes.append((step["name"], fitted[i]))
    return fitted, notes


def fit_code_line(chain: AugmentChain) -> tuple[str | None, tuple[str, ...]]:
    if not any(getattr(op, "needs_fit", False) for op in chain.ops):
        return None, ()
    fit_key, _ = fit_source()
    if fit_key[0] == "train":
        return ("chain.fit(load_cifar10().x_train)  # as the page: fitted on the training set",
                ("from cifar_core.data import load_cifar10",))
    return "chain.fit(xs)  # as the page: fitted on the bundled sample (CIFAR-10 not found)", ()


# ---- one chain's result -----------------------------------------------------------------------------

def render_variants(v: Variants, source: Source, chain: AugmentChain, cols: int, scale: int,
                    captions: bool, css_class: str, fit_notes) -> None:
    xs, _, _ = sample()
    st.html(grid_html(v, cols, scale, captions, css_class=css_class,
                      partner_tiles=xs if v.batch_level else None, source_tile=source.tile))
    tags = {t for step in v.specs for t in _tags(step["name"])}
    if v.batch_level:
        own = LABELS[source.label]
        kept = float(np.mean([dict(label_weights(v, i)).get(own, 0.0) for i in range(v.n)]))
        st.caption(f"Mixing steps draw each variant's partner from the batch: these {v.n} copies plus "
                   f"{len(v.pool)} other images of the bundled sample, as in a training batch. Under each "
                   f"tile: the partner and the resulting label weights; on average **{kept:.2f}** of the "
                   f"label stays '{own}'.")
    if v.normalizes:
        s = value_stats(v)
        st.caption(f"Values after the chain (what the model sees): **min {s['min']:.2f}, max {s['max']:.2f}**; "
                   f"per-tile mean {s['mean_lo']:.3f} … {s['mean_hi']:.3f}, std {s['std_lo']:.3f} … "
                   f"{s['std_hi']:.3f}. The tiles are stretched from their own min … max for display.")
    for name, op in fit_notes:
        render_fit_note(name, op, source)
    if "color" in tags:
        render_histograms(source, v)


def _tags(name: str) -> tuple[str, ...]:
    from cifar_core.augment import AUGMENTATIONS
    entry = AUGMENTATIONS.entries.get(name)
    return entry.tags if entry else ()


def render_fit_note(name: str, op, source: Source) -> None:
    fit_key, what = fit_source()
    count = getattr(op, "fit_count", 0)
    text = f"**{name}** is fitted on {what}" + (f", {count:,} images" if count else "")
    if fit_key[0] == "sample":
        text += (" — fewer images than the 3,072 values per image, so most directions are only "
                 "regularized by epsilon; with CIFAR-10 present it is fitted on the training set")
    eps = getattr(op, "epsilon", None)
    st.caption(text + (f"; epsilon {eps:g}." if eps is not None else "."))
    if getattr(op, "matrix", None) is None or getattr(op, "shape", None) != (3, 32, 32):
        return
    alone = Variants(specs=[], out=op(torch.from_numpy(source.tile).permute(2, 0, 1)[None].float() / 255.0,
                                      None, torch.Generator())[0].numpy(),
                     soft=None, records=[{}], n=1, pool=np.zeros(0, int), normalizes=True, batch_level=False)
    filters = zca_filters(op)
    st.image([enlarge(source.tile, 3), enlarge(display_tiles(alone)[0], 3)] + [enlarge(f, 9) for f in filters],
             caption=["original", f"{name} alone (stretched)", "weights → centre R", "weights → centre G",
                      "weights → centre B"], output_format="PNG")
    st.caption("The fitted transform: each output pixel is a weighted sum of all input pixels. The last "
               "three images show the weights feeding the centre pixel's red, green and blue outputs, over "
               "the 11×11 pixels around it (grey = 0, brighter = positive; the pixel's weight on itself "
               "is off the scale). A tight centre-surround pattern means the whitening mostly sharpens "
               "edges; a smaller epsilon makes it tighter.")


def render_histograms(source: Source, v: Variants) -> None:
    import altair as alt
    df = channel_histograms(source.tile, v)
    chart = (alt.Chart(df).mark_line(interpolate="step-after")
             .encode(x=alt.X("value:Q", title="pixel value"), y=alt.Y("fraction:Q", title="fraction"),
                     color=alt.Color("stage:N", scale=alt.Scale(domain=["before", "after"],
                                                                range=["#888888", "#e4572e"])),
                     strokeDash=alt.StrokeDash("stage:N", legend=None))
             .properties(height=120, width=150)
             .facet(column=alt.Column("channel:N", sort=["R", "G", "B"], title=None)))
    st.caption(f"Per-channel histograms: the original tile (before) and all {v.n} variants (after).")
    st.altair_chart(chart)


def reproduce(label: str, chain: AugmentChain, specs: list[dict], source: Source, n: int, seed: int) -> None:
    fit_line, fit_imports = fit_code_line(chain)
    src = Source(**{**source.__dict__, "imports": tuple(dict.fromkeys(source.imports + fit_imports))})
    mixing = any(op.batch_level for op in chain.ops)
    st.code(code_snippet(specs, src, n, seed, mixing, fit_line), language="python")
    value = chain_link_value(specs)
    try:
        st.page_link("pages/1_Train.py", label=f"Use {label} in training", icon=":material/model_training:",
                     query_params={"chain": value})
    except Exception:  # this page run on its own (no Train page in the app): a plain link
        from urllib.parse import quote
        st.markdown(f"[Use {label} in training](Train?chain={quote(value)})")
    st.caption("Opens the Train page with this chain in its form (every other field from the first preset).")
