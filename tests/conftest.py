"""Shared fixtures: the offline CIFAR-10 copy, a Keras-layout npz made from it, the loaded arrays.

Tests never touch the user's cache: CIFAR10_DATA_DIR points to a session temp folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE_DIR = (REPO / ".." / "shared" / "data" / "cifar10").resolve()


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def cifar_data_dir(tmp_path_factory) -> Path:
    """A session-private CIFAR10_DATA_DIR (the array cache goes here, never to ~/.cache)."""
    path = tmp_path_factory.mktemp("cifar10_data_dir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR10_DATA_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def offline_dir() -> Path:
    if not ((OFFLINE_DIR / "labels.json").is_file() and any(OFFLINE_DIR.glob("train_*.png"))):
        pytest.fail(f"the offline CIFAR-10 copy is missing: expected labels.json and train_*.png in "
                    f"{OFFLINE_DIR} (the repository's ../shared/data/cifar10; CI always has it)",
                    pytrace=False)
    return OFFLINE_DIR


@pytest.fixture(scope="session")
def cifar_npz(offline_dir, cifar_data_dir, tmp_path_factory) -> Path:
    """The whole set as one Keras-layout .npz, written once per session."""
    from cifar_core.data import load_cifar10

    data = load_cifar10(source=offline_dir)  # also writes the array cache into cifar_data_dir
    path = tmp_path_factory.mktemp("cifar10_npz") / "cifar10.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train.astype(np.uint8),
             x_test=data.x_test, y_test=data.y_test.astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def cifar(cifar_npz):
    """CifarArrays of the full data set (read-only arrays)."""
    from cifar_core.data import load_cifar10

    return load_cifar10(source=cifar_npz)
