"""Training-step throughput of one model on this machine: forward + backward + SGD step on random
input, for each combination of batch size, precision (fp32 | bf16 autocast) and memory format.

    python bench/bench_step.py --model fastnet --batches 512,1024 --precisions fp32,bf16

The fastnet's whitening layer is initialised from data first (as in training: then frozen, so it
costs no backward pass). images/s = batch / median step time over --steps timed steps after one
warm-up step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


from cifar_core.models import create_model


def step_rate(model_name: str, batch: int, precision: str, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name)
    init = getattr(model, "init_from_data", None)
    if callable(init):
        init(torch.randn(2000, 3, 32, 32))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                nesterov=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fastnet")
    parser.add_argument("--batches", default="512,1024")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for fmt in args.formats.split(","):
        for precision in args.precisions.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rate = step_rate(args.model, batch, precision, fmt == "channels_last", args.steps)
                print(f"{fmt:14s} {precision:5s} batch {batch:5d}: {rate:7.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
