"""The augmentation previewer's computations (pages/5_Preview.py draws them with ui/preview.py).

A batch of N copies of one 32×32 image (plus partner images when a step mixes images) goes through
one `AugmentChain` call with record=True, so the N variants are augmented in one batched pass and
every tile knows the parameters sampled for it. The grid is one HTML block: each tile is enlarged
with nearest neighbour (pixels stay square), PNG-encoded and inlined, with its sampled parameters as
a hover title and a caption. Also: per-channel histograms, value ranges, the Python snippet that
reproduces a grid and the ZCA filters. bench/bench_preview.py times exactly these functions.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..data import CLASSES, load_sample
from ..images import LoadedImage, enlarge, png_bytes
from .base import AUGMENTATIONS
from .chain import AugmentChain

UPLOAD_LABEL = len(CLASSES)  # uploads get an 11th class, "your image", for Mixup/CutMix label weights
LABELS = tuple(CLASSES) + ("your image",)
NUM_CLASSES = len(LABELS)
POOL_FACTOR = 3  # partner pool for batch-level steps: 3 other images per variant (sample images)


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


def mixes_images(chain: AugmentChain) -> bool:
    """True when a step mixes images of the batch (Mixup, CutMix): it needs partner images."""
    return any(op.batch_level for op in chain.ops)


def run_variants(chain: AugmentChain, tile: np.ndarray, label: int, n: int, seed: int,
                 pool_x: np.ndarray | None = None, pool_y: np.ndarray | None = None) -> Variants:
    """N augmented copies of `tile` in one batched chain call (seeded, parameters recorded).

    Steps that mix images (Mixup, CutMix) draw partners from the whole batch, so when the chain has
    one, a seeded pool of other images (pool_x, pool_y: the sample) joins the batch; only the N
    variants are returned."""
    batch_level = mixes_images(chain)
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


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


@functools.lru_cache(maxsize=1)
def sample() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The bundled sample, read once per process (shared: never modify the arrays)."""
    return load_sample()


def sample_source(i: int, k: int | None = None) -> Source:
    """Image i of the bundled sample (k: its index among the sample images of its class)."""
    xs, ys, _ = sample()
    cls = CLASSES[int(ys[i])]
    which = f"sample image {k} of its class (sample #{i})" if k is not None else f"sample #{i}"
    return Source(tile=xs[i], label=int(ys[i]), title=f"{cls} · {which}",
                  code=f"image, label = xs[{i}], int(ys[{i}])  # {cls}, sample #{i}", key=f"sample:{i}")


def dataset_source(x: np.ndarray, y: np.ndarray, split: str, i: int) -> Source:
    """Image i of a CIFAR-10 split (x, y: that split's arrays)."""
    cls = CLASSES[int(y[i])]
    return Source(tile=np.asarray(x[i]), label=int(y[i]), title=f"{cls} · {split} image #{i:,}",
                  code=(f"data = load_cifar10()  # finds CIFAR-10 as the app does (CIFAR10_NPZ, the cache)\n"
                        f"image, label = data.x_{split}[{i}], int(data.y_{split}[{i}])  # {cls}"),
                  imports=("from cifar_core.data import load_cifar10",), key=f"{split}:{i}")


def upload_source(name: str, image: LoadedImage) -> Source:
    """A user's image (read with cifar_core.images.read_image), shown as `name`."""
    file_name = image.name.replace("\\", "/").split("/")[-1]
    return Source(tile=image.tile, label=UPLOAD_LABEL, title=f"{name} (your image)",
                  code=f"image, label = read_image({file_name!r}).tile, 10  # your file reduced to 32×32; "
                       "10 = 'your image'",
                  imports=("from cifar_core.images import read_image",), key=f"upload:{name}")


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
                parts.append(f"λ={format_value(float(val))}")
            else:
                parts.append(f"{k}={format_value(val)}")
        lines.append(f"{key} " + ", ".join(parts) if parts else f"{key} ✓")
    return lines


def label_kept(v: Variants, label: int) -> float:
    """The mean weight that the image's own label keeps over the variants (1.0 without mixing)."""
    if v.soft is None:
        return 1.0
    own = LABELS[label]
    return float(np.mean([dict(label_weights(v, i)).get(own, 0.0) for i in range(v.n)]))


def step_tags(specs: list[dict]) -> set[str]:
    """The registry tags of a chain's steps ("color", "geometric", ...)."""
    entries = (AUGMENTATIONS.entries.get(step["name"]) for step in specs)
    return {tag for entry in entries if entry for tag in entry.tags}


def label_weights(v: Variants, i: int) -> list[tuple[str, float]]:
    if v.soft is None:
        return []
    row = v.soft[i]
    order = np.argsort(-row)
    return [(LABELS[int(c)], float(row[c])) for c in order if row[c] >= 0.005]


def data_uri(array: np.ndarray) -> str:
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
                thumbs.append(f'<img src="{data_uri(thumb)}" width="32" height="32" '
                              f'title="{html.escape(key + " partner: " + partner_name(p, v), quote=True)}" '
                              'style="image-rendering:pixelated;vertical-align:middle;margin-right:3px"/>')
            extra = ('<div style="font-size:10px;line-height:1.2;margin-top:2px">'
                     + (f'with {"".join(thumbs)}<br/>' if thumbs else "")
                     + f"<b>{html.escape(labels)}</b></div>")
        caption = ""
        if captions:
            caption = ('<figcaption style="font-size:10px;line-height:1.25;opacity:.8;margin-top:2px;'
                       'overflow-wrap:anywhere">' + "<br/>".join(html.escape(s) for s in lines) + "</figcaption>")
        cells.append(f'<figure style="margin:0;min-width:0"><img src="{data_uri(enlarge(tiles[i], scale))}" '
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
                 fit_line: str | None, fit_imports: tuple[str, ...] = ()) -> str:
    """Python that reproduces the grid with cifar_core (same images, seed and draws); `fit_line` (and
    its `fit_imports`) fits the steps that need it, see fit_code_line."""
    source = replace(source, imports=tuple(dict.fromkeys(source.imports + tuple(fit_imports))))
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


def fit_code_line(chain: AugmentChain, on_training_set: bool) -> tuple[str | None, tuple[str, ...]]:
    """The snippet line that fits the chain's steps that need a fit (zca) as the page fitted them, and
    its imports; (None, ()) when no step needs one."""
    if not any(getattr(op, "needs_fit", False) for op in chain.ops):
        return None, ()
    if on_training_set:
        return ("chain.fit(load_cifar10().x_train)  # as the page: fitted on the training set",
                ("from cifar_core.data import load_cifar10",))
    return "chain.fit(xs)  # as the page: fitted on the bundled sample (CIFAR-10 not found)", ()


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


def alone_tile(op, tile: np.ndarray) -> np.ndarray:
    """uint8 (32, 32, 3): one (fitted) op alone applied to a tile, stretched for display like a
    normalizing chain's tiles."""
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255.0
    out = op(x, None, torch.Generator())[0].numpy()
    alone = Variants(specs=[], out=out, soft=None, records=[{}], n=1, pool=np.zeros(0, int), normalizes=True,
                     batch_level=False)
    return display_tiles(alone)[0]
