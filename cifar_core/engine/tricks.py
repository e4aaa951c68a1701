"""Training tricks the loop hooks in: mixed precision, alternating flips, lookahead."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import RunConfig


def effective_precision(cfg: RunConfig, device: torch.device) -> str:
    """fp16 autocast is CUDA-only; a CPU run asked for fp16 (device auto) trains in fp32."""
    if cfg.precision == "fp16" and device.type != "cuda":
        return "fp32"
    return cfg.precision


def autocast_context(cfg: RunConfig, device: torch.device):
    precision = effective_precision(cfg, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def alternating_flips(base: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images of the batch `idx` to mirror in `epoch`: each image's fixed random state `base`,
    inverted in odd epochs (airbench's derandomized flip)."""
    return base[idx] ^ bool(epoch % 2)


class Lookahead:
    """airbench94's lookahead: slow weights that every `every` steps move towards the trained (fast)
    weights, which then restart from them. The move keeps decay^every · progress³ of the slow
    weights, so early on it is a plain copy and late in training a slow average. At the last step the
    fast weights take the slow ones. Covers every floating-point entry of the state dict (BN running
    statistics too). Not in torch.optim: its Lookahead-style wrappers neither reset BN buffers nor
    follow this schedule."""

    def __init__(self, model: torch.nn.Module, every: int, decay: float, total_steps: int):
        self.every, self.decay, self.total_steps = every, decay, max(1, total_steps)
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, step: int, final: bool = False) -> None:
        if final:
            keep = 1.0
        elif step % self.every:
            return
        else:
            keep = self.decay ** self.every * (step / self.total_steps) ** 3
        fast = model.state_dict()
        for name, slow in self.slow.items():
            slow.lerp_(fast[name], 1.0 - keep)
            fast[name].copy_(slow)

    def state_dict(self) -> dict:
        return dict(self.slow)

    def load_state_dict(self, state: dict) -> None:
        for name, slow in self.slow.items():
            slow.copy_(state[name])
