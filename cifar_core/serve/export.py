"""Export a finished run to one self-contained ONNX file with a model card, checked for parity.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based exporter), opset 20, with a
dynamic batch axis. Chosen explicitly because the dynamo exporter needs onnxscript (not a
dependency here) and, for these models, produces the same graph; the parity check below is what
guarantees the file, whichever exporter wrote it.

The exported graph takes what a photo becomes after `cifar_core.images` reduced it to 32×32:
float32 RGB (N, 3, 32, 32) with values in [0, 1] (pixel / 255). Everything the run did to images at
evaluation time is inside the graph: mean/std normalization (or the run's own normalizer, ZCA or
per-image standardization) and, if the run used them, test-time flips and translations (their
logits averaged with the engine's weights). All of it is read from the run's checkpoint (weights,
fitted ZCA, views), so exporting needs no data set. The same facts are written into the ONNX metadata
(key ``cifar_lab.card``) and into a sidecar ``<name>.card.json``.

The ONNX metadata (``metadata_props``, string values, JSON where structured) says what the input is
so that a consumer with onnxruntime alone feeds it correctly: ``input_range`` "[0, 1]",
``input_layout`` "NCHW", ``input_dtype`` "float32", ``input_size`` "32x32", ``input_channels`` "RGB",
``normalization`` "none: …" (the graph normalizes itself: apply no mean/std), ``class_names`` and the
ONNX image keys ``Image.BitmapPixelFormat`` / ``Image.ColorSpaceGamma`` / ``Image.NominalPixelRange``
(docs/MetadataProps.md of the ONNX spec; the input also carries the ``IMAGE`` type denotation). The
statistics the graph applies are kept for information only, under ``graph_internal_normalization``;
there is no top-level ``mean``/``std`` key, which consumers read as "apply this" (files exported
before carried them and were normalized twice by such consumers). `onnx_metadata` builds the set,
`refresh_metadata` rewrites it in an existing file without touching its graph.

Parity tolerance: the file passes when, at batch 1 and at batch N, max |Δlogit| ≤ PARITY_ATOL +
PARITY_RTOL × max |logit| (the PyTorch logits' largest magnitude) and no top-1 differs. fp32 carries
~7 significant digits, and two correct fp32 implementations (other summation order, Conv+BatchNorm
fused by the exporter) differ by a few units of the last places of the largest activations: a
BatchNorm ResNet-18 with logits near 2e6 differed by 0.19 (1e-7 relative) and was refused by a fixed
1e-4. PARITY_RTOL = 1e-5 (~80 fp32 ulps of the largest logit) accepts that and still refuses any real
change of the function (a 0.1% change of the head is 100× over); PARITY_ATOL = 1e-4 covers logits
near zero. The int8 file has its own check (`check_agreement`): top-1 agreement with the fp32 file
plus batch-1 vs batch-N consistency within PARITY_ATOL + INT8_CONSISTENCY_RTOL × max |logit|.

Optionally the weights are stored as float16 initializers followed by a Cast to float32 (halves the
file; arithmetic stays fp32). The parity check then compares against the PyTorch model with the same
fp16-rounded parameters and buffers, so it still checks the export itself at the fp32 tolerance.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import platform
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data import CIFAR_MEAN, CIFAR_STD, CLASSES
from ..engine.checkpoints import FINISHED_ORDER, Checkpoint, CheckpointError, read_checkpoint
from ..engine.evaluation import tta_views
from ..images import PREPROCESS_DESCRIPTION
from ..models import MODELS, count_params
from ..models.transformers import architecture_summary
from ..params import ConfigError
from ..runs import RunRecord, RunStore, atomic_write_bytes, atomic_write_json

__all__ = ["OPSET", "PARITY_ATOL", "PARITY_RTOL", "INT8_CONSISTENCY_RTOL", "METADATA_VERSION", "TTA_CHOICES",
           "ExportError", "InferenceGraph", "ExportResult", "ExportKind", "onnx_metadata", "refresh_metadata",
           "parity_limit", "EXPORT_KINDS", "export_run", "export_module", "check_parity", "load_run_model", "card_path_for",
           "read_card", "default_export_path", "export_path", "describe_checkpoint"]

# Opset 20 spells GELU as one native op, which survives int8 QDQ quantization; opset 17 spells it as
# Erf arithmetic that onnxruntime can no longer fuse once DequantizeLinear nodes sit in front of it
# (the int8 fastnet ran ~12% slower at batch 1).
OPSET = 20
TTA_CHOICES = ("run", "none", "flip", "flip+translate")
# fp32 parity: max |Δlogit| <= PARITY_ATOL + PARITY_RTOL * max |logit| (module note: why these values)
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5
# int8 batch-1 vs batch-N consistency of the same file: integer kernels are exact, but the float ops
# between them (requantization scales, GELU, TTA averaging) may round differently per batch size; a
# uint8 step landing on the other side moves the logits by far less than 1e-3 of their scale, while a
# broken dynamic batch axis moves them by as much as the logits themselves
INT8_CONSISTENCY_RTOL = 1e-3
CARD_KEY = "cifar_lab.card"
EXPORTER = "torch.onnx.export (TorchScript-based exporter, dynamo=False)"


class ExportError(ConfigError):
    """Export refused or failed (unfinished run, missing checkpoint, parity failure), with the reason."""


class InferenceGraph(nn.Module):
    """[0, 1] RGB images → logits: the run's evaluation-time normalization, the model, test-time views."""

    def __init__(self, model: nn.Module, normalizers: list, tta_flip: bool, tta_translate: bool):
        super().__init__()
        self.model = model
        self.normalizers = list(normalizers)  # deterministic chain ops (ZCA, per-image standardization)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.tta_flip = tta_flip
        self.tta_translate = tta_translate

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for op in self.normalizers:
            x = op(x, None, None)[0]
        if not self.normalizers:
            x = (x - self.mean) / self.std
        views = tta_views(x, self.tta_flip, self.tta_translate)
        if len(views) == 1:
            return self.model(x)
        # all views in one batch: one pass through the network is faster than one per view at batch 1
        logits = self.model(torch.cat([view for _, view in views])).unflatten(0, (len(views), -1))
        weights = torch.tensor([weight for weight, _ in views], dtype=logits.dtype).view(-1, 1, 1)
        return (logits * weights).sum(0)


@dataclass
class ExportResult:
    onnx_path: Path
    card_path: Path
    card: dict


def card_path_for(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".card.json")


def read_card(onnx_path: Path) -> dict | None:
    """The sidecar card if present and valid JSON, else None."""
    try:
        card = json.loads(card_path_for(onnx_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


# ----------------------------------------------------------------------------------------------
# Loading a run
# ----------------------------------------------------------------------------------------------

def _check_exportable(record: RunRecord) -> None:
    if not record.exists():
        raise ExportError(f"run {record.run_id} not found")
    status = record.status()
    if status.get("state") != "completed":
        raise ExportError(f"run {record.run_id} is {status.get('state', 'unknown')}: "
                          "only completed runs can be exported")


def load_run_model(record: RunRecord) -> tuple[InferenceGraph, Checkpoint]:
    """The finished run's model as an InferenceGraph, read from its checkpoint alone (no data): the
    weights it was evaluated with (EMA when kept), its fitted normalizers and its test-time views.
    The file follows the reader's rule for finished runs: last.pt, else best.pt (`Checkpoint.fallback`
    says why). ExportError naming the files tried when none is usable."""
    _check_exportable(record)
    cfg = record.config()
    try:
        ckpt = read_checkpoint(record, FINISHED_ORDER)
        graph = InferenceGraph(ckpt.build_model(), ckpt.normalizers(cfg.augment),
                               *ckpt.tta(cfg.tta_flip, cfg.tta_translate))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    return graph.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------

def _round_to_fp16(module: nn.Module) -> None:
    """Round every float parameter and buffer to fp16 precision (kept as fp32 tensors)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def _fp16_initializers(model_proto) -> int:
    """Store every float32 initializer as float16 + a Cast node back to float32. Returns the count.

    Hand-written: onnxconverter-common's float16 converter changes the arithmetic to fp16 too; here
    only storage shrinks and every op still computes in fp32. The graph must be exported without
    constant folding, so that initializers are exactly the module's (fp16-rounded) parameters and
    buffers rather than folded products of them (Conv+BatchNorm) that fp16 would round differently."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = model_proto.graph
    converted, kept, casts = 0, [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__cast"))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model_proto)
    return converted


def _denote_image_input(model_proto) -> None:
    """Mark the (N, 3, H, W) input as an IMAGE (ONNX type denotation, which the Image.* metadata keys
    refer to), its axes as batch, channel and the two spatial features."""
    tensor_type = model_proto.graph.input[0].type
    dims = tensor_type.tensor_type.shape.dim
    if len(dims) != 4:
        return
    tensor_type.denotation = "IMAGE"
    for dim, denotation in zip(dims, ("DATA_BATCH", "DATA_CHANNEL", "DATA_FEATURE", "DATA_FEATURE")):
        dim.denotation = denotation


# ----------------------------------------------------------------------------------------------
# Metadata: what a consumer with onnxruntime alone needs to feed the file
# ----------------------------------------------------------------------------------------------

METADATA_VERSION = "2"  # 1: top-level mean/std (misread as "apply this"); 2: input_* keys, normalization "none"
INPUT_PREPROCESSING = (
    "photo -> 8-bit sRGB, shorter side resized to 32 px (bicubic, antialiased), centre-cropped to 32x32; "
    "then float32 = uint8 pixel / 255 (values in [0, 1]), HWC -> CHW, stacked as (N, 3, 32, 32). "
    "No mean/std subtraction: the graph does it.")


def _consumer_facts(normalization: dict | None) -> dict:
    """The card's normalization section, saying that it happens inside the graph and the input gets none."""
    norm = dict(normalization or {"kind": "mean_std", "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})
    norm["in_graph"] = True
    norm["apply_to_input"] = "none"
    norm["note"] = ("applied inside the graph: feed RGB in [0, 1] and apply no normalization"
                    + ("; the run's own normalizer replaces mean/std" if norm.get("kind") != "mean_std" else ""))
    return norm


def onnx_metadata(card: dict) -> dict[str, str]:
    """The file's metadata_props (ONNX convention: string values, JSON for structured ones), built from
    its model card. The input keys say exactly what to feed; `normalization` is "none: …" because the
    graph normalizes itself; what it applies is under `graph_internal_normalization`, for information."""
    norm = _consumer_facts(card.get("normalization"))
    kind = norm.get("kind", "mean_std")
    internal = {"applied_by": "the graph itself, to its [0, 1] input: do not apply it again", "kind": kind}
    if kind == "mean_std":
        internal.update(mean=norm.get("mean", list(CIFAR_MEAN)), std=norm.get("std", list(CIFAR_STD)))
    baked = "mean/std" if kind == "mean_std" else kind
    return {
        "cifar_lab.metadata_version": METADATA_VERSION,
        "input_name": "images",
        "input_shape": json.dumps(["batch", 3, 32, 32]),
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_size": "32x32",
        "input_channels": "RGB",
        "input_range": "[0, 1]",
        "input_scaling": "uint8 pixel / 255",
        "normalization": f"none: the graph normalizes internally ({baked} baked in); feed [0, 1] RGB as is",
        "graph_internal_normalization": json.dumps(internal),
        "preprocessing": INPUT_PREPROCESSING,
        "output_name": "logits",
        "output": f"float32 logits (N, {len(card.get('classes') or CLASSES)}) in class_names order; "
                  "softmax gives probabilities",
        "class_names": json.dumps(list(card.get("classes") or CLASSES)),
        # ONNX docs/MetadataProps.md, Image category (for the IMAGE-denoted input)
        "Image.BitmapPixelFormat": "Rgb8",
        "Image.ColorSpaceGamma": "SRGB",
        "Image.NominalPixelRange": "Normalized_0_1",
        CARD_KEY: json.dumps({**card, "normalization": norm}),
    }


def _without_metadata(model_proto) -> bytes:
    import onnx
    bare = onnx.ModelProto()
    bare.CopyFrom(model_proto)
    del bare.metadata_props[:]
    return bare.SerializeToString()


def refresh_metadata(onnx_path: str | Path) -> dict:
    """Rewrite an exported file's metadata_props with `onnx_metadata` (files exported before carried a
    misleading top-level mean/std), leaving the rest of the file (graph, weights) unchanged, which is
    verified. The sidecar card, if any, gets the same normalization facts and the new size and digest.
    The card comes from the file's embedded one, else the sidecar; ExportError when there is neither
    (nothing says what the graph normalizes). Returns {"removed": [...], "added": [...]} (keys)."""
    import onnx
    path = Path(onnx_path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"cannot read {path.name} as ONNX ({str(exc)[:200]})") from None
    old = {prop.key: prop.value for prop in proto.metadata_props}
    try:
        embedded = json.loads(old[CARD_KEY]) if CARD_KEY in old else None
    except ValueError:
        embedded = None
    sidecar = read_card(path)
    if isinstance(embedded, dict):
        card = embedded
    elif sidecar is not None:
        card = {key: value for key, value in sidecar.items() if key != "file"}
    else:
        raise ExportError(f"{path.name} has no model card (embedded or {card_path_for(path).name}): "
                          "nothing says what its graph normalizes")
    before = _without_metadata(proto)
    metadata = onnx_metadata(card)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    if _without_metadata(onnx.load_from_string(data)) != before:
        raise ExportError(f"rewriting the metadata of {path.name} would change more than the metadata")
    atomic_write_bytes(path, data)
    if sidecar is not None:
        sidecar["normalization"] = _consumer_facts(sidecar.get("normalization") or card.get("normalization"))
        sidecar["file"] = {**(sidecar.get("file") or {}), "name": path.name, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}
        sidecar["metadata_refreshed"] = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metadata_version": METADATA_VERSION,
            "why": "top-level mean/std replaced by input_* keys and normalization 'none' (the graph "
                   "normalizes itself); graph and weights unchanged"}
        atomic_write_json(card_path_for(path), sidecar)
    return {"removed": sorted(set(old) - set(metadata)), "added": sorted(set(metadata) - set(old))}


def export_module(graph: nn.Module, path: Path, *, fp16_weights: bool = False,
                  metadata: dict[str, str] | None = None, opset: int = OPSET) -> Path:
    """Write `graph` (input [0,1] images (N,3,32,32)) to one self-contained .onnx file, atomically."""
    import onnx
    graph = graph.eval()
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=not fp16_weights)
    proto = onnx.load_from_string(buffer.getvalue())
    if fp16_weights:
        _fp16_initializers(proto)
    _denote_image_input(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = ("CIFAR-10 Lab classifier: input float32 RGB (N,3,32,32) in [0,1] (pixel / 255, no "
                        "mean/std: the graph normalizes itself), output logits (N,10)")
    data = proto.SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def parity_limit(reference: np.ndarray, atol: float, rtol: float) -> float:
    """The largest |Δlogit| allowed against `reference` logits: atol + rtol × max |reference|."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return float(atol + rtol * scale)


def check_parity(graph: nn.Module, onnx_path: Path, images_uint8: np.ndarray, *,
                 atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL, single: int = 8) -> dict:
    """Compare onnxruntime with PyTorch on real images at batch 1 (the first `single` images, one by
    one) and at batch N (all). Raises ExportError with the numbers when the max absolute logit
    difference exceeds atol + rtol × max |PyTorch logit| (the logits' own scale: fp32 rounding grows
    with it) or any top-1 differs."""
    from .inference import create_session
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float().div(255)
    session = create_session(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = graph.eval()(x).numpy()
    batched = session.run(None, {"images": x.numpy()})[0]
    singles = np.concatenate([session.run(None, {"images": x[i:i + 1].numpy()})[0]
                              for i in range(min(single, len(x)))])
    limit = parity_limit(expected, atol, rtol)
    report = {
        "images": int(len(x)), "batch_sizes": [1, int(len(x))], "atol": atol, "rtol": rtol,
        "max_abs_logit": float(np.abs(expected).max()), "limit": limit,
        "max_abs_diff_batch_n": float(np.abs(batched - expected).max()),
        "max_abs_diff_batch_1": float(np.abs(singles - expected[:len(singles)]).max()),
        "top1_mismatches": int((batched.argmax(1) != expected.argmax(1)).sum()
                               + (singles.argmax(1) != expected[:len(singles)].argmax(1)).sum()),
    }
    report["passed"] = bool(report["max_abs_diff_batch_n"] <= limit and report["max_abs_diff_batch_1"] <= limit
                            and report["top1_mismatches"] == 0)
    if not report["passed"]:
        raise ExportError(
            f"parity check failed for {Path(onnx_path).name}: max |Δlogit| batch {len(x)} = "
            f"{report['max_abs_diff_batch_n']:.3g}, batch 1 = {report['max_abs_diff_batch_1']:.3g} "
            f"(limit {limit:.3g} = {atol:g} + {rtol:g} × max |logit| {report['max_abs_logit']:.3g}), "
            f"top-1 mismatches {report['top1_mismatches']}")
    return report


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over uint8 tiles (N, 32, 32, 3), in batches."""

    def __init__(self, tiles_uint8: np.ndarray, batch: int = 100):
        from .inference import tiles_to_input
        self._batches = iter([tiles_to_input(tiles_uint8[i:i + batch]) for i in range(0, len(tiles_uint8), batch)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def quantize_int8(fp32_path: Path, out_path: Path, calibration_uint8: np.ndarray) -> dict:
    """Static int8 quantization of an exported fp32 file with onnxruntime.quantization: QDQ format,
    signed per-channel int8 weights, unsigned int8 activations with ranges calibrated (min/max) on
    `calibration_uint8` images. Returns a description for the model card.

    Weights use 7 of their 8 bits (reduce_range): onnxruntime's u8s8 kernels on x86 CPUs without VNNI
    (AVX2, plain AVX-512) add pairs of products in 16 bits, which saturates with full-range weights: a
    file quantized that way scored 64% there and 94% on a VNNI CPU. The 7-bit range cannot overflow."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), _Calibration(calibration_uint8),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, reduce_range=True,
                        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(quantized))
    source = onnx.load(str(fp32_path), load_external_data=False)
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    proto.doc_string = source.doc_string
    atomic_write_bytes(Path(out_path), proto.SerializeToString())
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 (7-bit range), per output channel", "activations": "uint8, min/max calibration",
            "calibration_images": int(len(calibration_uint8))}


def check_agreement(reference_path: Path, candidate_path: Path, images_uint8: np.ndarray,
                    min_agreement: float = 0.97) -> dict:
    """Top-1 agreement of a quantized file with its fp32 original on real images (int8 cannot meet
    the fp32 logit tolerance, so the check is on decisions). Raises ExportError below `min_agreement`."""
    from .inference import create_session, tiles_to_input
    x = tiles_to_input(images_uint8)
    ref = create_session(reference_path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    candidate = create_session(candidate_path, providers=["CPUExecutionProvider"])
    got = candidate.run(None, {"images": x})[0]
    single = candidate.run(None, {"images": x[:1]})[0]
    batch_1_diff = float(np.abs(single - got[:1]).max())
    batch_1_limit = parity_limit(got[:1], PARITY_ATOL, INT8_CONSISTENCY_RTOL)
    report = {"images": int(len(x)), "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
              "max_abs_logit_diff": float(np.abs(ref - got).max()),
              "batch_1_max_abs_diff": batch_1_diff, "batch_1_limit": batch_1_limit,
              "batch_1_matches_batch_n": bool(batch_1_diff <= batch_1_limit),
              "min_agreement": min_agreement}
    report["passed"] = bool(report["top1_agreement"] >= min_agreement and report["batch_1_matches_batch_n"])
    if not report["passed"]:
        raise ExportError(f"int8 check failed for {Path(candidate_path).name}: top-1 agreement with fp32 "
                          f"{report['top1_agreement']:.1%} (need {min_agreement:.0%}); batch 1 vs batch "
                          f"{len(x)} max |Δlogit| {batch_1_diff:.3g} (limit {batch_1_limit:.3g} = {PARITY_ATOL:g}"
                          f" + {INT8_CONSISTENCY_RTOL:g} × max |logit|)")
    return report


def evaluate_onnx(onnx_path: Path, x_uint8: np.ndarray, y: np.ndarray, batch: int = 500) -> dict:
    """Accuracy of the exported file under onnxruntime (CPU) on the given images; `first_1000_acc` is
    the accuracy on the first 1,000 of them (the slice the shipped-checkpoint test recomputes)."""
    from .inference import create_session, tiles_to_input
    session = create_session(onnx_path, providers=["CPUExecutionProvider"])
    preds = []
    for start in range(0, len(x_uint8), batch):
        chunk = tiles_to_input(x_uint8[start:start + batch])
        preds.append(session.run(None, {"images": chunk})[0].argmax(1))
    pred = np.concatenate(preds)
    per_class = {c: float((pred[y == i] == i).mean()) for i, c in enumerate(CLASSES) if (y == i).any()}
    return {"acc": float((pred == y).mean()), "per_class_acc": per_class, "images": int(len(y)),
            "first_1000_acc": float((pred[:1000] == y[:1000]).mean())}


# ----------------------------------------------------------------------------------------------
# A run → .onnx + card
# ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _family(model_name: str) -> str:
    tags = MODELS.get(model_name).tags
    return "transformer" if "transformer" in tags or "vit" in tags else "cnn"


def _train_command(record: RunRecord) -> str:
    recorded = record.status().get("command")
    if recorded:
        return recorded
    return (f"python -m cifar_core train --config {shlex.quote(str(record.config_path))} "
            f"--run-id {record.run_id}")


def _normalization(graph: InferenceGraph) -> dict:
    if graph.normalizers:
        return _consumer_facts({"kind": "+".join(op.name for op in graph.normalizers)})
    return _consumer_facts({"kind": "mean_std", "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})


def _checkpoint_facts(ckpt: Checkpoint) -> dict:
    return {"file": ckpt.path.name, "weights": ckpt.evaluation_weights()[1], "step": ckpt.step,
            "fallback": ckpt.fallback}


def describe_checkpoint(card: dict) -> str:
    """One line naming the checkpoint file an export was made from (and why, when it was a fallback)."""
    facts = card.get("checkpoint") or {}
    if not facts:
        return ""
    weights = "EMA" if facts.get("weights") == "ema" else "model"
    line = f"from {facts.get('file')} ({weights} weights, step {facts.get('step')})"
    if facts.get("fallback"):
        line += f", because {facts['fallback']}"
    return line


def _evaluation(results: dict, ckpt: Checkpoint) -> dict:
    evaluation = {"test_acc": results.get("test_acc"), "per_class_acc": results.get("per_class_acc"),
                  "balanced_acc": results.get("balanced_acc"), "macro_f1": results.get("macro_f1"),
                  "test_images": results.get("test_images"), "by": "pytorch, end of training"}
    if ckpt.which != "last":  # the test report measured the final weights, which are in last.pt
        evaluation["by"] += f" (of the final weights, last.pt's; this file holds {ckpt.path.name}'s)"
    return evaluation


def build_card(record: RunRecord, graph: InferenceGraph, ckpt: Checkpoint, name: str, *,
               fp16_weights: bool, export_command: str, train_command: str | None = None) -> dict:
    cfg, status, results = record.config(), record.status(), record.results() or {}
    model_name = ckpt.model_name
    return {
        "name": name, "format": "onnx", "opset": OPSET, "exporter": EXPORTER,
        "architecture": {"model": model_name, "family": _family(model_name),
                         "summary": architecture_summary(model_name, graph_params(ckpt)),
                         "params": graph_params(ckpt),
                         "parameters": count_params(graph.model),
                         "description": MODELS.get(model_name).description},
        "classes": list(CLASSES),
        "input": {"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW",
                  "range": "RGB values in [0, 1] (pixel / 255)", "size": 32},
        "output": {"name": "logits", "shape": ["batch", len(CLASSES)], "note": "softmax gives probabilities"},
        "preprocess": PREPROCESS_DESCRIPTION,
        "normalization": _normalization(graph),
        "test_time_augmentation": {"flip": bool(graph.tta_flip), "translate": bool(graph.tta_translate)},
        "weights_storage": "float16 (cast to float32 in the graph)" if fp16_weights else "float32",
        "training": {"run_id": record.run_id, "config": cfg.to_dict(), "command": train_command or _train_command(record),
                     "data": status.get("data_origin"), "train_images": status.get("train_images"),
                     "split": status.get("split"), "device": status.get("device"),
                     "train_seconds": results.get("train_seconds", status.get("train_seconds")),
                     "finished": _iso(status.get("finished"))},
        "evaluation": _evaluation(results, ckpt),
        "checkpoint": _checkpoint_facts(ckpt),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export_command": export_command,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }


def graph_params(ckpt: Checkpoint) -> dict:
    """The model's parameters with the registry defaults filled in."""
    return MODELS.validate(ckpt.model_name, ckpt.model_params)


def _iso(timestamp) -> str | None:
    if not timestamp:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


def default_export_path(record: RunRecord) -> Path:
    return record.path / "export" / f"{record.run_id}.onnx"


@dataclass(frozen=True)
class ExportKind:
    """One export choice offered to users: its file (the default export's name plus `suffix`) and
    the export_run options that make it."""

    label: str
    suffix: str
    int8: bool = False
    tta: str = "run"  # one of TTA_CHOICES

    @property
    def options(self) -> dict:
        return {"int8": self.int8, "tta": self.tta}


# the exact graph, or the fast int8 variants; keyed by label (the Runs page offers the labels)
EXPORT_KINDS: dict[str, ExportKind] = {kind.label: kind for kind in (
    ExportKind("fp32, as the run evaluated", ""),
    ExportKind("int8, the run's test-time views (¼ size, ~2.5× faster on CPU)", "-int8", int8=True),
    ExportKind("int8, flip views only (2 views: the shipped fast model's choice, near full accuracy)",
               "-int8-flip", int8=True, tta="flip"),
    ExportKind("int8, one view (fastest; a little less accurate)", "-int8-1view", int8=True, tta="none"),
)}


def export_path(record: RunRecord, kind: ExportKind) -> Path:
    """Where `kind` of the run's export is written: <run>/export/<run_id><suffix>.onnx."""
    base = default_export_path(record)
    return base.with_name(base.stem + kind.suffix + ".onnx")


def _folded_for_inference(graph: InferenceGraph, card: dict) -> InferenceGraph:
    """A copy of `graph` with the model's exact inference-time folds applied (models that offer
    `fold_for_inference`, such as fastnet), noted in the card. The parity check still compares the
    file against the unfolded `graph`, so a fold that changed the function would fail the export."""
    if not hasattr(graph.model, "fold_for_inference"):
        return graph
    folded = copy.deepcopy(graph).eval()
    done = folded.model.fold_for_inference()
    if not done:
        return graph
    card["inference_folding"] = done
    return folded


def export_run(run_id: str, store: RunStore | None = None, out: str | Path | None = None, *,
               name: str | None = None, data_source: str | None = None, fp16_weights: bool = False,
               evaluate: bool = False, export_command: str | None = None,
               train_command: str | None = None, int8: bool = False, tta: str = "run",
               int8_min_agreement: float = 0.97) -> ExportResult:
    """Export a completed run: .onnx + sidecar card, after a parity check on real test images.

    `evaluate` also measures onnxruntime accuracy on the full test set and on the fixed first-1,000
    slice (the shipped-checkpoint test recomputes the latter). `int8` writes a statically quantized
    file instead (calibrated on 1,000 training images; checked by top-1 agreement with the fp32 export,
    which must pass the parity check first). `tta` overrides the run's test-time views in the graph
    (run | none | flip | flip+translate): fewer views, faster inference. A failed check deletes the file.

    The graph comes from the run's checkpoint alone (`load_run_model`; the card's `checkpoint` names
    the file). The parity check runs on the bundled sample; the data set (`data_source`) is read only
    for `int8` calibration and for `evaluate`."""
    from ..data import load_cifar10, load_sample
    store = store or RunStore()
    record = store.record(run_id)
    graph, ckpt = load_run_model(record)
    if tta not in TTA_CHOICES:
        raise ExportError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    if tta != "run":
        graph.tta_flip, graph.tta_translate = tta != "none", tta == "flip+translate"
    name = name or record.run_id
    onnx_path = Path(out) if out else default_export_path(record)
    if onnx_path.suffix != ".onnx":
        raise ExportError(f"export path must end in .onnx, got {onnx_path}")
    if fp16_weights and int8:
        raise ExportError("choose fp16 weights or int8 quantization, not both")
    if fp16_weights:
        _round_to_fp16(graph)
    export_command = export_command or f"python -m cifar_core export {run_id}" + (
        f" --out {shlex.quote(str(out))}" if out else "") + (" --fp16-weights" if fp16_weights else "") + (
        " --int8" if int8 else "") + (f" --tta {tta}" if tta != "run" else "")
    card = build_card(record, graph, ckpt, name, fp16_weights=fp16_weights, export_command=export_command,
                      train_command=train_command)
    if int8:
        card["weights_storage"] = "int8 (static QDQ quantization; activations uint8)"
    if tta != "run":
        card["test_time_augmentation"]["chosen_at_export"] = tta
        card["evaluation"]["by"] += (" with the run's own test-time views (onnxruntime_test_acc, with "
                                     "--evaluate, is this file's)")
    exported = _folded_for_inference(graph, card) if not fp16_weights else graph
    scratch = Path(tempfile.mkdtemp(prefix="cifar_lab_int8_")) if int8 else None
    fp32_path = scratch / "fp32.onnx" if int8 else onnx_path
    export_module(exported, fp32_path, fp16_weights=fp16_weights,
                  metadata=onnx_metadata(card))
    try:
        sample_x, _, _ = load_sample()
        card["parity"] = check_parity(graph, fp32_path, sample_x)
        arrays = load_cifar10(data_source) if evaluate or int8 else None
        if int8:
            calibration = arrays.x_train[np.random.default_rng(0).choice(len(arrays.x_train), 1000, replace=False)]
            card["quantization"] = quantize_int8(fp32_path, onnx_path, calibration)
            card["quantization"]["agreement"] = check_agreement(fp32_path, onnx_path, sample_x,
                                                                 min_agreement=int8_min_agreement)
        if evaluate:
            full = evaluate_onnx(onnx_path, arrays.x_test, arrays.y_test)
            card["evaluation"].update(onnxruntime_test_acc=full["acc"],
                                      onnxruntime_per_class_acc=full["per_class_acc"],
                                      onnxruntime_first_1000_acc=full["first_1000_acc"])
    except Exception:
        onnx_path.unlink(missing_ok=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    card["file"] = {"name": onnx_path.name, "bytes": onnx_path.stat().st_size, "sha256": _sha256(onnx_path)}
    card_path = card_path_for(onnx_path)
    atomic_write_json(card_path, card)
    if onnx_path.is_relative_to(record.path):
        record.update_status(exported=str(onnx_path.relative_to(record.path)))
    return ExportResult(onnx_path, card_path, card)
