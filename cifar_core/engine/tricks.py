"""Training tricks and the named points where the loop calls them.

Hooks (a trick overrides those it needs, see `Trick`):

* ``on_batch``: the labeled uint8 batch before augmentation (alternating flips);
* ``after_step``: after each optimizer step (EMA update, lookahead);
* ``eval_model``: which network evaluates (the EMA when kept);
* ``state_dict`` / ``resume``: what the checkpoint keeps (EMA, lookahead).

Also here: mixed precision (autocast) and gradient clipping.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import RunConfig
from .rng import FLIP_STATES, seeded_generator


def decay_groups(cfg: RunConfig, params: list[torch.Tensor]) -> list[dict]:
    """SGD param groups: weight decay on weight matrices/kernels only (decaying norm scales and biases only
    hurts), biases and norms at the bias LR scale. `lr_scale`: the group's LR as a multiple of cfg.lr."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": cfg.bias_lr_scale}]


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


def clip_gradients(cfg: RunConfig, model: torch.nn.Module) -> float:
    """Clip the (already unscaled) gradients as cfg.grad_clip says; "none" only measures.
    Returns the total gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.grad_clip == "value":
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
        return norm
    max_norm = cfg.clip_max_norm if cfg.grad_clip == "norm" else float("inf")
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=float(cfg.clip_norm_type)).item()


class Trick:
    """A training trick: it overrides the hooks it uses. `name` is its checkpoint key."""

    name = ""

    def on_batch(self, x_uint8: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        return x_uint8

    def after_step(self, model: torch.nn.Module, step: int, final: bool = False) -> None:
        """`step`: optimizer steps done so far; `final`: this was the run's last step."""

    def eval_model(self) -> torch.nn.Module | None:
        """The network to evaluate instead of the trained one, or None."""
        return None

    def state_dict(self) -> dict | None:
        """What the checkpoint keeps under `name`; None: nothing."""
        return None

    def resume(self, saved: dict | None, model: torch.nn.Module) -> None:
        """Continue from `saved` (None when the checkpoint has none) once `model` holds its weights."""


def alternating_flips(base: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images of the batch `idx` to mirror in `epoch`: each image's fixed random state `base`,
    inverted in odd epochs (airbench's derandomized flip)."""
    return base[idx] ^ bool(epoch % 2)


class AlternatingFlips(Trick):
    """airbench's derandomized flip: a random mirror state per training image, inverted every other epoch."""

    name = "alternating_flip"

    def __init__(self, n_images: int, seed: int, device: torch.device):
        self.base = (torch.rand(n_images, generator=seeded_generator(seed, FLIP_STATES)) < 0.5).to(device)

    def on_batch(self, x_uint8, idx, epoch):
        flips = alternating_flips(self.base, idx, epoch)
        return torch.where(flips[:, None, None, None], x_uint8.flip(-1), x_uint8)


class EMA(Trick):
    """An exponential moving average of the weights and buffers, updated after every step; the run
    evaluates (and exports) with it."""

    name = "ema"

    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def after_step(self, model, step, final=False):
        self.averaged.update_parameters(model)

    def eval_model(self):
        return self.averaged

    def state_dict(self):
        return self.averaged.state_dict()

    def resume(self, saved, model):
        if saved is not None:
            self.averaged.load_state_dict(saved)


class Lookahead(Trick):
    """airbench94's lookahead: slow weights that every `every` steps move towards the trained (fast)
    weights, which then restart from them. The move keeps decay^every · progress³ of the slow
    weights, so early on it is a plain copy and late in training a slow average. At the last step the
    fast weights take the slow ones. Covers every floating-point entry of the state dict (BN running
    statistics too). Not in torch.optim: its Lookahead-style wrappers neither reset BN buffers nor
    follow this schedule."""

    name = "lookahead"

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

    def resume(self, saved, model):
        # a checkpoint from before lookahead was on: start the slow weights from its weights
        self.load_state_dict(saved or model.state_dict())


# Checkpoints always carry these keys (None when the trick is off), so every checkpoint reads alike.
CHECKPOINTED_TRICKS = ("ema", "lookahead")


@dataclass
class Tricks:
    """The run's tricks, called in order at each hook (EMA before lookahead: the average takes the
    trained weights of the step, before lookahead pulls them back)."""

    items: list[Trick] = field(default_factory=list)

    def on_batch(self, x_uint8: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        for trick in self.items:
            x_uint8 = trick.on_batch(x_uint8, idx, epoch)
        return x_uint8

    def after_step(self, model: torch.nn.Module, step: int, final: bool) -> None:
        for trick in self.items:
            trick.after_step(model, step, final)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return next((m for m in (t.eval_model() for t in self.items) if m is not None), model)

    @property
    def eval_weights(self) -> str:
        """"ema" or "model": what eval_model evaluates (recorded in checkpoints and results)."""
        return next((t.name for t in self.items if t.eval_model() is not None), "model")

    def state_dicts(self) -> dict:
        states = dict.fromkeys(CHECKPOINTED_TRICKS)
        for trick in self.items:
            state = trick.state_dict()
            if state is not None:
                states[trick.name] = state
        return states

    def resume(self, checkpoint: dict, model: torch.nn.Module) -> None:
        for trick in self.items:
            trick.resume(checkpoint.get(trick.name), model)


def build_tricks(cfg: RunConfig, model: torch.nn.Module, n_train: int, total_steps: int,
                 device: torch.device) -> Tricks:
    items: list[Trick] = []
    if cfg.alternating_flip:
        items.append(AlternatingFlips(n_train, cfg.seed, device))
    if cfg.ema_decay > 0:
        items.append(EMA(model, cfg.ema_decay))
    if cfg.lookahead_every:
        items.append(Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay, total_steps))
    return Tricks(items)
