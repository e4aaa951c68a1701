"""Knowledge distillation (cifar_core/engine/distill.py and the engine): config checks, teacher checks that
fail before training, the losses, and short real runs with a fixed teacher (CPU, tiny models)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from cifar_core.config import RunConfig
from cifar_core.engine.checkpoints import CheckpointError
from cifar_core.engine.distill import (EnsembleTeacher, distillation_loss, load_teacher, load_teachers,
                                       teacher_candidates, teacher_input_kind)
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore
from cifar_core.engine import train_run

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "heads": 2, "drop_path": 0.0, "pool": "gap"}


def student(teacher_run: str, **changes) -> RunConfig:
    base = dict(model="vit", model_params=TINY_VIT, subset="per_class", per_class=30, val_size=0,
                test_size=200, epochs=4, batch_size=50, optimizer="adamw", lr=3e-3, weight_decay=0.0,
                schedule="none", log_every=1, augment=[], distill="soft", teacher_run=teacher_run,
                distill_alpha=1.0, distill_temperature=2.0)
    base.update(changes)
    return RunConfig(**base).validated()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_npz):
    """A runs root holding one completed teacher run (LeNet with an EMA of its weights)."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    cfg = RunConfig(model="lenet", subset="per_class", per_class=100, val_size=0, test_size=200, epochs=4,
                    batch_size=50, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="none", ema_decay=0.9,
                    log_every=5, augment=[{"name": "hflip"}]).validated()
    record = train_run(cfg, store, run_id="teacher", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    assert record.results()["test_acc"] > 0.2  # a teacher with an opinion (chance is 0.1)
    return store


# ---- config ------------------------------------------------------------------------------------

def test_config_fields_are_declared_and_validated():
    params = RunConfig.scalar_params()
    assert params["distill"].choices == ("none", "hard", "soft")
    assert {"teacher_run", "distill_alpha", "distill_temperature"} <= set(params)
    assert set(RunConfig.sections()["distill"]) == {"distill", "teacher_run", "distill_alpha",
                                                     "distill_temperature"}
    assert RunConfig().validated().distill == "none"
    assert "distill-hard" in RunConfig(distill="hard", teacher_run="t1").validated().key_tricks()


@pytest.mark.parametrize("changes,fragment", [
    ({"distill": "hard"}, "distill=hard needs a teacher_run"),
    ({"distill": "soft", "teacher_run": ""}, "needs a teacher_run"),
    ({"distill": "hard", "teacher_run": "../runs/x"}, "teacher_run: invalid run id"),
    ({"teacher_run": "a/b"}, "invalid run id"),
    ({"distill": "soft", "teacher_run": "t1,../x"}, "teacher_run: invalid run id"),
    ({"distill": "soft", "teacher_run": "t1,,t2"}, "teacher_run: invalid run id"),
    ({"distill": "soft", "teacher_run": "t1, t2,t1"}, "names t1 more than once"),
    ({"distill": "soft", "teacher_run": ",".join(f"t{i}" for i in range(9))}, "at most 8"),
    ({"distill": "medium", "teacher_run": "t"}, "distill: 'medium' is not one of"),
    ({"distill_alpha": 1.5}, "distill_alpha"),
    ({"distill_temperature": 0}, "distill_temperature"),
])
def test_bad_distillation_configs_rejected(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig(**changes).validated()


# ---- losses ------------------------------------------------------------------------------------

def test_hard_loss_is_cross_entropy_to_teacher_argmax():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    torch.testing.assert_close(distillation_loss("hard", s, t, 3.0), F.cross_entropy(s, t.argmax(1)))


def test_soft_loss_is_scaled_kl_and_zero_at_agreement():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    temperature = 4.0
    p_t = F.softmax(t / temperature, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / temperature, 1))).sum(1).mean() * temperature ** 2
    torch.testing.assert_close(distillation_loss("soft", s, t, temperature), expected)
    assert distillation_loss("soft", t, t, temperature).abs() < 1e-6
    with pytest.raises(ConfigError):
        distillation_loss("none", s, t, 1.0)


def test_teacher_input_must_be_normalized_the_same_way():
    assert teacher_input_kind("t", [], []) == "same"
    assert teacher_input_kind("t", ["per_image_standardization"], ["per_image_standardization"]) == "same"
    assert teacher_input_kind("t", ["per_image_standardization"], []) == "own"
    assert teacher_input_kind("t", ["zca"], []) == "own"  # its own fitted whitening, from its checkpoint
    with pytest.raises(ConfigError, match="both whiten with zca, each fitted on its own training images"):
        teacher_input_kind("t", ["zca"], ["zca"])
    with pytest.raises(ConfigError, match="normalizes its inputs differently"):
        teacher_input_kind("t", [], ["per_image_standardization"])
    with pytest.raises(ConfigError, match="normalizes its inputs differently"):
        teacher_input_kind("t", ["zca"], ["per_image_standardization"])


# ---- the teacher -------------------------------------------------------------------------------

def test_teacher_loads_frozen_with_its_evaluated_weights(runs):
    teacher = load_teacher(runs, "teacher", [])
    # the reader's rule for a finished run: last.pt, the weights its test report measured
    assert teacher.info["checkpoint"] == "last.pt" and teacher.info["weights"] == "ema"
    assert teacher.info["fallback"] is None and teacher.info["input"] == "the student's input"
    assert teacher.info["step"] == runs.record("teacher").status()["step"]
    assert teacher.info["model"] == "lenet" and teacher.info["params"] == 62_006
    assert teacher.info["test_acc"] == runs.record("teacher").status()["test_acc"]
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    x = torch.rand(4, 3, 32, 32)
    logits = teacher.logits(x, x)
    assert logits.shape == (4, 10) and not logits.requires_grad
    assert [c["run_id"] for c in teacher_candidates(runs)] == ["teacher"]


def two_teachers(runs: RunStore, root) -> RunStore:
    """A runs root holding two copies of the completed teacher run: "teacher" and "teacher-b"."""
    store = RunStore(root)
    for run_id in ("teacher", "teacher-b"):
        shutil.copytree(runs.record("teacher").path, store.record(run_id).path)
    return store


def test_several_runs_teach_as_the_mean_of_their_logits(runs, tmp_path):
    store = two_teachers(runs, tmp_path)
    ensemble = load_teachers(store, "teacher, teacher-b", [])
    assert isinstance(ensemble, EnsembleTeacher) and len(ensemble.members) == 2
    with torch.no_grad():  # make the second member differ from the first
        for p in ensemble.members[1].model.parameters():
            p.mul_(0.5)
    x = torch.rand(4, 3, 32, 32)
    first, second = (member.logits(x, x) for member in ensemble.members)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(ensemble.logits(x, x), (first + second) / 2)
    assert ensemble.info["run_id"] == "teacher,teacher-b" and ensemble.info["ensemble"] == 2
    assert [m["run_id"] for m in ensemble.info["runs"]] == ["teacher", "teacher-b"]
    assert ensemble.info["params"] == 2 * 62_006
    assert not isinstance(load_teachers(store, "teacher", []), EnsembleTeacher)  # one id: a plain teacher
    with pytest.raises(ConfigError, match="teacher_run nope: no such run"):
        load_teachers(store, "teacher,nope", [])  # every member checked before any is read


def test_a_student_trains_from_an_ensemble_teacher_and_records_it(runs, cifar_npz, tmp_path):
    store = two_teachers(runs, tmp_path)
    record = train_run(student("teacher,teacher-b", epochs=2), store, run_id="student",
                       data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    teacher = record.results()["teacher"]
    assert teacher["ensemble"] == 2 and [m["run_id"] for m in teacher["runs"]] == ["teacher", "teacher-b"]
    assert record.status()["teacher"]["run_id"] == "teacher,teacher-b"
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert rows and all(r["distill_loss"] >= 0 for r in rows)


@pytest.mark.parametrize("setup,fragment", [
    ("missing", "no such run"),
    ("running", "is running, not completed"),
    ("no_checkpoint", "has no checkpoint"),
    ("self", "cannot be its own teacher"),
    ("damaged", "last.pt is unreadable"),
])
def test_unusable_teacher_fails_before_training(tmp_path, cifar_npz, setup, fragment):
    store = RunStore(tmp_path)
    cfg = RunConfig(model="lenet").validated()
    if setup == "running":
        store.create(cfg, run_id="t1", state="running")
    elif setup in ("no_checkpoint", "damaged"):
        record = store.create(cfg, run_id="t1", state="completed")
        if setup == "damaged":
            record.checkpoint_path("last").write_bytes(b"not a checkpoint")
    run_id = "t1" if setup == "self" else "student"
    record = train_run(student("t1"), store, run_id=run_id, data_source=str(cifar_npz))
    status = record.status()
    assert status["state"] == "failed" and fragment in status["error"], status
    assert record.read_metrics() == []  # nothing trained
    assert not record.checkpoint_path("last").exists()
    if setup in ("missing", "running", "no_checkpoint"):
        assert "t1" not in [c["run_id"] for c in teacher_candidates(store)]


def _copied_store(store: RunStore, run_id: str, root) -> RunStore:
    shutil.copytree(store.record(run_id).path, root / run_id)
    return RunStore(root)


def test_teacher_falls_back_to_best_when_last_is_damaged(runs, tmp_path):
    store = _copied_store(runs, "teacher", tmp_path)
    record = store.record("teacher")
    record.checkpoint_path("last").write_bytes(b"truncated")
    teacher = load_teacher(store, "teacher", [])
    best = torch.load(record.checkpoint_path("best"), weights_only=True)
    assert teacher.info["checkpoint"] == "best.pt" and "last.pt is unreadable" in teacher.info["fallback"]
    assert teacher.info["step"] == best["step"]
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, best["ema"]["module." + name])
    record.checkpoint_path("best").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"(?s)teacher_run teacher cannot teach: .*last\.pt is unreadable"
                                              r".*best\.pt is unreadable"):
        load_teacher(store, "teacher", [])


def _as_zca_teacher(store: RunStore, run_id: str) -> dict:
    """Make the copied run a ZCA-trained one: zca in its chain, and a whitening (mean, matrix) in its
    checkpoints as the loop saves a fit. The matrix is a made-up symmetric one because a real fit (an
    eigendecomposition of a 3072×3072 covariance) takes tens of seconds on two CPU cores; the real fit's
    round trip through a checkpoint is tested by tests/test_export.py (the exported file reproduces a
    ZCA run's accuracy)."""
    from cifar_core.runs import atomic_write_json
    record = store.record(run_id)
    config = record.config_dict()
    config["augment"] = config["augment"] + [{"name": "zca", "params": {"fit_images": 100}}]
    atomic_write_json(record.config_path, config)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3072, 3072, generator=gen) / 3072 ** 0.5
    state = {"mean": torch.rand(1, 3072, generator=gen), "matrix": (a + a.T) / 2, "fit_count": 100,
             "shape": [3, 32, 32]}
    for which in ("last", "best"):
        ckpt = torch.load(record.checkpoint_path(which), weights_only=True)
        ckpt["normalizers"] = [{"name": "zca", "params": {"epsilon": 1e-2, "fit_images": 100}, "state": state}]
        torch.save(ckpt, record.checkpoint_path(which))
    return state


def test_zca_teacher_whitens_the_augmented_batch_with_its_own_fit(runs, tmp_path, cifar_npz):
    store = _copied_store(runs, "teacher", tmp_path)
    fit = _as_zca_teacher(store, "teacher")
    teacher = load_teacher(store, "teacher", [])
    assert teacher.input_kind == "own" and teacher.info["input"] == "augmented batch+zca"
    x = torch.rand(6, 3, 32, 32)
    unused = torch.full_like(x, float("nan"))  # the student's mean/std input is not the teacher's
    whitened = ((x.reshape(6, -1) - fit["mean"]) @ fit["matrix"]).view_as(x)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x, unused), teacher.model(whitened), atol=1e-5, rtol=1e-5)
    record = train_run(student("teacher", epochs=1), store, run_id="zca-student", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert rows and all(r["distill_loss"] > 0 for r in rows)
    assert record.results()["teacher"]["input"] == "augmented batch+zca"
    with pytest.raises(ConfigError, match="both whiten with zca"):
        load_teacher(store, "teacher", [{"name": "zca"}])
    last = store.record("teacher").checkpoint_path("last")
    old = torch.load(last, weights_only=True)
    del old["normalizers"]  # as written before checkpoints kept the fitted ZCA
    torch.save(old, last)
    with pytest.raises(CheckpointError, match="written before checkpoints kept the fitted ZCA"):
        load_teacher(store, "teacher", [])


# ---- real runs ---------------------------------------------------------------------------------

def test_distillation_loss_decreases_with_a_fixed_teacher(runs, cifar_npz):
    before = torch.load(runs.record("teacher").checkpoint_path("last"), weights_only=True)["model"]
    record = train_run(student("teacher"), runs, run_id="student-soft", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert len(rows) == 24 and all("distill_loss" in r for r in rows)
    first = sum(r["distill_loss"] for r in rows[:4]) / 4
    last = sum(r["distill_loss"] for r in rows[-4:]) / 4
    assert first > 0.02 and last < 0.7 * first, (first, last)
    # alpha = 1: the training loss is the distillation loss alone
    assert all(r["train_loss"] == pytest.approx(r["distill_loss"], rel=1e-5) for r in rows)
    # the teacher is recorded, and it did not change
    assert record.status()["teacher"]["run_id"] == "teacher"
    taught = record.results()["teacher"]
    assert taught["distill"] == "soft" and taught["temperature"] == 2.0 and taught["weights"] == "ema"
    after = torch.load(runs.record("teacher").checkpoint_path("last"), weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hard_distillation_with_augmentation_and_label_smoothing(runs, cifar_npz):
    cfg = student("teacher", distill="hard", distill_alpha=0.5, label_smoothing=0.1, epochs=3,
                  augment=[{"name": "random_crop"}, {"name": "hflip"}])
    record = train_run(cfg, runs, run_id="student-hard", data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert rows[-1]["distill_loss"] < rows[0]["distill_loss"]
    assert record.results()["teacher"]["distill"] == "hard"
