"""CIFAR-10 data: loading, the committed sample, subsets, imbalance, partial labels, splits.

Loading (`load_cifar10`) resolves, in this order:
  1. the explicit `source` argument,
  2. the environment variable CIFAR10_NPZ,
  3. the uint8 array cache in `data_dir` (default ~/.cache/cifar10_lab, env CIFAR10_DATA_DIR),
  4. torchvision's CIFAR-10 files (cifar-10-batches-py/) already in `data_dir`,
  5. with download=True: torchvision's download into `data_dir`,
otherwise it raises `DataNotFound`. A source is either a Keras-layout .npz (x_train, y_train,
x_test, y_test) or the offline folder (labels.json + train_*.png, see ../shared/data/cifar10).
After decoding the offline folder or torchvision's files, the arrays are written once as an
uncompressed .npz into `data_dir`, so the next load takes well under a second.

Arrays handed out are read-only: loads are cached in-process and share memory, so copy before
modifying (`to_device_tensors` always makes its own copy).

Every index-producing function is seeded and returns sorted int64 numpy indices.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..params import ConfigError

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)

# Per-channel (R, G, B) mean and standard deviation of the 50,000 training images scaled to
# [0, 1], over all pixels (population std). Computed once from the training set, then fixed.
CIFAR_MEAN: tuple[float, float, float] = (0.4913997, 0.4821584, 0.4465309)
CIFAR_STD: tuple[float, float, float] = (0.2470322, 0.2434851, 0.2615878)

IMAGE_SHAPE = (32, 32, 3)
DEFAULT_DATA_DIR = Path("~/.cache/cifar10_lab")
CACHE_NAME = "cifar10_uint8.npz"
TORCHVISION_FOLDER = "cifar-10-batches-py"
OFFLINE_HINT = "../shared/data/cifar10"
DOWNLOAD_COMMAND = "python -m cifar_core data --download"
SAMPLE_PATH = Path(__file__).resolve().parents[1] / "assets" / "sample.npz"

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TV_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TV_TEST = "test_batch"

Progress = Callable[[float, str], None]


class DataNotFound(ConfigError):
    """No copy of CIFAR-10 could be found; the message says how to get one."""


def _not_found_message(detail: str = "") -> str:
    msg = (f"CIFAR-10 not found. Either download it ({DOWNLOAD_COMMAND}, needs internet) "
           f"or point CIFAR10_NPZ to a Keras-layout .npz or to the offline folder "
           f"({OFFLINE_HINT}, the folder holding labels.json and train_*.png).")
    return f"{msg} {detail}".strip()


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------

@dataclass
class CifarArrays:
    x_train: np.ndarray  # uint8 (N, 32, 32, 3)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray   # uint8 (M, 32, 32, 3)
    y_test: np.ndarray   # int64 (M,)
    classes: tuple[str, ...] = CLASSES
    origin: str = ""

    def counts(self, split: str = "train") -> np.ndarray:
        y = self.y_train if split == "train" else self.y_test
        return np.bincount(y, minlength=len(self.classes))

    def copy_info(self) -> "CifarArrays":
        """A new CifarArrays object sharing the (read-only) arrays."""
        return dataclasses.replace(self)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check_arrays(x_train, y_train, x_test, y_test, classes, where: str) -> CifarArrays:
    """Validate shapes, dtypes and label range; return read-only CifarArrays."""
    classes = tuple(str(c) for c in classes)
    if len(classes) < 2:
        raise ConfigError(f"{where}: expected a list of class names, got {list(classes)!r}")
    out = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ConfigError(f"{where}: x_{split} has shape {x.shape}, expected (N, 32, 32, 3) "
                              f"(Keras layout: images x height x width x RGB)")
        if x.dtype != np.uint8:
            raise ConfigError(f"{where}: x_{split} has dtype {x.dtype}, expected uint8 pixels 0..255")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ConfigError(f"{where}: y_{split} has shape {y.shape}, expected (N,) or (N, 1)")
        if y.dtype.kind not in "iu":
            raise ConfigError(f"{where}: y_{split} has dtype {y.dtype}, expected integer labels")
        if len(y) != len(x):
            raise ConfigError(f"{where}: {len(x)} images in x_{split} but {len(y)} labels in y_{split}")
        if len(x) == 0:
            raise ConfigError(f"{where}: x_{split} holds no images")
        if y.min() < 0 or y.max() >= len(classes):
            raise ConfigError(f"{where}: y_{split} has labels outside 0..{len(classes) - 1} "
                              f"(found {int(y.min())}..{int(y.max())})")
        out[f"x_{split}"] = _frozen(np.ascontiguousarray(x))
        out[f"y_{split}"] = _frozen(y.astype(np.int64))
    return CifarArrays(classes=classes, **out)


# ---- Keras-layout .npz ------------------------------------------------------------------------

def _read_npz(path: Path) -> tuple[dict, dict]:
    """Arrays of a .npz (keys of _NPZ_KEYS plus optional extras); ConfigError for a bad file."""
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ConfigError(f"{where}: this is a single .npy array, not a .npz archive with "
                              f"{', '.join(_NPZ_KEYS)}")
        with z:
            keys = set(z.files)
            missing = [k for k in _NPZ_KEYS if k not in keys]
            if missing:
                raise ConfigError(
                    f"{where}: not a CIFAR-10 array file: missing key(s) {', '.join(missing)} "
                    f"(found: {', '.join(sorted(keys)) or 'none'}; expected {', '.join(_NPZ_KEYS)}, "
                    f"the layout of keras.datasets.cifar10.load_data())")
            arrays = {k: z[k] for k in _NPZ_KEYS}
            extra = {k: z[k] for k in ("classes", "origin", "source_key") if k in keys}
    except ConfigError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        kind = type(e).__name__
        raise ConfigError(f"{where}: cannot read this file as a .npz archive of CIFAR-10 arrays "
                          f"({kind}: {e}). Expected a Keras-layout .npz with "
                          f"{', '.join(_NPZ_KEYS)}.") from None
    return arrays, extra


def _npz_to_cifar(path: Path) -> CifarArrays:
    arrays, extra = _read_npz(path)
    classes = [str(c) for c in extra["classes"].tolist()] if "classes" in extra else CLASSES
    data = _check_arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                         classes, str(path))
    if "source_key" in extra:  # our own array cache
        made_from = str(extra["origin"]) if "origin" in extra else "unknown"
        data.origin = f"array cache {path} (made from {made_from})"
    else:
        data.origin = f"npz {path}"
    return data


# ---- offline folder ---------------------------------------------------------------------------

def is_offline_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "labels.json").is_file() and (
        any(p.glob("train_*.png")) or any(p.glob("train_*.jpg")))


def _decode_stack(f: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(f) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[1] != 32 or arr.shape[0] % 32:
        raise ConfigError(f"{f}: expected a stack of 32x32 images (width 32, height a multiple "
                          f"of 32), got {arr.shape[1]}x{arr.shape[0]}")
    return arr.reshape(-1, 32, 32, 3)


def _read_offline_split(folder: Path, split: str) -> tuple[np.ndarray, bool]:
    files = sorted(folder.glob(f"{split}_*.png")) + sorted(folder.glob(f"{split}_*.jpg"))
    if not files:
        raise ConfigError(f"{folder}: no {split}_*.png or {split}_*.jpg files")
    lossy = any(f.suffix == ".jpg" for f in files)
    try:
        parts = [_decode_stack(f) for f in files]  # threads measured no faster (PNG decode)
    except ConfigError:
        raise
    except Exception as e:  # a broken image file
        raise ConfigError(f"{folder}: cannot decode the {split} images ({type(e).__name__}: {e})") from None
    return np.concatenate(parts), lossy


def _offline_key(folder: Path) -> str:
    """Identifies a folder's content well enough to tell whether a cache was made from it."""
    files = sorted(folder.glob("train_*")) + sorted(folder.glob("test_*")) + [folder / "labels.json"]
    stamp = repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
    return f"offline:{folder}:{hashlib.sha1(stamp.encode()).hexdigest()[:16]}"


def load_offline_folder(folder) -> CifarArrays:
    """Decode the offline folder (no caching; load_cifar10 caches)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "labels.json").read_text())
        classes, y_train, y_test = meta["classes"], meta["train"], meta["test"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder}/labels.json: unreadable or missing classes/train/test "
                          f"({type(e).__name__}: {e})") from None
    x_train, lossy_train = _read_offline_split(folder, "train")
    x_test, lossy_test = _read_offline_split(folder, "test")
    data = _check_arrays(x_train, np.asarray(y_train), x_test, np.asarray(y_test), classes, str(folder))
    note = ""
    if lossy_train or lossy_test:
        note = " (JPEG pack: " + ", ".join(s for s, l in (("train", lossy_train), ("test", lossy_test)) if l) \
               + " not pixel-exact)"
    data.origin = f"offline folder {folder}{note}"
    return data


# ---- torchvision's files ----------------------------------------------------------------------

def _has_torchvision_files(data_dir: Path) -> bool:
    base = data_dir / TORCHVISION_FOLDER
    return all((base / n).is_file() for n in _TV_TRAIN + (_TV_TEST,))


def _load_torchvision_files(data_dir: Path) -> CifarArrays:
    """Read cifar-10-batches-py (the layout torchvision downloads) without torchvision."""
    base = data_dir / TORCHVISION_FOLDER

    def read(name):
        try:
            with open(base / name, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        except Exception as e:
            raise ConfigError(f"{base / name}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                              f"delete {base} and download again") from None
        return x, y

    parts = [read(n) for n in _TV_TRAIN]
    x_test, y_test = read(_TV_TEST)
    classes = CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as fh:
                classes = pickle.load(fh, encoding="latin1")["label_names"]
        except Exception:
            classes = CLASSES
    data = _check_arrays(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         x_test, y_test, classes, str(base))
    data.origin = f"torchvision files {base}"
    return data


def _download(data_dir: Path, progress: Progress | None) -> None:
    """torchvision's download (prints its own progress bar); `progress` sees the byte fraction."""
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    def report(fraction, message):
        if progress is not None:
            try:
                progress(float(min(max(fraction, 0.0), 1.0)), message)
            except Exception:  # a UI callback must never break the download
                pass

    original_tqdm = getattr(tvu, "tqdm", None)
    if progress is not None and original_tqdm is not None:
        class _Hooked(original_tqdm):  # torchvision's _urlretrieve updates this bar per chunk
            def update(self, n=1):
                out = super().update(n)
                if self.total:
                    report(0.95 * self.n / self.total, f"downloading CIFAR-10: {self.n / 1e6:.1f} "
                                                       f"of {self.total / 1e6:.1f} MB")
                return out
        tvu.tqdm = _Hooked
    report(0.0, "downloading CIFAR-10 (about 170 MB)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tvd.CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:
        raise DataNotFound(_not_found_message(
            f"The download into {data_dir} failed ({type(e).__name__}: {e}).")) from None
    finally:
        if progress is not None and original_tqdm is not None:
            tvu.tqdm = original_tqdm
    report(0.97, "download done, reading the files")


# ---- array cache ------------------------------------------------------------------------------

def default_data_dir() -> Path:
    env = os.environ.get("CIFAR10_DATA_DIR")
    return Path(env or DEFAULT_DATA_DIR).expanduser()


def cache_path(data_dir=None) -> Path:
    return (Path(data_dir).expanduser() if data_dir else default_data_dir()) / CACHE_NAME


def _write_cache(data: CifarArrays, path: Path, source_key: str) -> bool:
    """Write the arrays as one uncompressed .npz, atomically. False (and a warning) on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cifar10_", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, x_train=data.x_train, y_train=data.y_train.astype(np.uint8),
                     x_test=data.x_test, y_test=data.y_test.astype(np.uint8),
                     classes=np.asarray(data.classes, dtype=str), origin=np.asarray(data.origin),
                     source_key=np.asarray(source_key))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not write the CIFAR-10 array cache {path}: {e}", stacklevel=3)
        return False


def _cache_key(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["source_key"]) if "source_key" in z.files else None
    except Exception:
        return None


# ---- in-process memo ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _memo_load(kind: str, path: str, stamp: tuple) -> CifarArrays:
    # `stamp` (mtime, size) is part of the key only, so a changed file is loaded again.
    if kind == "npz":
        return _npz_to_cifar(Path(path))
    return load_offline_folder(Path(path))


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_npz(path) -> CifarArrays:
    """A Keras-layout .npz (in-process cached by path + mtime + size)."""
    p = Path(path).expanduser().resolve()
    return _memo_load("npz", str(p), _stamp(p)).copy_info()


def clear_memory_cache() -> None:
    _memo_load.cache_clear()


# ---- entry point ------------------------------------------------------------------------------

def _load_source(source, data_dir: Path, what: str) -> CifarArrays:
    p = Path(source).expanduser()
    if not p.exists():
        raise DataNotFound(_not_found_message(f"{what} points to {source}, which does not exist."))
    p = p.resolve()
    if p.is_dir():
        if not is_offline_folder(p):
            raise ConfigError(f"{what}: {p} is a folder but not the offline CIFAR-10 folder "
                              f"(it needs labels.json and train_*.png); for a .npz give the file path")
        key = _offline_key(p)
        cache = cache_path(data_dir)
        if cache.is_file() and _cache_key(cache) == key:
            try:
                return load_npz(cache)
            except ConfigError:
                pass  # a damaged cache: decode the folder again
        data = _memo_load("offline", str(p), (key,)).copy_info()
        _write_cache(data, cache, key)
        return data
    return load_npz(p)


def load_cifar10(source=None, data_dir=None, download: bool = False,
                 progress: Progress | None = None) -> CifarArrays:
    """Load CIFAR-10 as uint8 NHWC arrays; see the module docstring for the resolution order.

    progress: optional callback(fraction in [0, 1], message); during a download it follows the
    bytes received, and it is called with 1.0 once the arrays are loaded, whatever the path.
    """
    data = _resolve(source, data_dir, download, progress)
    if progress is not None:
        try:
            progress(1.0, f"CIFAR-10 ready: {len(data.x_train)} train, {len(data.x_test)} test "
                          f"images ({data.origin})")
        except Exception:  # a UI callback must never break loading
            pass
    return data


def _resolve(source, data_dir, download: bool, progress: Progress | None) -> CifarArrays:
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if source is not None and str(source) != "":
        return _load_source(source, data_dir, "source")
    env = os.environ.get("CIFAR10_NPZ")
    if env:
        return _load_source(env, data_dir, "CIFAR10_NPZ")

    cache = cache_path(data_dir)
    if cache.is_file():
        try:
            return load_npz(cache)
        except ConfigError as e:
            warnings.warn(f"ignoring a damaged CIFAR-10 array cache: {e}", stacklevel=3)

    if not _has_torchvision_files(data_dir):
        if not download:
            raise DataNotFound(_not_found_message(
                f"Looked in {data_dir}: no array cache ({CACHE_NAME}) and no torchvision files "
                f"({TORCHVISION_FOLDER}/)."))
        _download(data_dir, progress)
    data = _load_torchvision_files(data_dir)
    _write_cache(data, cache, f"torchvision:{data_dir / TORCHVISION_FOLDER}")
    return data


# --------------------------------------------------------------------------------------------
# The committed sample
# --------------------------------------------------------------------------------------------

def load_sample(return_indices: bool = False):
    """The committed real sample: 20 test images per class (200).

    Returns (x uint8 (200,32,32,3), y int64 (200,), classes); with return_indices=True also the
    indices of these images in the offline copy's test set.
    """
    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        x, y = z["x"], z["y"].astype(np.int64)
        classes = tuple(str(c) for c in z["classes"].tolist())
        idx = z["test_indices"].astype(np.int64)
    if return_indices:
        return x, y, classes, idx
    return x, y, classes


# --------------------------------------------------------------------------------------------
# Device tensors
# --------------------------------------------------------------------------------------------

def to_device_tensors(x_nhwc_uint8, device="cpu"):
    """uint8 NHWC numpy -> contiguous uint8 torch tensor (N, 3, H, W) on `device` (a new copy)."""
    import torch

    x = np.asarray(x_nhwc_uint8)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ConfigError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x)
    with warnings.catch_warnings():  # read-only arrays are fine: the result is always a copy
        warnings.filterwarnings("ignore", message=".*not writable.*")
        src = torch.from_numpy(x)
    out = src.to(device).permute(0, 3, 1, 2).contiguous()
    if out.data_ptr() == src.data_ptr() and out.numel():
        out = out.clone()
    return out
