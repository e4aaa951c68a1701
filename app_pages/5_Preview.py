"""Augmentation previewer: any chain of the registry's augmentations, live, on the bundled sample,
CIFAR-10 itself or your own images; N seeded variants per image with the parameters sampled for
each, two chains side by side, the code to reproduce it and a link that takes the chain to training.

Links: ?chain=<JSON list or 'name:k=v@p;name2'> sets the chain, &compare=<same> turns on the
comparison with that second chain.
"""
from __future__ import annotations

import random


import streamlit as st

from cifar_core.augment import AugmentChain
from cifar_core.augment import preview as ap
from cifar_core.config import parse_chain
from cifar_core.images import enlarge
from ui import preview as pv
from ui.common import data_status, friendly_errors
from ui.forms import augment_chain_editor, set_augment_chain

DEFAULT_A = [{"name": "random_crop", "params": {"padding": 4}, "p": 1.0}, {"name": "hflip"}]
DEFAULT_B = [{"name": "random_resized_crop", "p": 1.0}]
EXAMPLE = ([{"name": "zoom", "p": 1.0}], [{"name": "random_resized_crop", "p": 1.0}])
KEYS = {"A": "preview.a", "B": "preview.b"}

st.set_page_config(page_title="Augmentation previewer · CIFAR-10 Lab", page_icon="🧪", layout="wide")
st.title("Augmentation previewer")
st.caption("Every augmentation of the lab, on real 32×32 images: build a chain, see N seeded variants "
           "per image with the parameters drawn for each tile (hover a tile or read under it), compare "
           "two chains on the same images and seed, then copy the code or take the chain to training.")


# ---- chains from the link (?chain=, &compare=) ------------------------------------------------------
def chain_from_link(param: str, key: str) -> bool:
    raw = st.query_params.get(param)
    if not raw or st.session_state.get(f"preview.link.{param}") == raw:
        return False
    st.session_state[f"preview.link.{param}"] = raw
    with friendly_errors("Reading the augmentation chain from the link"):
        set_augment_chain(key, parse_chain(raw))
        return True
    return False


chain_from_link("chain", KEYS["A"])
if chain_from_link("compare", KEYS["B"]):
    st.session_state["preview.compare"] = True


def reroll() -> None:
    st.session_state["preview.seed"] = random.randrange(1_000_000)


def load_example() -> None:
    set_augment_chain(KEYS["A"], EXAMPLE[0])
    set_augment_chain(KEYS["B"], EXAMPLE[1])


# ---- sidebar: images and grid -----------------------------------------------------------------------
sources: list[ap.Source] = []
uploads: list = []
data_missing = None
with st.sidebar:
    st.header("Images")
    st.session_state.setdefault("preview.source", "sample")
    kind = st.radio("Source", list(pv.SOURCE_LABELS), format_func=pv.SOURCE_LABELS.get, key="preview.source")
    with friendly_errors("Choosing the image"):
        if kind == "dataset":
            status = data_status()
            if status["ok"]:
                sources = [pv.pick_dataset()]
            else:
                data_missing = status["message"]
                sources = [pv.pick_sample()]
        elif kind == "upload":
            uploads = pv.pick_uploads()
        else:
            sources = [pv.pick_sample()]

    st.header("Grid")
    st.session_state.setdefault("preview.grid", "8×8")
    grid = st.selectbox("Variants per image", list(pv.GRIDS), key="preview.grid",
                        help="Rows × columns of augmented copies of each image.")
    st.session_state.setdefault("preview.all_rows", False)
    all_rows = st.toggle("All rows, however tall", key="preview.all_rows",
                         help=f"Off: when the captions and Mixup/CutMix partners make tiles tall, fewer rows "
                              f"are shown so that a grid stays under about {ap.MAX_GRID_PX:,} px.")
    st.session_state.setdefault("preview.compare", False)
    compare = st.toggle("Compare two chains", key="preview.compare",
                        help="Chain A and chain B side by side on the same images with the same seed.")
    st.session_state.setdefault("preview.scale", 2)
    scale = st.slider("Tile size (× 32 px)", 1, 6, key="preview.scale",
                      help="Tiles are enlarged with nearest neighbour: every pixel stays a square.")
    st.session_state.setdefault("preview.captions", True)
    captions = st.toggle("Parameters under each tile", key="preview.captions",
                         help="They are also shown when the pointer rests on a tile.")
    st.session_state.setdefault("preview.seed", 0)
    seed_col, reroll_col = st.columns([3, 2], vertical_alignment="bottom")
    seed = int(seed_col.number_input("Seed", 0, 2**31 - 1, step=1, key="preview.seed"))
    reroll_col.button("Reroll", key="preview.reroll", on_click=reroll, icon=":material/casino:",
                      help="A new random seed: new draws for every tile.")

rows, cols = pv.GRIDS[grid]

# ---- uploads: what was read and how -------------------------------------------------------------------
if data_missing:
    st.warning(f"{data_missing}\n\nShowing the bundled sample instead.")
if kind == "upload":
    if not uploads:
        st.info("Upload one or more images in the sidebar (PNG, JPEG, GIF, WebP, BMP, TIFF…). "
                + pv.upload_limits_text())
    else:
        with st.expander("Your images and how each was reduced to 32×32", expanded=True):
            for item in uploads:
                pv.show_upload(item)
        good = [item for item in uploads if item.image is not None]
        names = [item.name for item in good]
        if len(good) > 1:
            st.session_state.setdefault("preview.upload.pick", names[:1])
            st.session_state["preview.upload.pick"] = [x for x in st.session_state["preview.upload.pick"]
                                                       if x in names] or names[:1]
            picked = st.multiselect("Images to augment", names, key="preview.upload.pick",
                                    max_selections=pv.MAX_PREVIEWED)
            good = [img for img in good if img.name in picked]
        sources = [ap.upload_source(item.name, item.image) for item in good]

# ---- chain editors ------------------------------------------------------------------------------------
specs_by_label: dict[str, list] = {}
if compare:
    st.button("Example: zoom vs random resized crop", key="preview.example", on_click=load_example,
              help="The source report treats these as different augmentations: see why.")
    editor_columns = st.columns(2)
    results = st.container()  # the grids go below both editors
    for (label, key), col, default in zip(KEYS.items(), editor_columns, (DEFAULT_A, DEFAULT_B)):
        with col, st.container(border=True), friendly_errors(f"Chain {label}"):
            st.subheader(f"Chain {label}")
            specs_by_label[label] = augment_chain_editor(key, default)
else:
    # controls on the left, the live grid on the right
    editor_column, results = st.columns([4, 5])
    with editor_column, st.container(border=True), friendly_errors("The chain"):
        st.subheader("Chain")
        specs_by_label["A"] = augment_chain_editor(KEYS["A"], DEFAULT_A)

chains: dict[str, AugmentChain] = {}
fits: dict[str, list] = {}
full_fit = None
with results:
    for label, specs in specs_by_label.items():
        with friendly_errors(f"Chain {label}" if compare else "The chain"):
            chain = AugmentChain(specs, num_classes=ap.NUM_CLASSES)  # validates: ConfigError → message
            if full_fit is None and pv.needs_fit(chain):
                st.session_state.setdefault("preview.full_fit", False)
                full_fit = st.sidebar.toggle(
                    "Fit as training does", key="preview.full_fit",
                    help=f"Off: zca is fitted on at most {ap.PREVIEW_FIT_IMAGES:,} images, a few seconds (once, "
                         "then cached). On: on all the step's fit_images, as training fits it (10–25 s the "
                         "first time).")
            fitted, notes = pv.fit_steps(chain, full=bool(full_fit))
            chains[label] = ap.make_chain(chain.specs, fitted)
            fits[label] = notes

# ---- how many rows: the grid stays under ~MAX_GRID_PX unless "All rows" ---------------------------------
shown_rows = rows
if chains and not all_rows:
    shown_rows = min(ap.bounded_rows(rows, len(chain.specs), scale, captions, ap.mixes_images(chain))
                     for chain in chains.values())  # one count for both chains: the same draws
n = shown_rows * cols

# ---- the grids -------------------------------------------------------------------------------------
xs, ys, _ = ap.sample()
with results:
    if sources and chains and shown_rows < rows:
        st.caption(f"Showing {shown_rows} of {rows} rows ({n} variants) so that each grid stays under about "
                   f"{ap.MAX_GRID_PX:,} px tall; turn on *All rows* in the sidebar for all {rows * cols}.")
    if sources and chains:
        st.caption(f"Seed {seed}: every image and both chains use the same draws (tile k of A and tile k "
                   f"of B start from the same random state)." if compare else
                   f"Seed {seed}: the same seed gives the same {n} variants; Reroll for new ones.")
    for source in sources:
        st.subheader(source.title)
        columns = st.columns([1] + [3] * len(chains) if compare else [1, 6])
        with columns[0]:
            st.image(enlarge(source.tile, scale), caption="original, 32×32", output_format="PNG")
            if source.label != ap.UPLOAD_LABEL:
                st.caption(f"label: {ap.LABELS[source.label]}")
        for col, (label, chain) in zip(columns[1:], chains.items()):
            with col, friendly_errors(f"Chain {label}" if compare else "Augmenting"):
                if compare:
                    st.markdown(f"**Chain {label}**")
                if not chain.specs:
                    st.info("No steps: the images are used as they are. Add a step.")
                    continue
                fixed = ap.is_deterministic(chain)
                if fixed:
                    st.caption("Every step always applies and draws nothing: all variants are the same, "
                               "so one is shown.")
                v = ap.run_variants(chain, source.tile, source.label, 1 if fixed else n, seed, xs, ys)
                pv.render_variants(v, source, 1 if fixed else cols, scale, captions,
                                   f"pv-grid pv-grid-{label.lower()}", fits.get(label, []))

# ---- reproduce / train --------------------------------------------------------------------------------
if chains:
    st.divider()
    st.subheader("Reproduce it, train with it")
    example = sources[0] if sources else ap.sample_source(0)
    columns = st.columns(len(chains))
    for col, (label, chain) in zip(columns, chains.items()):
        with col, friendly_errors("The code snippet"):
            name = f"chain {label}" if compare else "this chain"
            st.markdown(f"**{name.capitalize()}** with `cifar_core` (same image, seed and draws as the grid):")
            pv.reproduce(name, chain, example, n, seed, fits.get(label, []))
