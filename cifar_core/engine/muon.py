"""Muon for conv filters and SGD for every other parameter, in one torch optimizer.

Muon (Keller Jordan, 2024) takes the momentum of a weight's gradient, seen as a matrix, and steps along
the nearest semi-orthogonal matrix instead: every direction the update spans moves by about the same
amount. airbench94_muon uses it on the conv filters of its CIFAR-10 net (each filter bank seen as
out_channels × in_channels·k·k), renormalizes each filter bank to Frobenius norm √out_channels before its
step (BatchNorm follows every conv, so only the direction matters and the step stays the same size
relative to the weight), and trains the head and the BatchNorm biases with Nesterov SGD.

Both kinds of parameter live in one optimizer, as param groups (a group with ``orthogonalize`` True
takes Muon steps), so the trainer's per-group LR schedule, GradScaler, gradient clipping, state_dict
and load_state_dict work as with torch.optim.SGD. Hand-written because torch.optim.Muon takes 2-D
parameters only.
"""
from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic a·x + b·x³ + c·x⁵: steepest at 0, settles near 1
NS_STEPS = 3  # airbench94_muon's (Muon for language models uses 5)


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> Tensor:
    """About the orthogonal factor U·Vᵀ of `matrix` = U·S·Vᵀ: the quintic Newton–Schulz iteration
    drives every singular value towards 1 (to within about 0.5–1.5, which trains as well as exactly 1).
    In fp32: airbench runs it in bf16 for speed on GPUs, and these matrices are small next to a batch's
    convolutions."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # the Gram matrix x·xᵀ over the shorter side
    x = x / (x.norm() + eps)  # the Frobenius norm bounds the spectral norm: singular values start ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


def orthogonalized(direction: Tensor) -> Tensor:
    """A conv filter bank's (or a matrix's) update direction, orthogonalized as one matrix
    out_channels × (everything else)."""
    return newton_schulz(direction.reshape(direction.shape[0], -1)).reshape(direction.shape)


class MuonSGD(torch.optim.Optimizer):
    """Param groups with ``orthogonalize`` True take Muon steps (their filters renormalized to norm
    √out_channels, then moved by lr × the orthogonalized momentum direction); the others take
    torch.optim.SGD's steps (coupled weight decay, momentum, Nesterov). Both use SGD's momentum buffer
    (buffer = momentum · buffer + grad; Nesterov: grad + momentum · buffer). Orthogonalized groups take
    no weight decay: the renormalization would undo it."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, orthogonalize: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        orthogonalize=orthogonalize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # the optimizer stays as it was
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        grad = p.grad
        if not group["orthogonalize"] and group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        direction = self._momentum_direction(p, grad, group)
        if group["orthogonalize"]:
            p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
            direction = orthogonalized(direction)
        p.add_(direction, alpha=-group["lr"])

    def _momentum_direction(self, p: Tensor, grad: Tensor, group: dict) -> Tensor:
        momentum = group["momentum"]
        if momentum == 0:
            return grad
        state = self.state[p]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = grad.detach().clone()
        else:
            buffer.mul_(momentum).add_(grad)
        return grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer


def check_group(group: dict) -> None:
    if group["nesterov"] and group["momentum"] <= 0:
        raise ValueError("Nesterov momentum needs a momentum above 0")
    if not group["orthogonalize"]:
        return
    if group["weight_decay"]:
        raise ValueError("orthogonalized groups take no weight decay (each step renormalizes their weights)")
    if any(p.ndim < 2 for p in group["params"]):
        raise ValueError("only weights with 2 or more dimensions can take orthogonalized steps")
