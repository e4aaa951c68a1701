"""Classify: your own photos through a shipped or exported ONNX model, under onnxruntime."""
from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from cifar_core.images import (MAX_PIXELS, MAX_UPLOAD_BYTES, PREPROCESS_DESCRIPTION, UPLOAD_TYPES, ImageReadError,
                               read_image)
from cifar_core.serve.inference import (ModelEntry, ModelUnusable, checkpoints_dir, default_model_index,
                                       discover_models, get_classifier, inspect_model)
from cifar_core.runs import atomic_write_bytes
from ui.common import friendly_errors, get_store

MAX_FILES = 200          # per request; each file is also bounded by MAX_UPLOAD_BYTES / MAX_PIXELS
DETAIL_LIMIT = 12        # images shown with their own chart; all of them are in the table
MAX_MODEL_UPLOAD_MB = 64  # a fp32 ResNet-18 export is ~45 MB
TILE_DISPLAY = 128       # the 32×32 tile enlarged with nearest-neighbour, pixels stay visible


def _pct(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "—"


def _model_label(entry) -> str:
    acc = entry.accuracy
    kind = {"shipped": "shipped", "run": "your export", "upload": "uploaded"}.get(entry.source, entry.source)
    return f"{entry.label} ({kind}{', test ' + _pct(acc) if acc is not None else ''})"


def uploaded_models() -> list:
    """Models the user uploaded in this session, saved under a content-addressed temporary name
    (the upload's own name is only a label and never becomes a path)."""
    upload = st.file_uploader("…or use your own .onnx model", type=["onnx"], key="classify_model_upload",
                              max_upload_size=MAX_MODEL_UPLOAD_MB,
                              help=f"Up to {MAX_MODEL_UPLOAD_MB} MB. Input (N, 3, 32, 32) RGB in [0, 1], "
                                   "output (N, 10) logits, as `python -m cifar_core export` writes them.")
    if upload is None:
        return []
    data = upload.getvalue()
    folder = Path(tempfile.gettempdir()) / "cifar_lab_uploaded_models"
    folder.mkdir(exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:20]}.onnx"
    if not path.exists():
        atomic_write_bytes(path, data)
    card, error = inspect_model(path)
    return [ModelEntry(f"upload/{path.name}", f"upload {upload.name}", path, "upload", card, error)]


def pick_model():
    with st.expander("Upload a model"):
        extra = uploaded_models()
    entries = discover_models(checkpoints_dir(), get_store()) + extra
    usable = [e for e in entries if e.usable]
    broken = [e for e in entries if not e.usable]
    if broken:
        with st.expander(f"{len(broken)} unusable model file{'s' if len(broken) != 1 else ''}"):
            for entry in broken:
                name = entry.label if entry.source == "upload" else entry.path.name
                st.markdown(f"- `{name}` ({entry.source}): {entry.error}")
    if not usable:
        st.warning("No usable model yet. Shipped models live in `checkpoints/`; export a finished run "
                   "with **Export to ONNX** on the Runs page or `python -m cifar_core export RUN`.")
        return None
    keys = [e.key for e in usable]
    wanted = st.query_params.get("model")
    index = keys.index(wanted) if wanted in keys else default_model_index(usable)
    key = st.selectbox("Model", keys, index=index, format_func=lambda k: _model_label(usable[keys.index(k)]))
    if st.query_params.get("model") != key:
        st.query_params["model"] = key
    return usable[keys.index(key)]


def model_card(entry) -> None:
    card = entry.card or {}
    with st.expander("Model card", expanded=False):
        if not card:
            st.caption("This file has no model card (no sidecar .card.json, no metadata).")
            return
        arch, evaluation = card.get("architecture") or {}, card.get("evaluation") or {}
        training = card.get("training") or {}
        cols = st.columns(4)
        cols[0].metric("architecture", str(arch.get("model", "?")))
        cols[1].metric("parameters", f"{arch['parameters']:,}" if isinstance(arch.get("parameters"), int) else "—")
        tta = card.get("test_time_augmentation") or {}
        # an int8 file, or one exported with other test-time views, is not what the run evaluated
        differs = bool(card.get("quantization")) or "chosen_at_export" in tta
        cols[2].metric("run's test accuracy (PyTorch)" if differs else "test accuracy (PyTorch)",
                       _pct(evaluation.get("test_acc")),
                       help="Measured at the end of training with the run's own weights precision and views; "
                            "this file differs (quantized or other test-time views)." if differs else None)
        cols[3].metric("this file's test accuracy (onnxruntime)", _pct(evaluation.get("onnxruntime_test_acc")))
        facts = [f"**{arch.get('summary') or arch.get('model', '?')}** ({arch.get('family', '?')} family)",
                 f"test-time flip {'on' if tta.get('flip') else 'off'}, translate {'on' if tta.get('translate') else 'off'}",
                 f"weights {card.get('weights_storage', '?')}", f"exported {card.get('date', '?')}"]
        if training.get("data"):
            facts.append(f"trained on {training.get('train_images') or '?'} images from {training['data']}")
        st.caption(" · ".join(facts))
        per_class = evaluation.get("onnxruntime_per_class_acc") or evaluation.get("per_class_acc")
        if isinstance(per_class, dict) and per_class:
            st.dataframe(pd.DataFrame({"class": list(per_class), "accuracy %": [round(100 * v, 2)
                                                                                for v in per_class.values()]}),
                         hide_index=True)
        if training.get("command"):
            st.markdown("Trained with")
            st.code(training["command"], language="bash")
        if card.get("export_command"):
            st.markdown("Exported with")
            st.code(card["export_command"], language="bash")
        st.markdown(f"**Preprocessing** (photo → model input): {card.get('preprocess', PREPROCESS_DESCRIPTION)}")
        st.json(card, expanded=False)


def unique_uploads(files) -> tuple[list, list[str]]:
    """The uploads, each file content once (by SHA-256): the uploader keeps a file added twice, or
    removed and added again, as two entries. Returns (files, notes on what was left out)."""
    kept, notes, seen = [], [], {}
    for upload in files:
        digest = hashlib.sha256(upload.getvalue()).hexdigest()
        if digest in seen:
            first = seen[digest]
            notes.append(f"{upload.name} was uploaded twice: listed once." if first == upload.name else
                         f"{upload.name} has the same content as {first}: listed once, as {first}.")
            continue
        seen[digest] = upload.name
        kept.append(upload)
    return kept, notes


def read_uploads(files) -> tuple[list, list[str]]:
    files, problems = unique_uploads(files)
    images = []
    for upload in files[:MAX_FILES]:
        try:
            images.append(read_image(upload.getvalue(), name=upload.name))
        except ImageReadError as exc:
            problems.append(str(exc))
    if len(files) > MAX_FILES:
        problems.append(f"Only the first {MAX_FILES} files were read ({len(files)} uploaded).")
    return images, problems


def _enlarged(tile: np.ndarray) -> Image.Image:
    return Image.fromarray(tile).resize((TILE_DISPLAY, TILE_DISPLAY), Image.Resampling.NEAREST)


def _bar_chart(top: list[tuple[str, float]]):
    frame = pd.DataFrame({"class": [c for c, _ in top], "probability": [p for _, p in top]})
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("class:N", sort="-x", title=None),
        tooltip=["class", alt.Tooltip("probability:Q", format=".2%")])


def _chart_height(top: list) -> int:
    return 34 * len(top) + 70  # a readable bar row per class plus the probability axis


def show_detail(image, top) -> None:
    left, mid, right = st.columns([1.2, 0.8, 2])
    with left:
        st.image(image.original, caption=f"{image.name} ({image.original_size[0]}×{image.original_size[1]}, "
                                         f"{image.original_mode})", width="stretch")
    with mid:
        st.image(_enlarged(image.tile), caption="what the model sees (32×32)")
    with right:
        st.markdown(f"**{top[0][0]}** — {100 * top[0][1]:.1f}%")
        # an explicit pixel height: with the default height="content", Streamlit 1.67 squeezed the bars
        st.altair_chart(_bar_chart(top), width="stretch", height=_chart_height(top))
        if image.steps:
            st.caption("Reduced by: " + "; ".join(image.steps))


def results_table(images, prediction, k: int) -> pd.DataFrame:
    rows = []
    for image, top in zip(images, prediction.top_k(k)):
        row = {"file": image.name}
        for rank, (cls, prob) in enumerate(top, 1):
            row[f"top{rank}"] = cls
            row[f"p{rank}"] = round(prob, 4)
        rows.append(row)
    return pd.DataFrame(rows)


@st.cache_resource(show_spinner=False)
def sample_images():
    """A few bundled CIFAR-10 test images (already 32×32), read through the same function."""
    from cifar_core.data import load_sample
    x, y, classes = load_sample()
    picks = [int(np.flatnonzero(y == c)[0]) for c in range(len(classes))]
    out = []
    for i in picks:
        buffer = io.BytesIO()
        Image.fromarray(x[i]).save(buffer, format="PNG")
        out.append(read_image(buffer.getvalue(), name=f"sample-{classes[y[i]]}.png"))
    return out


def page() -> None:
    entry = pick_model()
    if entry is None:
        return
    model_card(entry)
    try:
        classifier = get_classifier(entry.path)
    except (ModelUnusable, OSError) as exc:
        st.error(f"This model can't be used: {exc}")
        return
    files = st.file_uploader(
        "Upload photos (one or many)", type=UPLOAD_TYPES, accept_multiple_files=True, key="classify_images",
        help=f"Up to {MAX_UPLOAD_BYTES // 2**20} MB and {MAX_PIXELS / 1e6:.0f} megapixels per image. "
             f"{PREPROCESS_DESCRIPTION}")
    k = st.slider("Top-k", 1, len(classifier.classes), 3, key="classify_k")
    if files:
        images, problems = read_uploads(files)
    else:
        st.caption("No upload yet: showing ten bundled CIFAR-10 test images, one per class.")
        images, problems = sample_images(), []
    for problem in problems:
        st.warning(problem)
    if not images:
        st.info("None of the uploaded files could be read; see the messages above.")
        return
    prediction = classifier.predict(np.stack([im.tile for im in images]))
    st.caption(f"onnxruntime · **{prediction.provider}** · {prediction.latency_ms:.1f} ms for "
               f"{len(images)} image{'s' if len(images) != 1 else ''} "
               f"({prediction.latency_ms / len(images):.2f} ms each) · model `{entry.path.name}`",
               help="Wall time of this one onnxruntime call in the app's server process, as it happened. "
                    "When the browser runs on the same few CPU cores it is busy drawing the page at that "
                    "moment, which can make the call several times slower (on the 2-core dev box, the ten "
                    "samples with fastnet-int8: 57–87 ms with Chromium on the same cores, 8–10 ms without a "
                    "browser). Back-to-back p50 figures are in bench/README.md.")
    tops = prediction.top_k(k)
    if len(images) > 1:
        table = results_table(images, prediction, k)
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button("Download predictions (CSV)", table.to_csv(index=False).encode(),
                           file_name="predictions.csv", mime="text/csv", icon=":material/download:")
    for image, top in list(zip(images, tops))[:DETAIL_LIMIT]:
        show_detail(image, top)
    if len(images) > DETAIL_LIMIT:
        st.caption(f"Details shown for the first {DETAIL_LIMIT} images; the table lists all {len(images)}.")


st.set_page_config(page_title="Classify · CIFAR-10 Lab", layout="wide")
st.title("Classify your photos")
st.caption("Each photo is reduced to 32×32 exactly as the model card says, then classified by an exported "
           "ONNX model under onnxruntime (CUDA if available, else CPU).")
with friendly_errors("Classifying"):
    page()
