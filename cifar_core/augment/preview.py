"""The augmentation previewer's computations (app_pages/5_Preview.py draws them with ui/preview.py).

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


def lambda_text(lam: float) -> str:
    """A mixing coefficient (Mixup's blend weight, CutMix's kept area) as fixed decimals: "λ=0.53".
    Beta(α, α) with a small α often draws values within 1e-6 of 0 or 1; those read "λ<0.01" or
    "λ>0.99" (the image is almost all partner, or almost untouched) instead of "7.36e-07" or a
    misleading "λ=0.00"."""
    lam = float(lam)
    if 0.0 < lam < 0.005:
        return "λ<0.01"
    if 0.995 <= lam < 1.0:
        return "λ>0.99"
    return f"λ={lam:.2f}"


def describe(v: Variants, i: int, short: bool = False) -> list[str]:
    """One line per step: what was sampled for tile i ('–' when the step did not apply).
    short=True, for the caption under a tile (the hover title has the long form): the partner is
    left out (its thumbnail is under the tile) and a step's only value goes without its name
    ("rotation -12.3")."""
    lines = []
    for key, entry in v.records[i].items():
        applied = entry.get("applied", True)
        values = {k: val for k, val in entry.items() if k != "applied" and not (short and k == "partner")}
        if not applied:
            lines.append(f"{key}: –")
            continue
        parts = []
        for k, val in values.items():
            if k == "partner":
                parts.append(f"partner={partner_name(int(val), v)}")
            elif k == "lam":
                parts.append(lambda_text(float(val)))
            elif short and len(values) == 1:
                parts.append(format_value(val))
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


# The grid's vertical layout, in CSS px: grid_html draws exactly these sizes, so that the page can
# bound a grid's height before drawing it (bounded_rows).
CAPTION_FONT_PX = 10
CAPTION_LINE_PX = 12.5  # 10 px text, line-height 1.25
STEP_LINES = 2  # a step's caption wraps between words onto at most 2 lines (then an ellipsis)
CAPTION_TOP_PX = 2
MIX_ROW_PX = 34  # the partner thumbnails (32 px) under a mixed tile
MIX_BLOCK_PX = 2 + MIX_ROW_PX + CAPTION_LINE_PX  # margin, thumbnails, the label weights line
GAP_PX = 6
MAX_GRID_PX = 1000  # the default grid's height bound


def tile_height_px(n_steps: int, scale: int, captions: bool, mixing: bool) -> float:
    """The height of one grid cell at most (a tile is 32*scale px, less when the column is narrower)."""
    height = 32.0 * scale
    if mixing:
        height += MIX_BLOCK_PX
    if captions:
        height += CAPTION_TOP_PX + CAPTION_LINE_PX * STEP_LINES * n_steps
    return height


def grid_height_px(rows: int, n_steps: int, scale: int, captions: bool, mixing: bool) -> float:
    """The height of a grid of `rows` rows for a chain of n_steps steps (at most; see tile_height_px)."""
    return rows * tile_height_px(n_steps, scale, captions, mixing) + max(0, rows - 1) * GAP_PX


def bounded_rows(rows: int, n_steps: int, scale: int, captions: bool, mixing: bool,
                 max_px: float = MAX_GRID_PX) -> int:
    """The most rows (≤ rows, ≥ 1) whose grid stays within max_px: a long chain with Mixup and CutMix
    under 64-px tiles takes ~160 px a row, so an 8-row grid would reach 1,300 px."""
    per_row = tile_height_px(n_steps, scale, captions, mixing) + GAP_PX
    return max(1, min(int(rows), int((max_px + GAP_PX) // per_row)))


def _line(text: str, title: str | None = None, bold: bool = False, lines: int = 1) -> str:
    """A caption of at most `lines` lines: wrapped only between words (never inside one), cut with an
    ellipsis when longer; the whole text is its title (and in the tile's hover title)."""
    body = html.escape(text)
    if lines == 1:
        layout = "white-space:nowrap;text-overflow:ellipsis"
    else:
        layout = (f"display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:{lines};"
                  "overflow-wrap:normal;word-break:normal")
    return (f'<div title="{html.escape(title or text, quote=True)}" style="{layout};overflow:hidden;'
            f'max-height:{CAPTION_LINE_PX * lines}px">' + (f"<b>{body}</b>" if bold else body) + "</div>")


def grid_html(v: Variants, cols: int, scale: int, captions: bool = True, css_class: str = "pv-grid",
              partner_tiles: np.ndarray | None = None, source_tile: np.ndarray | None = None) -> str:
    """The N variants as an HTML grid of enlarged PNG tiles: sampled parameters as the hover title
    and (captions=True) as small text under each tile, one line per step in a short form; for mixing
    steps the partner image and the label weights too. Tiles are 32*scale px, shrunk (still
    pixelated) when the column is narrower. Every cell is at most tile_height_px tall."""
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
            extra = (f'<div style="font-size:{CAPTION_FONT_PX}px;line-height:1.25;margin-top:2px">'
                     f'<div style="height:{MIX_ROW_PX}px;white-space:nowrap;overflow:hidden">'
                     + (f'with {"".join(thumbs)}' if thumbs else "") + "</div>"
                     + _line(labels, f"labels: {labels}", bold=True) + "</div>")
        caption = ""
        if captions:
            short = describe(v, i, short=True)
            caption = (f'<figcaption style="font-size:{CAPTION_FONT_PX}px;line-height:1.25;opacity:.8;'
                       f'margin-top:{CAPTION_TOP_PX}px">'
                       + "".join(_line(s, full, lines=STEP_LINES) for s, full in zip(short, lines))
                       + "</figcaption>")
        cells.append(f'<figure style="margin:0;min-width:0"><img src="{data_uri(enlarge(tiles[i], scale))}" '
                     f'width="{px}" height="{px}" alt="variant {i + 1}" title="{title}" '
                     'style="image-rendering:pixelated;display:block;width:100%;height:auto"/>'
                     f'{extra}{caption}</figure>')
    return (f'<div class="{css_class}" style="display:grid;grid-template-columns:repeat({cols},'
            f'minmax(0,{px}px));gap:{GAP_PX}px;align-items:start">' + "".join(cells) + "</div>")


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


PREVIEW_FIT_IMAGES = 2000  # the previewer's default cap on the images a fit (zca) uses; see fit_count


def fit_count(requested: int, available: int, full: bool = False) -> int:
    """How many images the previewer fits a step (zca) on: the step's fit_images as training would
    use them (full=True), else at most PREVIEW_FIT_IMAGES of them, so that the first look at a fit
    takes seconds instead of tens of seconds: fewer images than the 3,072 values of an image are
    decomposed through their 2,000 x 2,000 Gram matrix (ZCAOp.fit; on one core 2.3-3.0 s instead of
    13.4 s for the 20,000 images training uses, 7.9 s instead of 49 s with the cores busy). Never
    more than there are."""
    count = min(int(requested), int(available))
    return count if full else min(count, PREVIEW_FIT_IMAGES)


def fit_code_line(chain: AugmentChain, on_training_set: bool,
                  fit_images: dict[int, int] | None = None) -> tuple[str | None, tuple[str, ...]]:
    """The snippet lines that fit the chain's steps that need a fit (zca) as the page fitted them, and
    their imports; (None, ()) when no step needs one. fit_images: {step index: images} where the page
    fitted a step on fewer images than the step's fit_images (the snippet then does the same)."""
    if not any(getattr(op, "needs_fit", False) for op in chain.ops):
        return None, ()
    lines = []
    for i, count in sorted((fit_images or {}).items()):
        requested = int(chain.specs[i].get("params", {}).get("fit_images", count))
        if count < requested:
            lines.append(f"chain.ops[{i}].fit_images = {count}  # as the page, for speed (training uses "
                         f"{requested:,})")
    if on_training_set:
        lines.append("chain.fit(load_cifar10().x_train)  # as the page: fitted on the training set")
        return "\n".join(lines), ("from cifar_core.data import load_cifar10",)
    lines.append("chain.fit(xs)  # as the page: fitted on the bundled sample (CIFAR-10 not found)")
    return "\n".join(lines), ()


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
