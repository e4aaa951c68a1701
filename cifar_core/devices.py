"""The one place that asks whether CUDA is there and describes the training device."""
from __future__ import annotations

import functools
import os

from .params import ConfigError

__all__ = ["cuda_available", "cuda_device_count", "default_device_kind", "resolve_device", "device_description", "device_info"]


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when torch sees a usable CUDA GPU (False when torch cannot even ask)."""
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def cuda_device_count() -> int:
    """How many CUDA GPUs torch sees (0 without CUDA)."""
    if not cuda_available():
        return 0
    import torch
    return torch.cuda.device_count()


def default_device_kind() -> str:
    """What device "auto" means on this machine: "cuda" or "cpu"."""
    return "cuda" if cuda_available() else "cpu"


def resolve_device(name: str):
    """A config's device name ("auto", "cpu", "cuda") as a torch.device; ConfigError for a missing GPU."""
    import torch
    if name == "auto":
        return torch.device(default_device_kind())
    if name == "cuda" and not cuda_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def device_description(device) -> str:
    import torch
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"


def device_info() -> dict:
    """{kind, name, memory_gib} of the device "auto" picks, for the app's header and estimates."""
    if cuda_available():
        import torch
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30}
    return {"kind": "cpu", "name": f"CPU ({os.cpu_count()} cores)", "memory_gib": None}
