"""Training throughput of our input pipeline against the usual torchvision one, side by side.

(a) ours: the engine's path. The training set lives on the device as uint8 (N, 3, 32, 32); every
    step takes prep.train_x[idx], runs the batched AugmentChain (random_crop padding 4 reflect,
    hflip) and normalize(), all with the engine's own pieces (cifar_core.engine: prepare, epoch_order,
    model_input, autocast_context, build_optimizer, seeded_generator for the per-step draws).
(b) reference: a torchvision.datasets.CIFAR10-style dataset of PIL images with torchvision
    transforms (RandomCrop(32, padding=4, padding_mode="reflect"), RandomHorizontalFlip,
    ToImage + ToDtype (v2) or ToTensor (v1), Normalize) through a shuffling DataLoader
    (num_workers 0 and 2 by default), batches copied to the device.

For each model: the same batch size, the same number of timed steps after warm-up, a full SGD step
(forward, backward, optimizer step, loss/accuracy read back as the engine does) starting from the
same initial weights. Also a data-only pass (no model) for both pipelines. The table goes to
stdout (markdown, ready for bench/README.md); progress goes to stderr.

    .venv/bin/python bench/bench_pipeline.py [--data PATH] [--models fastnet,resnet18]
        [--batch-size 512] [--steps 50] [--warmup 5] [--workers 0,2] [--device auto|cpu|cuda]
        [--amp none|bf16] [--channels-last] [--ref-api v2|v1] [--threads N] [--seed 0]

    quick try:  .venv/bin/python bench/bench_pipeline.py --data /tmp/cifar10.npz \
                    --models fastnet --steps 3 --warmup 1 --batch-size 128

Data: --data (a Keras-layout .npz or the offline folder ../shared/data/cifar10), else
$CIFAR10_NPZ, else cifar_core.data.load_cifar10()'s default resolution. On CPU a resnet18 step at
batch 512 takes seconds, so the defaults run for a while there; use --steps/--models to shorten.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import platform
import shlex
import sys
import time
from pathlib import Path


import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cifar_core.config import RunConfig
from cifar_core.data import CIFAR_MEAN, CIFAR_STD, NUM_CLASSES, load_cifar10
from cifar_core.devices import device_description
from cifar_core.models import create_model
from cifar_core.params import ConfigError
from cifar_core.engine import (autocast_context, build_optimizer, epoch_order, model_input, normalize, prepare,
                               seeded_generator)
from cifar_core.engine.rng import AUGMENTATION, INIT_SAMPLE

AUGMENT = [{"name": "random_crop", "params": {"padding": 4, "pad_mode": "reflect"}, "p": 1.0},
           {"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}]
OURS = "ours: device uint8 + AugmentChain"
DATA_ONLY = "data only"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="Keras-layout .npz or the offline CIFAR-10 folder "
                         "(default: $CIFAR10_NPZ, else load_cifar10()'s default resolution)")
    ap.add_argument("--models", nargs="+", default=["fastnet,resnet18"],
                    help="models to train, comma- or space-separated (default: fastnet,resnet18)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    ap.add_argument("--workers", default="0,2",
                    help="DataLoader num_workers values for the reference, comma-separated")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none",
                    help="bf16 autocast (CUDA only, as in the engine)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    ap.add_argument("--ref-api", choices=("v2", "v1"), default="v2",
                    help="torchvision.transforms API for the reference pipeline")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the main process (default: torch's choice; "
                         "1 avoids thread oversubscription on a busy CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.models = [m for item in args.models for m in item.split(",") if m.strip()]
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or any(w < 0 for w in args.workers) \
            or (args.threads is not None and args.threads < 1):
        ap.error("--batch-size, --steps and --threads must be >= 1, --warmup and --workers >= 0")
    return args


# ------------------------------------------------------------------------------------------------
# (a) ours: the engine's batch path
# ------------------------------------------------------------------------------------------------

class OurBatches:
    """Batches exactly as the engine makes them: the epoch order from epoch_order, then per step
    prep.train_x[idx] -> prep.chain(x, y, seeded_generator(seed, AUGMENTATION, step)) -> model_input
    (normalize, plus channels_last when asked), as the Trainer builds each labeled batch.
    Returns (x float, soft targets)."""

    def __init__(self, prep, cfg: RunConfig):
        self.prep, self.cfg = prep, cfg
        self.steps_per_epoch = max(1, -(-len(prep.epoch_indices) // cfg.batch_size))
        self.step, self.order = 0, None

    def next(self):
        prep, cfg = self.prep, self.cfg
        epoch, b = divmod(self.step, self.steps_per_epoch)
        if b == 0 or self.order is None:
            self.order = epoch_order(prep, cfg.seed, epoch)
        idx = self.order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x_uint8, y = prep.train_x[idx], prep.train_y[idx]
        x, y_soft, _ = prep.chain(x_uint8, y, seeded_generator(cfg.seed, AUGMENTATION, self.step))
        x = model_input(prep, x)
        self.step += 1
        return x, y_soft

    def close(self):
        pass


# ------------------------------------------------------------------------------------------------
# (b) reference: PIL dataset + torchvision transforms + DataLoader
# ------------------------------------------------------------------------------------------------

class PILCifar10(Dataset):
    """torchvision.datasets.CIFAR10 without its pickled download: the same storage (uint8 NHWC
    numpy array + list of int targets) and the same __getitem__ (Image.fromarray, then the
    transform), built from the arrays the engine uses."""

    def __init__(self, x_nhwc: np.ndarray, y: np.ndarray, transform):
        self.data, self.targets, self.transform = x_nhwc, [int(v) for v in y], transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def reference_transform(api: str):
    if api == "v1":
        from torchvision import transforms as T
        return T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(CIFAR_MEAN, CIFAR_STD)])


class ReferenceBatches:
    """Shuffled batches from a DataLoader over PILCifar10 (persistent workers when num_workers > 0,
    pinned memory on CUDA), moved to the device. Returns (x float, int labels)."""

    def __init__(self, dataset: Dataset, cfg: RunConfig, workers: int, device: torch.device):
        self.device, self.channels_last = device, cfg.channels_last
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.it = iter(self.loader)

    def next(self):
        try:
            x, y = next(self.it)
        except StopIteration:  # next epoch (persistent workers are reused)
            self.it = iter(self.loader)
            x, y = next(self.it)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def close(self):  # drop the iterator so the worker processes exit now
        self.it = self.loader = None
        gc.collect()


# ------------------------------------------------------------------------------------------------
# Steps and timing
# ------------------------------------------------------------------------------------------------

def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def data_step(batches, sync, check_batch):
    """Data only: one augmented, normalized batch on the device. Returns (images, data seconds)."""
    t0 = time.perf_counter()
    x, _ = batches.next()
    sync()
    t_data = time.perf_counter() - t0
    check_batch(x)
    return x.shape[0], t_data


def train_step(batches, model, optimizer, cfg: RunConfig, device, sync, check_batch):
    """One training step as Trainer._step does it (forward under the engine's autocast, loss read
    back, backward, SGD step, accuracy count read back); the data part is timed on its own."""
    t0 = time.perf_counter()
    x, target = batches.next()
    sync()
    t_data = time.perf_counter() - t0
    check_batch(x)
    model.train()
    with autocast_context(cfg, device):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    labels = target.argmax(1) if target.dim() == 2 else target
    (logits.argmax(1) == labels).sum().item()
    return x.shape[0], t_data


def measure(step, steps: int, warmup: int, sync) -> dict:
    """Run `warmup` untimed then `steps` timed calls of step() -> (images, data seconds)."""
    for _ in range(warmup):
        step()
    sync()
    images, data_s = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        n, d = step()
        images += n
        data_s += d
    sync()
    total = time.perf_counter() - t0
    return {"images_per_s": images / total, "ms_per_step": 1000 * total / steps,
            "data_share": data_s / total}


def batch_checker(batch_size: int, device: torch.device):
    """Both pipelines must hand the model the same thing: float32 (B, 3, 32, 32) on the device."""
    def check(x):
        if x.dtype != torch.float32 or tuple(x.shape[1:]) != (3, 32, 32) or x.device.type != device.type \
                or x.shape[0] > batch_size:
            raise RuntimeError(f"unexpected batch {x.dtype} {tuple(x.shape)} on {x.device}")
    return check


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        exe_shown = "python"
    return shlex.join([exe_shown, *sys.argv])


def report(rows: list[dict], args, cfg: RunConfig, device: torch.device, origin: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = f"CPU {cpu_name()} ({cores} cores available, torch threads {torch.get_num_threads()})"
    if device.type == "cuda":
        machine = f"GPU {device_description(device)}; {machine}"
    precision = "bf16 autocast" if device.type == "cuda" and cfg.precision == "bf16" else "fp32"
    if cfg.precision == "bf16" and device.type != "cuda":
        precision += " (bf16 autocast is CUDA-only in the engine)"
    ref_ops = ("RandomCrop(32, padding=4, padding_mode='reflect') + RandomHorizontalFlip + "
               + ("ToTensor" if args.ref_api == "v1" else "ToImage + ToDtype(float32, scale=True)")
               + " + Normalize")
    lines = [
        "### Training throughput: our pipeline vs torchvision DataLoader",
        "",
        f"- Machine: {machine}",
        f"- Software: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, device {device.type}",
        f"- Settings: batch {cfg.batch_size}, steps per row: {args.steps} timed after {args.warmup} "
        f"warm-up, {precision}, channels_last {'on' if cfg.channels_last else 'off'}, "
        f"SGD (nesterov, momentum {cfg.momentum:g}, wd {cfg.weight_decay:g}) step included",
        "- Ours: uint8 (N,3,32,32) on the device, AugmentChain random_crop(padding=4, reflect) + "
        "hflip, normalize (cifar_core.engine)",
        f"- Reference: PIL dataset (as torchvision.datasets.CIFAR10) + torchvision.transforms."
        f"{args.ref_api} {ref_ops}, DataLoader(shuffle=True), batches copied to the device",
        f"- Data: {origin}",
        f"- Command: `{command_line()}`",
        "",
        "| model | pipeline | workers | images/s | ms/step | data share of step | × ours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ours = {r["model"]: r["images_per_s"] for r in rows if r["pipeline"] == OURS}
    for r in rows:
        rel = r["images_per_s"] / ours[r["model"]] if ours.get(r["model"]) else float("nan")
        share = "–" if r["model"] == DATA_ONLY else f"{100 * r['data_share']:.0f}%"
        lines.append(f"| {r['model']} | {r['pipeline']} | {r['workers']} | {r['images_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.1f} | {share} | {rel:.2f}× |")
    lines += [
        "",
        "Data share: for ours, the time in indexing + augmentation + normalization (synchronized on "
        "CUDA); for the reference, the time waiting for the DataLoader's batch plus the copy to "
        "the device. × ours: images/s relative to our pipeline on the same model.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(device=args.device, batch_size=args.batch_size, seed=args.seed, augment=AUGMENT,
                precision="bf16" if args.amp == "bf16" else "fp32", channels_last=args.channels_last)
    try:
        cfgs = {m: RunConfig(model=m, **base).validated() for m in args.models}  # bad names fail here
        cfg = cfgs[args.models[0]] if args.models else RunConfig(**base).validated()
        log("loading CIFAR-10 and preparing the device tensors ...")
        prep = prepare(cfg, args.data)  # the engine's own loading, split, chain and device tensors
        arrays = load_cifar10(args.data)  # same arrays (in-process memo), for the reference dataset
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # full split with no validation hold-out: the engine trains on all of x_train, in order
    assert prep.train_x.shape[0] == len(arrays.x_train)
    device = prep.device
    sync = make_sync(device)
    check = batch_checker(args.batch_size, device)
    dataset = PILCifar10(arrays.x_train, arrays.y_train, reference_transform(args.ref_api))
    pipelines = [(OURS, "–", lambda c: OurBatches(prep, c))]
    for w in args.workers:
        pipelines.append((f"torchvision {args.ref_api} + DataLoader", w,
                          lambda c, w=w: ReferenceBatches(dataset, c, w, device)))
    log(f"device {device_description(device)}; {len(dataset)} training images ({prep.data_origin})")

    rows = []

    def record(model_name, name, workers, result):
        rows.append({"model": model_name, "pipeline": name, "workers": workers, **result})
        log(f"  {model_name:>10} | {name} | workers {workers}: {result['images_per_s']:,.0f} images/s, "
            f"{result['ms_per_step']:.1f} ms/step, data {100 * result['data_share']:.0f}%")

    log("data only (no model):")
    for name, workers, make in pipelines:
        batches = make(cfg)
        step = functools.partial(data_step, batches, sync, check)
        try:
            record(DATA_ONLY, name, workers, measure(step, args.steps, args.warmup, sync))
        finally:
            batches.close()

    for model_name in args.models:
        mcfg = cfgs[model_name]
        torch.manual_seed(mcfg.seed)
        model = create_model(mcfg.model, mcfg.model_params, NUM_CLASSES)
        init = getattr(model, "init_from_data", None)
        if callable(init):  # as engine.build_model: fastnet's whitening layer from 5,000 images
            pick = torch.randperm(prep.train_x.shape[0], generator=seeded_generator(mcfg.seed, INIT_SAMPLE))[:5000]
            init(normalize(prep, prep.train_x[pick.to(device)]))
        model.to(device)
        if mcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        log(f"{model_name}:")
        for name, workers, make in pipelines:
            net = copy.deepcopy(model)  # every pipeline starts from the same weights
            optimizer = build_optimizer(mcfg, net)
            batches = make(mcfg)
            step = functools.partial(train_step, batches, net, optimizer, mcfg, device, sync, check)
            try:
                record(model_name, name, workers, measure(step, args.steps, args.warmup, sync))
            finally:
                batches.close()
                del step, net, optimizer
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print(report(rows, args, cfg, device, prep.data_origin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
