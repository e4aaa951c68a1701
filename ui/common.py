"""Shared page plumbing: where runs and data live, device info, and turning errors into messages."""
from __future__ import annotations

import contextlib
import os
import traceback

import streamlit as st

from cifar_core.params import ConfigError
from cifar_core.runs import RunStore


def get_store() -> RunStore:
    """The runs root: $CIFAR_LAB_RUNS or ./runs (read on every call so tests can point it elsewhere)."""
    return RunStore()


def data_source() -> str | None:
    """Explicit CIFAR-10 source for jobs ($CIFAR10_NPZ), else None (the cache / download path)."""
    return os.environ.get("CIFAR10_NPZ") or None


def data_status() -> dict:
    """Where CIFAR-10 was found, or the message saying how to get it (never raises)."""
    return _data_status(data_source(), os.environ.get("CIFAR10_DATA_DIR"))


def clear_data_status() -> None:
    _data_status.clear()


@st.cache_data(ttl=30, show_spinner=False)
def _data_status(source: str | None, data_dir: str | None) -> dict:
    # The arguments are the cache key: a changed CIFAR10_NPZ / CIFAR10_DATA_DIR is looked up anew.
    from cifar_core.data import load_cifar10
    try:
        arrays = load_cifar10(source, data_dir)
        return {"ok": True, "origin": arrays.origin, "train": len(arrays.x_train), "test": len(arrays.x_test)}
    except ConfigError as exc:
        return {"ok": False, "message": str(exc)}


@st.cache_data(show_spinner=False)
def device_info() -> dict:
    """cifar_core.devices.device_info(), asked once per server process."""
    from cifar_core import devices
    return devices.device_info()


@contextlib.contextmanager
def friendly_errors(what: str = "This action"):
    """Show a clear message instead of a traceback (the traceback goes to the server log)."""
    try:
        yield
    except ConfigError as exc:
        st.error(str(exc))
    except Exception as exc:  # never let a traceback reach the page
        st.error(f"{what} failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
