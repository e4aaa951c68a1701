"""Validation of augmentation specs and the chain that applies them to a batch."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..params import ConfigError, Param, reject_unknown
from .base import (AUGMENTATIONS, AugOp, RemapOp, as_nchw, compose_remaps,
                   draw_coin, gather_pixels, to_float)


# ----------------------------------------------------------------------------------------------
# Chain
# ----------------------------------------------------------------------------------------------

_P = Param("p", "float", 1.0, 0, 1, help="probability per image that the step applies")
_SPEC_KEYS = ("name", "params", "p")
# A step's probability when its spec gives none: 1, except for the flips, whose p *is* how often an
# image is mirrored (a flip of every image is no augmentation).
DEFAULT_STEP_P = {"hflip": 0.5, "vflip": 0.5}
# Flips used to carry a probability of their own, params.p_flip, on top of the step's p: a spec with it
# (older configs and run records) still loads, as one step probability p · p_flip. The draws are the
# same: the step's coin for each image replaces the op's.
_FOLDED_PARAMS = {"hflip": "p_flip", "vflip": "p_flip"}


def default_step_p(name: str) -> float:
    """The probability a step named `name` gets when its spec says none."""
    return DEFAULT_STEP_P.get(name, 1.0)


def _fold_legacy_probability(name: str, params: dict, spec: dict) -> tuple[dict, float]:
    """(params without the old flip probability, the step's one probability)."""
    key = _FOLDED_PARAMS.get(name)
    if key is None or key not in params:
        return params, spec.get("p", default_step_p(name))
    params = dict(params)
    inner = Param(key, "float", 0.5, 0.0, 1.0).validate(params.pop(key), name)
    outer = _P.validate(spec.get("p", 1.0), name)  # the old default: every image ran the op
    return params, outer * inner


def _validate_step(i: int, spec: Any) -> tuple[dict, AugOp]:
    where = f"augment[{i}]"
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected {{name, params, p}}, got {spec!r}")
    reject_unknown(spec, _SPEC_KEYS, where, "key(s)")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: missing augmentation name")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} {name}.params: expected a mapping, got {params!r}")
    try:
        entry = AUGMENTATIONS.get(name)
        params, p = _fold_legacy_probability(name, params, spec)
        values = entry.validate(params)
        p = _P.validate(p, name)
        op = entry.fn(**values)  # some ops check combinations (odd kernel sizes)
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None
    return {"name": name, "params": values, "p": p}, op


def _validate(specs) -> tuple[list[dict], list[AugOp]]:
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"augment: expected a list of steps, got {specs!r}")
    out, ops = [], []
    normalizer = None
    for i, spec in enumerate(specs):
        step, op = _validate_step(i, spec)
        tags = AUGMENTATIONS.get(step["name"]).tags
        if normalizer is not None and "color" in tags:
            raise ConfigError(f"augment[{i}] {step['name']}: colour steps clamp to [0, 1] and cannot "
                              f"follow the normalizing step {normalizer}; move it earlier")
        if op.normalizes:
            normalizer = step["name"]
        out.append(step)
        ops.append(op)
    return out, ops


def validate_chain(specs) -> list[dict]:
    """Return specs as [{"name", "params" (defaults filled, coerced), "p"}]; ConfigError if invalid."""
    return _validate(specs)[0]


class AugmentChain:
    """A validated list of steps applied in order: ``chain(x, y, gen, record=False)``.

    Each step applies to a random subset of images chosen with probability p (drawn from gen).
    For per-image ops only the chosen images are processed (index_select / index_copy); for
    batch-level ops (mixup, cutmix) the whole batch is mixed and the chosen images kept, so
    partners are drawn from the whole batch. Consecutive pixel-moving steps (RemapOp: random_crop,
    hflip, vflip) are composed into one index map and applied with a single gather; the random
    draws and the result are the same as applying them one by one.
    """

    def __init__(self, specs, num_classes: int = 10):
        self.specs, self.ops = _validate(specs)
        self._fuse = True  # compose consecutive RemapOp steps into one gather (same result)
        self.num_classes = num_classes
        self.keys = []
        seen: dict[str, int] = {}
        for step in self.specs:
            n = seen[step["name"]] = seen.get(step["name"], 0) + 1
            self.keys.append(step["name"] if n == 1 else f"{step['name']}#{n}")

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return f"AugmentChain({self.specs!r})"

    @property
    def normalizes(self) -> bool:
        return any(op.normalizes for op in self.ops)

    @property
    def needs_fit(self) -> bool:
        return any(op.needs_fit and not op.fitted for op in self.ops)

    def fit(self, x) -> "AugmentChain":
        """Fit steps that need it (zca) on training images: uint8 or float, (N,3,H,W) or (N,H,W,3)."""
        for op in self.ops:
            if op.needs_fit:
                op.fit(x)
        return self

    def _labels(self, y, x, num_classes):
        if y is None:
            return None
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point() and y.dim() == 2:
            return y.float()
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(f"labels must be int (B,) or soft (B, C), got {y.dtype} {tuple(y.shape)}")
        return F.one_hot(y.long(), num_classes).float()

    def __call__(self, x, y=None, gen: torch.Generator | None = None, record: bool = False,
                 num_classes: int | None = None):
        x = as_nchw(x)
        if x.dtype != torch.uint8:
            x = x.float()
        # uint8 input is converted to float /255 lazily: leading pixel moves (crop, flips) commute
        # with the conversion, so they gather 1-byte pixels instead of 4-byte ones.
        y = self._labels(y, x, num_classes or self.num_classes)
        if gen is None:
            gen = torch.Generator()
        if gen.device.type != "cpu":
            raise ValueError("augmentations draw their randomness from a CPU torch.Generator")
        b, _, h, w = x.shape
        records = [{} for _ in range(b)] if record else None
        if b == 0:
            return to_float(x), y, records
        pending = None  # composed index maps of consecutive pixel-moving steps, not yet applied
        for key, step, op in zip(self.keys, self.specs, self.ops):
            p = step["p"]
            mask, idx, sampled = None, None, {}  # mask None: every image; idx: subset that ran
            if p < 1:
                mask = torch.zeros(b, dtype=torch.bool) if p <= 0 else draw_coin(gen, b, p)
                if not op.batch_level:
                    idx = mask.nonzero().squeeze(1)
            if p <= 0:
                pass
            elif self._fuse and isinstance(op, RemapOp):
                maps, sampled = self._remap(op, b, h, w, idx, gen)
                pending = maps if pending is None else compose_remaps(pending, maps)
            else:
                if pending is not None:
                    x, pending = gather_pixels(x, *pending), None
                x = to_float(x)
                if op.batch_level:
                    xo, yo, sampled = op(x, y, gen)
                    if mask is not None:  # mix everything, keep the chosen images
                        m = mask.to(x.device)
                        xo = torch.where(m[:, None, None, None], xo, x)
                        yo = None if y is None else torch.where(m[:, None], yo, y)
                    x, y = xo, yo
                elif idx is None:
                    x, y, sampled = op(x, y, gen)
                elif len(idx):  # run on the chosen images only
                    idx_d = idx.to(x.device)
                    ys = None if y is None else y.index_select(0, idx_d)
                    xs, ys, sampled = op(x.index_select(0, idx_d), ys, gen)
                    x = x.index_copy(0, idx_d, xs)
                    if y is not None:
                        y = y.index_copy(0, idx_d, ys)
            if record:
                self._record(records, key, b, mask, idx, sampled)
        if pending is not None:
            x = gather_pixels(x, *pending)
        return to_float(x), y, records

    @staticmethod
    def _remap(op: RemapOp, b, h, w, idx, gen):
        """The op's index maps for the whole batch; images outside `idx` keep the identity."""
        n = b if idx is None else len(idx)
        if n == 0:
            return (torch.arange(h).expand(b, h), torch.arange(w).expand(b, w), None, None), {}
        rows, cols, row_ok, col_ok, sampled = op.remap(n, h, w, gen)
        if idx is None:
            return (rows, cols, row_ok, col_ok), sampled
        full_r, full_c = torch.arange(h).repeat(b, 1), torch.arange(w).repeat(b, 1)
        full_r[idx], full_c[idx] = rows, cols
        ok_r = ok_c = None
        if row_ok is not None:
            ok_r = torch.ones(b, h, dtype=torch.bool)
            ok_r[idx] = row_ok
        if col_ok is not None:
            ok_c = torch.ones(b, w, dtype=torch.bool)
            ok_c[idx] = col_ok
        return (full_r, full_c, ok_r, ok_c), sampled

    @staticmethod
    def _record(records, key, b, mask, idx, sampled):
        applied = torch.ones(b, dtype=torch.bool) if mask is None else mask.clone()
        values = {k: v.detach().cpu().tolist() for k, v in sampled.items()}
        # position of image i inside the sampled tensors (they cover only idx when a subset ran)
        pos = list(range(b)) if idx is None else [None] * b
        if idx is not None:
            for j, i in enumerate(idx.tolist()):
                pos[i] = j
        op_applied = values.pop("applied", None)
        for i in range(b):
            j = pos[i]
            ok = bool(applied[i]) and j is not None and (op_applied is None or bool(op_applied[j]))
            entry = {k: v[j] for k, v in values.items()} if j is not None and values else {}
            entry["applied"] = ok
            records[i][key] = entry
