"""onnxruntime vs PyTorch eager on this machine: p50/p95 latency and images/s at batch 1 and 256.

Each model is given as an exported .onnx file plus the run it came from (for the eager model), or as a
run id alone (exported to a temporary file first):

    python bench/bench_onnx.py --runs-root runs --run fastnet-e16 --onnx checkpoints/fastnet94.onnx
    python bench/bench_onnx.py --model fastnet            # an untrained model: speed only

Both sides get the same thread count (torch.set_num_threads / onnxruntime intra-op threads) and
the same real images (the bundled sample, tiled up to the batch size). Numbers are wall-clock per
call after warm-up; images/s = batch / median latency.

onnxruntime is timed in a fresh process of its own, as a deployment would run it: after eager calls,
PyTorch's OpenMP worker threads keep spinning, and in the same process they slowed onnxruntime at
batch 1 by up to 2× on the 2-core dev box (forcing them passive instead slows eager by ~50%).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


from cifar_core.data import load_sample
from cifar_core.serve.export import InferenceGraph, export_module, load_run_model, read_card
from cifar_core.serve.inference import tiles_to_input
from cifar_core.models import create_model
from cifar_core.runs import RunStore


def _timings(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _summary(ms: list[float], batch: int) -> dict:
    ms = sorted(ms)
    p50 = statistics.median(ms)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "ms_per_image": round(p50 / batch, 4),
            "images_per_s": round(batch * 1000 / p50, 1)}


def _onnxruntime_summary(onnx_path: str, threads: int, batch: int, repeats: int) -> dict:
    """Runs in a spawned process that never executes a PyTorch op (see the module note)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    sample = load_sample()[0]
    x_np = tiles_to_input(np.resize(sample, (batch, *sample.shape[1:])))
    return _summary(_timings(lambda: session.run(None, {"images": x_np}), repeats, 3), batch)


def bench_pair(label: str, graph: torch.nn.Module, onnx_path: Path, threads: int,
               batches: tuple[int, ...], repeats: dict[int, int]) -> list[dict]:
    torch.set_num_threads(threads)
    sample = load_sample()[0]
    rows = []
    graph = graph.eval()
    for batch in batches:
        tiles = np.resize(sample, (batch, *sample.shape[1:]))
        x_np = tiles_to_input(tiles)
        x_t = torch.from_numpy(x_np)
        n = repeats.get(batch, 20)
        with torch.inference_mode():
            eager = _summary(_timings(lambda: graph(x_t), n, 3), batch)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            onnx = pool.submit(_onnxruntime_summary, str(onnx_path), threads, batch, n).result()
        rows.append({"model": label, "batch": batch, "threads": threads, "eager": eager, "onnxruntime": onnx,
                     "speedup": round(eager["p50_ms"] / onnx["p50_ms"], 2)})
        print(f"{label:50s} batch {batch:4d}  eager p50 {eager['p50_ms']:8.2f} ms p95 {eager['p95_ms']:8.2f} ms "
              f"{eager['images_per_s']:8.1f} img/s | onnxruntime p50 {onnx['p50_ms']:8.2f} ms "
              f"p95 {onnx['p95_ms']:8.2f} ms {onnx['images_per_s']:8.1f} img/s | ×{rows[-1]['speedup']}",
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--run", action="append", default=[], help="run id (repeatable)")
    parser.add_argument("--onnx", action="append", default=[],
                        help="the exported file of the matching --run (default: export it now)")
    parser.add_argument("--model", action="append", default=[], help="an untrained registry model, speed only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--repeats-1", type=int, default=200, help="timed calls at batch 1")
    parser.add_argument("--repeats-n", type=int, default=10, help="timed calls at the larger batches")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    batches = tuple(int(b) for b in args.batches.split(","))
    repeats = {b: (args.repeats_1 if b == 1 else args.repeats_n) for b in batches}
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    store = RunStore(args.runs_root)
    for i, run_id in enumerate(args.run):
        graph, _ = load_run_model(store.record(run_id))
        path = Path(args.onnx[i]) if i < len(args.onnx) else export_module(graph, tmp / f"{run_id}.onnx")
        card = read_card(path) or {}
        views = card.get("test_time_augmentation") or {}
        if views:  # eager runs the same test-time views as the file (an export may have chosen fewer)
            graph.tta_flip, graph.tta_translate = bool(views.get("flip")), bool(views.get("translate"))
        storage = "int8" if str(card.get("weights_storage", "")).startswith("int8") else "fp32"
        label = f"{run_id} ({graph.model.__class__.__name__}, tta {'flip' if graph.tta_flip else '-'}"\
                f"{'+translate' if graph.tta_translate else ''}, onnx {storage})"
        rows += bench_pair(label, graph, path, args.threads, batches, repeats)
    for name in args.model:
        graph = InferenceGraph(create_model(name), [], False, False).eval()
        path = export_module(graph, tmp / f"{name}.onnx")
        rows += bench_pair(f"{name} (untrained, no tta)", graph, path, args.threads, batches, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
