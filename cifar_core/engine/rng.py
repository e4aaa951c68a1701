"""Seeded random generators: every random draw of a run derives from (seed, purpose, ...), apart from
the global generators (dropout), whose states checkpoints keep (`global_rng_states`).

The purposes below name the second part; the numbers are fixed (changing one changes every run).
"""
from __future__ import annotations

import torch

EPOCH_ORDER = 1       # (seed, EPOCH_ORDER, epoch): which images, in which order
AUGMENTATION = 2      # (seed, AUGMENTATION, step): the augmentation chain's draws on the labeled batch
FLIP_STATES = 3       # (seed, FLIP_STATES): each image's starting state for alternating flips
OBJECTIVE_DRAWS = 4   # (seed, OBJECTIVE_DRAWS, step): an objective's own draws (unlabeled batches, views)
INIT_SAMPLE = 7       # (seed, INIT_SAMPLE): the images a model initialises from (fastnet's whitening)
PROXY_INIT = 8        # (seed, PROXY_INIT): the initial weights of data selection's proxy model


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from the integers `parts` (e.g. seed, purpose, epoch or step)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def global_rng_states(device: torch.device) -> dict:
    """The global generators a training step still draws from (dropout, stochastic depth): the CPU
    one, and the device's on CUDA. Checkpoints keep them so that a resumed run continues their
    streams where the stopped one left them."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_global_rng_states(states: dict | None, device: torch.device) -> None:
    """Put back what `global_rng_states` saved (None: a checkpoint from before they were kept, the
    freshly seeded generators stay)."""
    if not states:
        return
    torch.set_rng_state(states["cpu"].cpu())  # a checkpoint loaded onto the GPU moved them there
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
