#!/usr/bin/env python3
"""Regenerate cifar_core/assets/sample.npz: 20 real CIFAR-10 test images per class (200).

    python bench/make_sample.py [--dir ../shared/data/cifar10] [--out cifar_core/assets/sample.npz]

Deterministic, byte for byte: the images are drawn with a fixed seed from the first 1,000 test
images of the offline copy (those are in the original CIFAR-10 test order, so `test_indices` are
valid indices into the official test set too), skipping the few test images that the offline
copy only has as JPEG decodings, so every sample image is pixel-exact. The archive is written with
fixed zip timestamps. Stored: x uint8 (200,32,32,3), y uint8 (200,), classes, test_indices int64,
ordered by class, then by test index.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from cifar_core.data import SAMPLE_PATH, load_offline_folder

PER_CLASS = 20
FIRST = 1000  # draw from the test images that keep the original order
SEED = 20240


def choose(y_test: np.ndarray, exclude: set[int], n_classes: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    picked = []
    for c in range(n_classes):
        candidates = np.array([i for i in range(FIRST) if y_test[i] == c and i not in exclude])
        picked.append(np.sort(rng.choice(candidates, size=PER_CLASS, replace=False)))
    return np.concatenate(picked).astype(np.int64)


def write_npz(path: Path, arrays: dict) -> None:
    """Like np.savez_compressed, but with fixed timestamps so the bytes are reproducible."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--out", default=str(SAMPLE_PATH))
    args = p.parse_args(argv)
    folder, out = Path(args.dir), Path(args.out)
    data = load_offline_folder(folder)
    meta = json.loads((folder / "labels.json").read_text())
    idx = choose(data.y_test, set(meta.get("test_from_jpeg", [])), len(data.classes))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, {"x": data.x_test[idx], "y": data.y_test[idx].astype(np.uint8),
                    "classes": np.asarray(data.classes, dtype=str), "test_indices": idx})
    print(f"wrote {out}: {len(idx)} images ({PER_CLASS} per class), {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
