"""The one place that asks whether CUDA is there and describes the training device."""
from __future__ import annotations

import functools
import os

from .params import ConfigError

__all__ = ["cuda_available", "cuda_device_count", "default_device_kind", "resolve_device", "device_description", "device_info",
           "free_memory_bytes"]


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


def free_memory_bytes(device) -> int | None:
    """Bytes a process could still allocate on `device`: CUDA's free memory; on a CPU, Linux's MemAvailable,
    capped by the cgroup's memory limit when one is set (containers). None when it cannot be told."""
    if device.type == "cuda":
        import torch
        return int(torch.cuda.mem_get_info(device)[0])
    available = _meminfo_available()
    if available is None:
        return None
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """memory.max − memory.current of this process's cgroup (v2), None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None
