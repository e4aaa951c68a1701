"""cifar_core.data: loading, cache, sample, subsets, imbalance, label budget, splits."""
from __future__ import annotations

import importlib.util
import json
import pickle
import time

import numpy as np
import pytest
import torch

from cifar_core import data as D
from cifar_core.params import ConfigError


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("CIFAR10_NPZ", raising=False)


def small_arrays(cifar, n_train=60, n_test=20):
    return dict(x_train=cifar.x_train[:n_train], y_train=cifar.y_train[:n_train].astype(np.uint8),
                x_test=cifar.x_test[:n_test], y_test=cifar.y_test[:n_test].astype(np.uint8))


# ------------------------------------------------------------------------------------------ loading

def test_offline_folder_and_npz_give_identical_arrays(offline_dir, cifar):
    # the folder's own reference loader, imported by path, as an independent decoder
    spec = importlib.util.spec_from_file_location("cifar10_offline_ref", offline_dir / "cifar10_offline.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    expected = ref.load(offline_dir)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(cifar, key), expected[key], err_msg=key)
    assert list(cifar.classes) == expected["classes"]
    from_folder = D.load_cifar10(source=offline_dir)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_folder, key), getattr(cifar, key), err_msg=key)


def test_shapes_dtypes_counts(cifar, cifar_npz):
    assert cifar.x_train.shape == (50000, 32, 32, 3) and cifar.x_train.dtype == np.uint8
    assert cifar.x_test.shape == (10000, 32, 32, 3) and cifar.x_test.dtype == np.uint8
    assert cifar.y_train.shape == (50000,) and cifar.y_train.dtype == np.int64
    assert cifar.y_test.shape == (10000,) and cifar.y_test.dtype == np.int64
    assert np.bincount(cifar.y_train).tolist() == [5000] * 10
    assert np.bincount(cifar.y_test).tolist() == [1000] * 10
    assert tuple(cifar.classes) == D.CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck")
    assert str(cifar_npz) in cifar.origin
    assert not cifar.x_train.flags.writeable  # shared through the in-process cache


def test_mean_std_constants_match_training_set(cifar):
    values = np.arange(256) / 255
    for c in range(3):  # exact statistics from each channel's histogram (no float copy of the set)
        hist = np.bincount(cifar.x_train[..., c].ravel(), minlength=256) / cifar.x_train[..., c].size
        mean = (hist * values).sum()
        std = np.sqrt((hist * (values - mean) ** 2).sum())
        assert mean == pytest.approx(D.CIFAR_MEAN[c], abs=1e-6)
        assert std == pytest.approx(D.CIFAR_STD[c], abs=1e-6)


def test_cache_written_atomically_and_reloads_fast(cifar, cifar_data_dir, offline_dir, no_env):
    cache = cifar_data_dir / D.CACHE_NAME
    assert cache.is_file(), "loading the offline folder must write the array cache"
    assert not [p for p in cifar_data_dir.iterdir() if p.suffix == ".tmp"]
    D.clear_memory_cache()
    t0 = time.perf_counter()
    loaded = D.load_cifar10()  # resolution: no source, no env -> the cache in CIFAR10_DATA_DIR
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"cache load took {elapsed:.2f} s"
    assert "array cache" in loaded.origin and "offline folder" in loaded.origin
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(cifar, key), err_msg=key)
    # the explicit offline folder source recognizes its cache instead of decoding the PNGs again
    D.clear_memory_cache()
    t0 = time.perf_counter()
    again = D.load_cifar10(source=offline_dir)
    assert time.perf_counter() - t0 < 1.0
    assert "array cache" in again.origin
    # in-process: same npz path + mtime -> no re-read, but a fresh CifarArrays object
    t0 = time.perf_counter()
    third = D.load_cifar10()
    assert time.perf_counter() - t0 < 0.05
    assert third is not again and third.x_train is again.x_train


def test_env_npz_and_label_shape_n1(cifar, tmp_path, monkeypatch):
    arrays = small_arrays(cifar)
    arrays["y_train"] = arrays["y_train"][:, None]  # Keras gives (N, 1)
    arrays["y_test"] = arrays["y_test"][:, None]
    path = tmp_path / "small.npz"
    np.savez(path, **arrays)
    monkeypatch.setenv("CIFAR10_NPZ", str(path))
    got = D.load_cifar10()
    assert got.y_train.shape == (60,) and got.y_train.dtype == np.int64
    np.testing.assert_array_equal(got.y_train, cifar.y_train[:60])
    np.testing.assert_array_equal(got.x_test, cifar.x_test[:20])


@pytest.mark.parametrize("case, words", [
    ("missing", ["missing key", "y_test"]),
    ("shape", ["x_train", "shape", "(N, 32, 32, 3)"]),
    ("dtype", ["x_train", "uint8"]),
    ("labels", ["y_train", "labels outside"]),
    ("length", ["x_train", "labels"]),
    ("notzip", ["cannot read", ".npz"]),
    ("npy", ["not a .npz"]),
])
def test_bad_npz_gives_clear_config_error(cifar, tmp_path, case, words):
    arrays = small_arrays(cifar)
    path = tmp_path / "bad.npz"
    if case == "missing":
        del arrays["y_test"]
    elif case == "shape":
        arrays["x_train"] = arrays["x_train"].transpose(0, 3, 1, 2)
    elif case == "dtype":
        arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    elif case == "labels":
        arrays["y_train"] = arrays["y_train"] + 10
    elif case == "length":
        arrays["y_train"] = arrays["y_train"][:-1]
    if case == "notzip":
        path.write_text("this is not a zip file")
    elif case == "npy":
        with open(path, "wb") as fh:
            np.save(fh, arrays["x_train"])
    else:
        np.savez(path, **arrays)
    with pytest.raises(ConfigError) as info:
        D.load_cifar10(source=path)
    msg = str(info.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, msg


def test_nothing_found_names_both_ways(tmp_path, no_env):
    with pytest.raises(D.DataNotFound) as info:
        D.load_cifar10(data_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "CIFAR10_NPZ" in msg and "python -m cifar_core data --download" in msg
    assert "../shared/data/cifar10" in msg and str(tmp_path) in msg
    with pytest.raises(D.DataNotFound, match="CIFAR10_NPZ"):
        D.load_cifar10(source=tmp_path / "nope.npz")


def test_folder_that_is_not_the_offline_copy(tmp_path):
    with pytest.raises(ConfigError, match="labels.json"):
        D.load_cifar10(source=tmp_path)


def _write_torchvision_files(cifar, root, n=30):
    base = root / D.TORCHVISION_FOLDER
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = (cifar.x_test if name == "test_batch" else cifar.x_train[i * n:(i + 1) * n])[:n]
        y = (cifar.y_test if name == "test_batch" else cifar.y_train[i * n:(i + 1) * n])[:n]
        entry = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1).copy(), "labels": y.tolist()}
        with open(base / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(D.CLASSES)}, fh)


def test_torchvision_files_are_read_and_cached(cifar, tmp_path, no_env):
    _write_torchvision_files(cifar, tmp_path)
    got = D.load_cifar10(data_dir=tmp_path)
    assert "torchvision files" in got.origin
    np.testing.assert_array_equal(got.x_train, cifar.x_train[:150])
    np.testing.assert_array_equal(got.y_train, cifar.y_train[:150])
    np.testing.assert_array_equal(got.x_test, cifar.x_test[:30])
    assert (tmp_path / D.CACHE_NAME).is_file()
    assert "array cache" in D.load_cifar10(data_dir=tmp_path).origin


def test_download_uses_torchvision_and_reports_progress(cifar, tmp_path, no_env, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    calls = []

    class FakeCIFAR10:  # stands in for the network: drives torchvision's progress bar, writes files
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            with tvu.tqdm(total=1000, disable=True) as bar:
                for _ in range(4):
                    bar.update(250)
            _write_torchvision_files(cifar, tmp_path)

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    seen = []
    got = D.load_cifar10(data_dir=tmp_path, download=True, progress=lambda f, m: seen.append((f, m)))
    assert calls == [(str(tmp_path), True, True)]
    assert got.x_train.shape == (150, 32, 32, 3)
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(fractions) >= 6  # start, four byte updates, reading, done
    assert all(isinstance(m, str) and m for _, m in seen)
    seen.clear()  # any later load reports completion too (here: from the cache just written)
    assert "array cache" in D.load_cifar10(data_dir=tmp_path, progress=lambda f, m: seen.append(f)).origin
    assert seen == [1.0]


# ------------------------------------------------------------------------------------------- sample

def test_sample_is_real_and_balanced(cifar):
    x, y, classes = D.load_sample()
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    assert tuple(classes) == D.CLASSES
    _, _, _, idx = D.load_sample(return_indices=True)
    assert len(set(idx.tolist())) == 200
    np.testing.assert_array_equal(x, cifar.x_test[idx])
    np.testing.assert_array_equal(y, cifar.y_test[idx])
    assert D.SAMPLE_PATH.stat().st_size < 1_000_000


def test_sample_avoids_jpeg_test_images(offline_dir):
    jpeg = set(json.loads((offline_dir / "labels.json").read_text())["test_from_jpeg"])
    _, _, _, idx = D.load_sample(return_indices=True)
    assert not jpeg & set(idx.tolist())


# ------------------------------------------------------------------------------------------ subsets

def test_random_subset(cifar):
    y = cifar.y_train
    a = D.random_subset(y, 1234, seed=3)
    assert len(a) == 1234 and len(np.unique(a)) == 1234 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, D.random_subset(y, 1234, seed=3))
    assert not np.array_equal(a, D.random_subset(y, 1234, seed=4))
    with pytest.raises(ConfigError, match="50000"):
        D.random_subset(y, 50001, seed=0)
    with pytest.raises(ConfigError):
        D.random_subset(y, 0, seed=0)


def test_per_class_subset(cifar):
    y = cifar.y_train
    a = D.per_class_subset(y, 37, seed=1)
    assert np.bincount(y[a], minlength=10).tolist() == [37] * 10
    assert len(np.unique(a)) == 370
    np.testing.assert_array_equal(a, D.per_class_subset(y, 37, seed=1))
    with pytest.raises(ConfigError, match="fewer"):
        D.per_class_subset(y, 5001, seed=0)


def test_train_val_split_disjoint_and_stratified(cifar):
    y = cifar.y_train
    pool = D.per_class_subset(y, 300, seed=0)
    train, val = D.train_val_split(pool, y, 500, seed=0)
    assert len(val) == 500 and len(train) == 2500
    assert not np.intersect1d(train, val).size
    np.testing.assert_array_equal(np.union1d(train, val), pool)
    assert np.bincount(y[val], minlength=10).tolist() == [50] * 10
    t2, v2 = D.train_val_split(pool, y, 500, seed=0)
    np.testing.assert_array_equal(v2, val)
    # an imbalanced pool: each class in proportion (largest remainder keeps the exact total)
    pool = np.concatenate([np.flatnonzero(y == c)[: 100 * (c + 1)] for c in range(10)])
    _, val = D.train_val_split(pool, y, 0.1, seed=5)
    counts = np.bincount(y[val], minlength=10)
    assert counts.sum() == 550 and counts.tolist() == [10 * (c + 1) for c in range(10)]
    with pytest.raises(ConfigError):
        D.train_val_split(pool, y, len(pool), seed=0)


# ---------------------------------------------------------------------------------------- imbalance

def test_registry_entries_and_params():
    assert set(D.IMBALANCE.names()) >= {"none", "report_random", "long_tail", "step"}
    assert D.IMBALANCE.validate("long_tail", {})["imbalance_ratio"] == 100
    assert D.IMBALANCE.validate("long_tail", {})["n_max"] == 5000
    assert D.IMBALANCE.validate("step", {})["minority_classes"] == 5
    assert D.IMBALANCE.validate("report_random", {}) == {"low": 500, "high": 1000}
    with pytest.raises(ConfigError):
        D.IMBALANCE.validate("long_tail", {"imbalance_ratio": 5000})
    with pytest.raises(ConfigError, match="unknown imbalance"):
        D.IMBALANCE.get("nope")


def test_imbalance_none(cifar):
    idx = D.IMBALANCE.build("none", {}, y=cifar.y_train, seed=0)
    np.testing.assert_array_equal(idx, np.arange(50000))


def test_report_random(cifar):
    y = cifar.y_train
    a = D.IMBALANCE.build("report_random", {}, y=y, seed=0)
    counts = np.bincount(y[a], minlength=10)
    assert np.all((counts >= 500) & (counts <= 1000))
    assert len(np.unique(a)) == len(a) == counts.sum()
    np.testing.assert_array_equal(a, D.IMBALANCE.build("report_random", {}, y=y, seed=0))
    b = D.IMBALANCE.build("report_random", {"low": 100, "high": 120}, y=y, seed=7)
    assert np.all((np.bincount(y[b]) >= 100) & (np.bincount(y[b]) <= 120))
    with pytest.raises(ConfigError, match="greater"):
        D.IMBALANCE.build("report_random", {"low": 900, "high": 800}, y=y, seed=0)
    with pytest.raises(ConfigError, match="fewer than high"):
        D.IMBALANCE.build("report_random", {}, y=y[D.per_class_subset(y, 300, 0)], seed=0)


def test_long_tail(cifar):
    y = cifar.y_train
    a = D.IMBALANCE.build("long_tail", {}, y=y, seed=0)
    counts = np.bincount(y[a], minlength=10)
    assert counts[0] == 5000 and counts[-1] == 50
    assert counts.tolist() == D.long_tail_counts(5000, 100).tolist()
    assert counts.sum() == 12406  # the usual CIFAR-10-LT size for rho = 100
    assert np.all(np.diff(counts) < 0)
    b = np.bincount(y[D.IMBALANCE.build("long_tail", {"imbalance_ratio": 10, "n_max": 1000}, y=y, seed=1)])
    assert b[0] == 1000 and b[-1] == 100
    # a pool smaller than n_max: n_max is lowered, the ratio kept
    pool = D.per_class_subset(y, 2000, seed=0)
    c = np.bincount(y[pool][D.IMBALANCE.build("long_tail", {}, y=y[pool], seed=0)])
    assert c[0] == 2000 and c[-1] == 20


def test_step(cifar):
    y = cifar.y_train
    a = D.IMBALANCE.build("step", {"imbalance_ratio": 10}, y=y, seed=0)
    assert np.bincount(y[a]).tolist() == [5000] * 5 + [500] * 5
    b = D.IMBALANCE.build("step", {"imbalance_ratio": 50, "minority_classes": 3, "n_max": 1000}, y=y, seed=0)
    assert np.bincount(y[b]).tolist() == [1000] * 7 + [20] * 3
    assert D.step_counts(5000, 100, 5).sum() == 25250


# ------------------------------------------------------------------------------------- label budget

def test_label_budget(cifar):
    y = cifar.y_train
    idx = D.IMBALANCE.build("long_tail", {}, y=y, seed=0)
    mask = D.label_budget(y, idx, 250, seed=0)
    assert mask.shape == idx.shape and mask.dtype == bool and mask.sum() == 250
    assert np.bincount(y[idx[mask]], minlength=10).tolist() == [25] * 10
    np.testing.assert_array_equal(mask, D.label_budget(y, idx, 250, seed=0))
    with pytest.raises(ConfigError, match="multiple of 10"):
        D.label_budget(y, idx, 255, seed=0)
    with pytest.raises(ConfigError, match="multiple of 10"):
        D.label_budget(y, idx, 0, seed=0)
    with pytest.raises(ConfigError, match="fewer"):
        D.label_budget(y, idx, 1000, seed=0)  # the rarest class has only 50
    with pytest.raises(ConfigError, match="larger than"):
        D.label_budget(y, idx[:100], 200, seed=0)


# --------------------------------------------------------------------------------------- build_split

def test_build_split_end_to_end(cifar):
    y = cifar.y_train
    spec = {"subset": "full", "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 100},
            "val_size": 5000, "label_budget": 400}
    s = D.build_split(y, spec, seed=0)
    assert not np.intersect1d(s.train_idx, s.val_idx).size
    assert np.bincount(y[s.val_idx], minlength=10).tolist() == [500] * 10  # balanced validation
    train_counts = np.bincount(y[s.train_idx], minlength=10)
    assert train_counts[0] == 4500 and train_counts[-1] == 45  # n_max lowered to the pool, ratio kept
    assert s.labeled_mask.sum() == 400 and len(s.labeled_idx) + len(s.unlabeled_idx) == len(s.train_idx)
    summary = s.summary()
    assert summary["train_per_class"] == train_counts.tolist()
    assert summary["labeled_per_class"] == [40] * 10
    assert summary["n_val"] == 5000 and summary["imbalance_ratio"] == pytest.approx(100)
    assert summary["per_class"][0]["class"] == "airplane" and summary["notes"]
    json.dumps(summary)  # plain types for the UI
    again = D.build_split(y, spec, seed=0)
    np.testing.assert_array_equal(again.train_idx, s.train_idx)
    np.testing.assert_array_equal(again.labeled_mask, s.labeled_mask)
    assert not np.array_equal(D.build_split(y, spec, seed=1).train_idx, s.train_idx)


def test_build_split_subsets_and_defaults(cifar):
    y = cifar.y_train
    s = D.build_split(y, {}, seed=0)
    assert len(s.train_idx) == 50000 and len(s.val_idx) == 0 and s.labeled_mask.all()
    s = D.build_split(y, {"subset": "random", "subset_size": 3000, "val_size": 300}, seed=2)
    assert len(s.train_idx) == 2700 and len(s.val_idx) == 300
    s = D.build_split(y, {"subset": "per_class", "per_class": 200, "val_size": 100,
                          "imbalance": "step", "imbalance_params": {"imbalance_ratio": 10}}, seed=0)
    assert np.bincount(y[s.val_idx]).tolist() == [10] * 10
    assert np.bincount(y[s.train_idx]).tolist() == [190] * 5 + [19] * 5


@pytest.mark.parametrize("spec, words", [
    ({"subset": "random", "subset_size": 60000}, "subset_size"),
    ({"subset": "everything"}, "subset"),
    ({"subset": "per_class", "per_class": 100, "val_size": 1000}, "val_size"),
    ({"imbalance": "zipf"}, "not one of"),
    ({"imbalance": "long_tail", "imbalance_params": {"rho": 3}}, "unknown parameter"),
    ({"label_budget": 15}, "multiple of 10"),
    ({"seed": 3}, "unknown key"),
])
def test_build_split_errors(cifar, spec, words):
    with pytest.raises(ConfigError, match=words):
        D.build_split(cifar.y_train, spec, seed=0)


# ------------------------------------------------------------------------------------------- tensors

def test_to_device_tensors(cifar):
    x = cifar.x_train[:64]  # read-only input
    t = D.to_device_tensors(x, "cpu")
    assert t.shape == (64, 3, 32, 32) and t.dtype == torch.uint8 and t.is_contiguous()
    np.testing.assert_array_equal(t.numpy(), x.transpose(0, 3, 1, 2))
    t[0] = 0  # a copy: the shared arrays are untouched
    assert x[0].any()
    with pytest.raises(ConfigError):
        D.to_device_tensors(x.astype(np.float32), "cpu")
