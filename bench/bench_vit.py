"""Training throughput (images/s) of the transformer presets on this machine.

Each preset's real training step as the engine runs it: its augmentation chain on a uint8 batch,
mean/std normalization, forward, cross-entropy (+ a frozen teacher's forward and the distillation
loss for the distilled preset), backward, gradient clipping and the optimizer step. Also timed
separately: the augmentation chain alone and an evaluation forward pass. Inputs are real CIFAR-10
images from the committed sample (cifar_core/assets/sample.npz), repeated to fill the batch.

    PYTHONPATH=. .venv/bin/python bench/bench_vit.py --steps 5 --warmup 2
    PYTHONPATH=. .venv/bin/python bench/bench_vit.py --presets ViT-tiny,CCT-tiny --batch-size 256 --threads 1
    PYTHONPATH=. .venv/bin/python bench/bench_vit.py --device cuda --batch-size 512 --steps 20 --warmup 5
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from cifar_core.augment import AugmentChain
from cifar_core.config import RunConfig
from cifar_core.data import CIFAR_MEAN, CIFAR_STD, load_sample
from cifar_core.engine.distill import distillation_loss
from cifar_core.models import count_params, create_model
from cifar_core.experiments.presets import preset
from cifar_core.engine import build_optimizer

PRESETS = ("ViT-tiny", "CCT-tiny", "CaiT-tiny", "ViT-tiny distilled")
TEACHER = "fastnet"  # the model of the "fast" preset, the natural CNN teacher


def config_for(name: str) -> RunConfig:
    data = preset(name)
    if data.get("distill", "none") != "none":
        data["teacher_run"] = "bench-teacher"  # only validated as a name here; the teacher is built below
    return RunConfig.from_dict(data)


def batch_of(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_sample()
    reps = -(-batch_size // len(x))
    images = torch.from_numpy(x).permute(0, 3, 1, 2).repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    return images, torch.from_numpy(y).long().repeat(reps)[:batch_size]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call: the fastest of `steps` timed calls after `warmup` untimed ones (the fastest,
    because other processes share the cores and only slow calls down)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_preset(name: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    cfg = config_for(name)
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.model_params).to(device)
    optimizer = build_optimizer(cfg, model)
    chain = AugmentChain(cfg.augment)
    teacher = None
    if cfg.distill != "none":
        teacher = create_model(TEACHER).eval().requires_grad_(False).to(device)
    x_uint8, y = (t.to(device) for t in batch_of(batch_size))
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    counter = iter(range(10**9))

    def augment():
        return chain(x_uint8, y, torch.Generator().manual_seed(next(counter)))

    def train_step():
        model.train()
        x_aug, y_soft, _ = augment()
        x = (x_aug - mean) / std
        logits = model(x)
        loss = F.cross_entropy(logits, y_soft, label_smoothing=cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
            kd = distillation_loss(cfg.distill, logits, teacher_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        optimizer.step()

    @torch.no_grad()
    def eval_forward():
        model.eval()
        model((x_uint8.float() / 255 - mean) / std)

    return {"preset": name, "model": cfg.model, "params": count_params(model),
            "train": batch_size / timed(train_step, steps, warmup, device),
            "augment": batch_size / timed(augment, steps, warmup, device),
            "eval": batch_size / timed(eval_forward, steps, warmup, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (fastest reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="fp32 on either")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {where}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, fastest of {args.steps} steps "
          f"after {args.warmup} warm-up, load average at start {load:.2f}")
    print("| preset | model | params | train step img/s | augmentation only img/s | eval forward img/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.presets.split(","):
        r = bench_preset(name.strip(), args.batch_size, args.steps, args.warmup, device)
        print(f"| {r['preset']} | {r['model']} | {r['params'] / 1e6:.2f} M | {r['train']:.0f} | "
              f"{r['augment']:.0f} | {r['eval']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
