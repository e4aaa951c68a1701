"""Classify 32×32 tiles with exported ONNX models under onnxruntime.

Models come from two places: the shipped checkpoints (`checkpoints/*.onnx`, or $CIFAR_LAB_CHECKPOINTS)
and the user's exported runs (`<runs>/<run_id>/export/*.onnx`). Each file is inspected before use
(readable, a valid ONNX graph, input (N, 3, 32, 32), output (N, 10)); a bad file is listed as unusable
with its reason and the other models keep working.

A file whose metadata declares another input (``input_range``, ``input_layout``, ``input_dtype``,
``Image.NominalPixelRange``, ``Image.BitmapPixelFormat``, or a ``normalization`` other than "none…")
is unusable too: this module always feeds float32 RGB (N, 3, 32, 32) in [0, 1], unnormalized, which is
what every exported file declares (see cifar_core.serve.export for the keys).

Sessions try the CUDA provider first and fall back to the CPU (onnxruntime-gpu without a GPU), are
cached per (file, modification time, size), and report which provider actually ran.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import CLASSES

__all__ = ["CHECKPOINTS_DIR", "MAX_MODEL_BYTES", "ModelEntry", "Prediction", "Classifier",
           "checkpoints_dir", "inspect_model", "discover_models", "create_session", "get_classifier",
           "tiles_to_input", "top_k", "ModelUnusable", "default_model_index"]

CHECKPOINTS_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
MAX_MODEL_BYTES = 512 * 1024 * 1024
CARD_KEY = "cifar_lab.card"
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ModelUnusable(ValueError):
    """The file cannot serve as a classifier; str() says why."""


def checkpoints_dir() -> Path:
    return Path(os.environ.get("CIFAR_LAB_CHECKPOINTS", CHECKPOINTS_DIR)).expanduser()


@dataclass
class ModelEntry:
    key: str                 # "shipped/<file>" or "run/<run_id>/<file>"
    label: str
    path: Path
    source: str              # "shipped" | "run"
    card: dict | None = None
    error: str | None = None  # why the model is unusable; None when usable

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def accuracy(self) -> float | None:
        """The card's test accuracy: this file's own (onnxruntime) if measured, else its run's."""
        evaluation = (self.card or {}).get("evaluation") or {}
        return evaluation.get("onnxruntime_test_acc", evaluation.get("test_acc"))


# ----------------------------------------------------------------------------------------------
# Inspection
# ----------------------------------------------------------------------------------------------

def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _card_from(path: Path, proto) -> dict | None:
    sidecar = path.with_suffix(".card.json")
    if sidecar.is_file():
        try:
            card = json.loads(sidecar.read_text(encoding="utf-8"))
            if isinstance(card, dict):
                return card
        except (OSError, ValueError):
            pass
    for prop in proto.metadata_props:
        if prop.key == CARD_KEY:
            try:
                card = json.loads(prop.value)
                return card if isinstance(card, dict) else None
            except ValueError:
                return None
    return None


def _inspect(path: Path) -> dict | None:
    """The model card (or None); raises ModelUnusable with the reason."""
    import onnx
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelUnusable(f"cannot read the file ({exc.strerror or exc})") from None
    if size == 0:
        raise ModelUnusable("empty file")
    if size > MAX_MODEL_BYTES:
        raise ModelUnusable(f"file is {size / 2**20:.0f} MB, over the {MAX_MODEL_BYTES // 2**20} MB limit")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnusable(f"not a valid ONNX model ({first_line[:200]})") from None
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelUnusable(f"expected one input and one output, found {len(inputs)} and "
                            f"{len(proto.graph.output)}")
    in_dims, out_dims = _dims(inputs[0]), _dims(proto.graph.output[0])
    if len(in_dims) != 4 or in_dims[1:] != [3, 32, 32]:
        raise ModelUnusable(f"input shape {in_dims} is not (N, 3, 32, 32)")
    if len(out_dims) != 2 or out_dims[1] != len(CLASSES):
        raise ModelUnusable(f"output shape {out_dims} is not (N, {len(CLASSES)})")
    _check_declared_input({prop.key: prop.value for prop in proto.metadata_props})
    return _card_from(path, proto)


# what this module feeds every graph (tiles_to_input), in the keys exported files declare it with
FED_INPUT = {"input_range": "[0, 1]", "input_layout": "NCHW", "input_dtype": "float32",
             "Image.NominalPixelRange": "normalized_0_1", "Image.BitmapPixelFormat": "rgb8"}


def _check_declared_input(metadata: dict[str, str]) -> None:
    """Refuse a file whose metadata declares an input other than the one fed here (RGB float32 NCHW in
    [0, 1], not normalized): it would classify garbage. Files that declare nothing are taken as they are."""
    for key, fed in FED_INPUT.items():
        declared = metadata.get(key)
        if declared is not None and declared.strip().lower() != fed.lower():
            raise ModelUnusable(f"its metadata declares {key} {declared!r}; this app feeds {fed!r}")
    normalization = metadata.get("normalization")
    if normalization is not None and not normalization.strip().lower().startswith("none"):
        raise ModelUnusable(f"its metadata asks for input normalization ({normalization[:80]!r}); this app "
                            "feeds [0, 1] RGB and expects the graph to normalize")


_INSPECT_CACHE: dict[tuple, tuple[dict | None, str | None]] = {}


def inspect_model(path: str | Path) -> tuple[dict | None, str | None]:
    """(card, error) for a model file; cached per (path, mtime, size)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or exc})"
    if key not in _INSPECT_CACHE:
        try:
            _INSPECT_CACHE[key] = (_inspect(path), None)
        except ModelUnusable as exc:
            _INSPECT_CACHE[key] = (None, str(exc))
    return _INSPECT_CACHE[key]


def _entry(key: str, label: str, path: Path, source: str) -> ModelEntry:
    card, error = inspect_model(path)
    if card and card.get("name") and source == "shipped":
        label = card["name"]
    return ModelEntry(key, label, path, source, card, error)


def default_model_index(entries: list[ModelEntry]) -> int:
    """Which usable model the Classify page preselects: one the user just uploaded, else the most
    accurate shipped model, else the first."""
    for i, entry in enumerate(entries):
        if entry.source == "upload":
            return i
    shipped = [(e.accuracy, i) for i, e in enumerate(entries) if e.source == "shipped" and e.accuracy is not None]
    return max(shipped)[1] if shipped else 0


def discover_models(checkpoints: str | Path | None = None, store=None) -> list[ModelEntry]:
    """Shipped models first (sorted by name), then exported runs (newest run first)."""
    root = Path(checkpoints) if checkpoints is not None else checkpoints_dir()
    entries = [_entry(f"shipped/{p.name}", p.stem, p, "shipped")
               for p in sorted(root.glob("*.onnx")) if p.is_file()] if root.is_dir() else []
    if store is not None:
        for record in store.records():
            for p in sorted((record.path / "export").glob("*.onnx")):
                entries.append(_entry(f"run/{record.run_id}/{p.name}", f"run {record.run_id}", p, "run"))
    return entries


# ----------------------------------------------------------------------------------------------
# Sessions
# ----------------------------------------------------------------------------------------------

_CUDA_WORKS: bool | None = None
_LOCK = threading.Lock()


def _cuda_available() -> bool:
    """Whether onnxruntime can really create a CUDA session here (checked once, quietly)."""
    global _CUDA_WORKS
    if _CUDA_WORKS is None:
        import onnxruntime as ort
        _CUDA_WORKS = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from onnx import TensorProto, helper
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            ort.set_default_logger_severity(4)  # the failed CUDA load logs an error we expect on CPU hosts
            try:
                session = ort.InferenceSession(probe.SerializeToString(),
                                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                _CUDA_WORKS = session.get_providers()[0] == "CUDAExecutionProvider"
            except Exception:
                _CUDA_WORKS = False
            finally:
                ort.set_default_logger_severity(2)
    return _CUDA_WORKS


def default_providers() -> list[str]:
    return [p for p in PREFERRED_PROVIDERS if p != "CUDAExecutionProvider" or _cuda_available()]


def create_session(path: str | Path, providers: list[str] | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or default_providers())


def tiles_to_input(tiles: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) or (32, 32, 3) → float32 (N, 3, 32, 32) in [0, 1], the graphs' input."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[1:] != (32, 32, 3) or tiles.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (N, 32, 32, 3), got {tiles.dtype} {tiles.shape}")
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@dataclass
class Prediction:
    probs: np.ndarray          # (N, 10)
    latency_ms: float          # wall time of the session.run call
    provider: str
    classes: list[str] = field(default_factory=lambda: list(CLASSES))

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        return top_k(self.probs, k, self.classes)


def top_k(probs: np.ndarray, k: int, classes: list[str] | None = None) -> list[list[tuple[str, float]]]:
    classes = classes or list(CLASSES)
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


class Classifier:
    def __init__(self, path: str | Path, providers: list[str] | None = None):
        self.path = Path(path)
        card, error = inspect_model(self.path)
        if error:
            raise ModelUnusable(f"{self.path.name}: {error}")
        self.card = card or {}
        try:
            self.session = create_session(self.path, providers)
        except Exception as exc:
            raise ModelUnusable(f"{self.path.name}: onnxruntime cannot load it ({str(exc)[:200]})") from None
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.classes = list(self.card.get("classes") or CLASSES)

    def logits(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tiles_to_input(tiles)})[0]

    def predict(self, tiles: np.ndarray) -> Prediction:
        x = tiles_to_input(tiles)
        started = time.perf_counter()
        logits = self.session.run(None, {self.input_name: x})[0]
        latency = (time.perf_counter() - started) * 1000
        return Prediction(_softmax(logits.astype(np.float64)), latency, self.provider, self.classes)


_SESSIONS: dict[tuple, Classifier] = {}


def get_classifier(path: str | Path) -> Classifier:
    """A cached Classifier per (file, mtime, size): a re-exported file gets a fresh session."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key not in _SESSIONS:
            for old in [k for k in _SESSIONS if k[0] == key[0]]:
                del _SESSIONS[old]
            _SESSIONS[key] = Classifier(path)
        return _SESSIONS[key]
