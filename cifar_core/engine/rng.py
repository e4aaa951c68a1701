"""Seeded random generators: every random draw of a run derives from (seed, purpose, ...)."""
from __future__ import annotations

import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from the integers `parts` (e.g. seed, purpose, epoch or step)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
