"""The run-duration estimator (cifar_core.experiments.estimate): real probes of lenet on this machine,
finished runs read from a runs root, the cache file, and the CLI's `train --estimate`."""
from __future__ import annotations

import json
import time

import pytest
import torch

from cifar_core.cli import main as cli_main
from cifar_core.config import RunConfig
from cifar_core.devices import device_description
from cifar_core.experiments import estimate as est
from cifar_core.models import classifier_head
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

# 150 training images at batch 16 (10 steps an epoch), 50 validation images, a 100-image test report
SMALL = {"model": "lenet", "subset": "per_class", "per_class": 20, "val_size": 50, "test_size": 100,
         "epochs": 2, "batch_size": 16}


@pytest.fixture
def store(tmp_path, cifar_npz, monkeypatch) -> RunStore:
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    return RunStore(tmp_path / "runs")


def small(**changes) -> RunConfig:
    return RunConfig.from_dict({**SMALL, **changes})


def test_parts_add_up_and_training_grows_with_epochs(store):
    two, four = est.estimate_run(small(epochs=2), store), est.estimate_run(small(epochs=4), store)
    assert set(two.parts) == set(est.PARTS)
    assert two.seconds == pytest.approx(sum(two.parts.values()))
    assert two.low < two.seconds < two.high
    assert two.parts["start"] > 0.5  # a training process imports torch: never free
    assert four.parts["train"] == pytest.approx(2 * two.parts["train"])
    assert four.parts["evaluation"] == pytest.approx(2 * two.parts["evaluation"])
    assert four.seconds > two.seconds
    assert two.text.startswith("about ") and two.train_images == 150 and two.epochs == 2
    assert "probe" in two.basis and two.images_per_s > 0


def test_eval_every_smaller_evaluates_more(store):
    every = est.estimate_run(small(epochs=4, eval_every=1), store)
    rarely = est.estimate_run(small(epochs=4, eval_every=4), store)
    assert every.parts["evaluation"] == pytest.approx(4 * rarely.parts["evaluation"])
    assert every.seconds > rarely.seconds
    three = est.run_counts(small(epochs=5, eval_every=2))
    assert three.evals == 3  # after epochs 2 and 4, and after the last one


@pytest.fixture
def round_numbers(store):
    """This machine's measurements (taken for real first) replaced by round numbers in the runs root's
    cache: 10 ms a training step + 1 ms an image, 2 ms an evaluation batch + 0.1 ms an image, free
    augmentation; so that what the estimate adds up can be checked exactly. Afterwards this process
    remembers the real measurements again."""
    for batch in (2, 16, 64):
        est.estimate_run(small(batch_size=batch), store)
    path = store.root / est.CACHE_NAME
    measured = path.read_text()
    cache = json.loads(measured)
    for entry in cache["models"].values():  # 0.010 + 0.001 × batch: a straight line through two sizes
        entry.update(steps=[[1, 0.011], [1000, 1.010]], grad_norm_s=0.0, weights_pass_s=0.0,
                     forward_fixed_s=0.002, forward_per_image_s=0.0001)
    for entry in cache["chains"].values():
        entry.update(per_image_s=0.0)
    path.write_text(json.dumps(cache))
    est.clear_memory()
    yield store
    path.write_text(measured)
    est.clear_memory()
    est.estimate_run(small(), store)


def test_tta_views_and_test_size_count(round_numbers):
    store = round_numbers
    plain = est.estimate_run(small(), store)
    assert plain.parts["evaluation"] == pytest.approx(2 * (0.002 + 50 * 0.0001))  # 2 evaluations of 50 images
    assert plain.parts["final test"] == pytest.approx(0.002 + 100 * 0.0001)
    flip = est.estimate_run(small(tta_flip=True), store)
    assert flip.parts["evaluation"] == pytest.approx(2 * plain.parts["evaluation"])
    both = est.estimate_run(small(tta_flip=True, tta_translate=True), store)
    assert both.parts["final test"] == pytest.approx(6 * plain.parts["final test"])
    # views only for the unsure images: between one view and all six, more of them as the threshold rises
    unsure = [est.estimate_run(small(tta_flip=True, tta_translate=True, tta_confident=c), store).parts["final test"]
              for c in (0.5, 0.7, 0.9)]
    assert plain.parts["final test"] < unsure[0] < unsure[1] < unsure[2] < both.parts["final test"]
    assert unsure[1] == pytest.approx((1 + 5 * est.unsure_share(0.7)) * plain.parts["final test"])
    bigger = est.estimate_run(small(test_size=1000), store)
    assert bigger.parts["final test"] == pytest.approx(0.002 + 1000 * 0.0001)
    assert bigger.parts["evaluation"] == pytest.approx(plain.parts["evaluation"])  # validation set unchanged
    # validating on the test set: each evaluation is the test set, and the final report reuses the last
    on_test = est.estimate_run(small(val_size=0, test_size=1000), store)
    assert on_test.parts["final test"] == 0
    assert on_test.parts["evaluation"] == pytest.approx(2 * (0.002 + 1000 * 0.0001))


def test_small_batches_pay_the_per_step_cost(round_numbers):
    """The same 150 images an epoch: 75 steps at batch 2, 3 steps at batch 64 (64 + 64 + 22)."""
    store = round_numbers
    assert est.run_counts(small(batch_size=2)).steps_per_epoch == 75
    assert est.estimate_run(small(batch_size=2), store).parts["train"] == pytest.approx(2 * 75 * (0.010 + 2 * 0.001))
    assert est.estimate_run(small(batch_size=64), store).parts["train"] == pytest.approx(
        2 * (2 * (0.010 + 64 * 0.001) + (0.010 + 22 * 0.001)))


def test_step_seconds_between_and_beyond_the_measured_sizes():
    points = [[2, 0.1], [8, 0.2], [32, 0.5]]
    assert est.step_seconds(points, 8) == pytest.approx(0.2)
    assert est.step_seconds(points, 20) == pytest.approx(0.35)
    assert est.step_seconds(points, 64) == pytest.approx(0.5 + 32 * 0.3 / 24)  # the last segment's slope
    assert est.step_seconds(points, 1) == pytest.approx(0.1 - 0.1 / 6)
    assert est.step_seconds([[4, 0.2]], 16) == pytest.approx(0.8)
    assert est.needs_more_steps(points, 64) and not est.needs_more_steps(points, 32)
    assert not est.needs_more_steps([[2, 0.1], [8, 2.0]], 64)  # steps had become long: extrapolate


def test_a_larger_batch_adds_its_sizes_to_the_probe(store, monkeypatch):
    def sizes() -> list[int]:
        cache = json.loads((store.root / est.CACHE_NAME).read_text())
        return sorted({size for entry in cache["models"].values() for size, _ in entry["steps"]})

    own = {"model_params": {"dropout": 0.1}}  # a lenet no other test has measured in this process
    est.estimate_run(small(batch_size=16, **own), store)
    assert max(sizes()) <= 16  # never beyond the run's batch size
    est.estimate_run(small(batch_size=100, **own), store)
    assert max(sizes()) >= 64  # 16 × 4, then the run's own 100 when the budget allows
    monkeypatch.setattr(est, "probe_more_steps", lambda *a: pytest.fail("probed again"))
    assert est.estimate_run(small(batch_size=32, **own), store).basis.endswith("(cached)")


def test_a_distillation_teacher_costs_its_forward_every_step(store):
    teacher = store.create(RunConfig(model="alexnet").validated(), run_id="teacher-1", state="completed")
    plain = est.estimate_run(small(), store)
    taught = est.estimate_run(small(distill="hard", teacher_run=teacher.run_id), store)
    assert taught.parts["train"] > plain.parts["train"]
    assert taught.parts["evaluation"] == pytest.approx(plain.parts["evaluation"])  # the student evaluates alone
    store.create(RunConfig(model="alexnet").validated(), run_id="teacher-2", state="completed")
    ensemble = est.estimate_run(small(distill="hard", teacher_run="teacher-1,teacher-2"), store)
    assert ensemble.parts["train"] - plain.parts["train"] == pytest.approx(
        2 * (taught.parts["train"] - plain.parts["train"]), rel=1e-6)  # each member's forward, probed once


def test_time_limit_caps_the_loop(store):
    long = est.estimate_run(small(epochs=2000), store)
    capped = est.estimate_run(small(epochs=2000, time_limit_min=0.05), store)
    assert long.parts["train"] > 3
    assert capped.parts["train"] + capped.parts["evaluation"] + capped.parts["checkpoints"] < 3 + 1


def _finished_run(store: RunStore, cfg: RunConfig, images_per_s: float, eval_seconds: float,
                  state: str = "completed") -> None:
    """A run record as the trainer leaves it: status, train rows (2 an epoch) and eval rows."""
    record = store.create(cfg, state=state)
    counts = est.run_counts(cfg)
    started = time.time() - 100
    t0 = started + 1.5  # data, model and the first step took 1.5 s
    rows, now, step = [], t0, 0
    for epoch in range(cfg.epochs):
        for half in (1, 2):
            images = counts.train // 2
            if epoch and half == 1:  # the window after an epoch end also holds its checkpoints
                now += 2.0 + images / images_per_s
                rows.append({"kind": "train", "step": step + 5, "images_per_s": images / (images / images_per_s + 2.0),
                             "elapsed": now - t0, "time": now})
            else:
                rows.append({"kind": "train", "step": step + 5 * half, "images_per_s": images_per_s,
                             "elapsed": now - t0 + images / images_per_s, "time": now + images / images_per_s})
            now = rows[-1]["time"]
        step += 10
        now += eval_seconds
        rows.append({"kind": "eval", "step": step, "val_acc": 0.1, "elapsed": now - t0, "time": now})
    with open(record.metrics_path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    record.checkpoint_path("last").write_bytes(b"x" * 1000)
    record.update_status(state=state, started=started, finished=now + 1, steps_per_epoch=counts.steps_per_epoch,
                         device=device_description(torch.device("cpu")), precision="fp32")


def test_finished_runs_of_the_same_setting_are_used(store):
    cfg = small(epochs=3)
    _finished_run(store, cfg, images_per_s=300.0, eval_seconds=0.5)
    _finished_run(store, small(model="alexnet"), images_per_s=5.0, eval_seconds=9.0)  # another model
    _finished_run(store, cfg, images_per_s=1.0, eval_seconds=50.0, state="failed")   # not finished well
    estimate = est.estimate_run(cfg, store)
    assert estimate.basis == "from 1 finished run of this setting"
    assert estimate.images_per_s == pytest.approx(300.0)  # the windows across an epoch end are left out
    assert estimate.parts["train"] == pytest.approx(3 * 150 / 300.0)
    assert estimate.parts["evaluation"] == pytest.approx(3 * 0.5)  # 50 validation images in 0.5 s each time
    assert estimate.parts["final test"] == pytest.approx(100 * 0.5 / 50)
    assert estimate.parts["prepare"] == pytest.approx(1.5)
    assert est.estimate_run(small(epochs=3, batch_size=32), store).basis.startswith("from a ")  # other batch


def test_the_probe_is_cached_in_the_runs_root(store, monkeypatch):
    first = est.estimate_run(small(), store)
    cache = json.loads((store.root / est.CACHE_NAME).read_text())
    assert cache["machine"] and cache["models"] and cache["chains"]
    est.clear_memory()

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(est, "probe_model", no_probe)
    monkeypatch.setattr(est, "measure_machine", no_probe)
    monkeypatch.setattr(est, "probe_chain", no_probe)
    again = est.estimate_run(small(), store)
    assert again.basis.endswith("(cached)")
    assert again.seconds == pytest.approx(first.seconds)
    with pytest.raises(AssertionError, match="measured again"):  # another model does need its probe
        est.estimate_run(small(model="alexnet"), store)


def test_bad_input_is_a_config_error(store):
    with pytest.raises(ConfigError, match="needs a RunConfig"):
        est.estimate_run({"model": "lenet"}, store)
    with pytest.raises(ConfigError, match="epochs"):
        est.estimate_run(RunConfig(model="lenet", epochs=0), store)
    with pytest.raises(ConfigError):
        est.estimate_run(RunConfig(model="no-such-model"), store)
    with pytest.raises(ConfigError, match="teacher run"):
        est.estimate_run(small(distill="hard", teacher_run="not-there"), store)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            est.estimate_run(small(device="cuda"), store)
    with pytest.raises(ConfigError, match="no runs"):
        est.estimate_runs([], store)


def test_study_estimate_is_the_sum_of_its_runs(store):
    one, two = small(epochs=1), small(epochs=3)
    both = est.estimate_runs([one, two], store)
    assert both.runs == 2
    assert both.seconds == pytest.approx(est.estimate_run(one, store).seconds + est.estimate_run(two, store).seconds)
    assert both.parts["start"] == pytest.approx(2 * est.estimate_run(one, store).parts["start"])


def test_human_durations():
    assert [est.human_duration(s) for s in (0.2, 45, 59.6, 140, 599, 2040, 8100, 7200)] == [
        "1 s", "45 s", "1 min", "2 min 20 s", "10 min", "34 min", "2 h 15 min", "2 h"]


def test_cli_train_estimate_prints_and_does_not_train(store, capsys):
    code = cli_main(["--runs-root", str(store.root), "train", "--model", "lenet", "--subset", "per_class",
                     "--per-class", "20", "--val-size", "50", "--epochs", "2", "--estimate"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("estimated duration: about ") and "probe" in out and "train " in out
    assert store.ids() == []  # no run record
    assert cli_main(["--runs-root", str(store.root), "train", "--model", "lenet", "--epochs", "0",
                     "--estimate"]) == 2


# ---- resampling before training (SMOTE, cluster-based oversampling) ---------------------------------

def test_smote_costs_a_resampling_part_that_grows_with_the_new_images(store):
    plain = est.estimate_run(small(), store)
    assert plain.parts["resampling"] == 0 and "resampling" not in plain.parts_text()
    # CIFAR-10-LT profiles of a 100-image-a-class pool: the larger the ratio, the more images SMOTE makes
    lt = {"subset": "per_class", "per_class": 100, "imbalance": "long_tail", "balance": "smote"}
    mild, steep = (small(**lt, imbalance_params={"imbalance_ratio": rho}) for rho in (2.0, 50.0))
    mild_counts, steep_counts = est.run_counts(mild), est.run_counts(steep)
    assert steep_counts.train - steep_counts.pool > mild_counts.train - mild_counts.pool > 0
    for cfg in (mild, steep):
        counts = est.run_counts(cfg)
        assert est.resampling_seconds(cfg, counts) == pytest.approx(
            est.RESAMPLE_IMPORT_S + est.SMOTE_PAIR_S * sum(n * n for n in counts.classes if n < max(counts.classes))
            + est.SMOTE_IMAGE_S * counts.train + est.SMOTE_NEW_S * (counts.train - counts.pool))
    first, second = est.estimate_run(mild, store), est.estimate_run(steep, store)
    assert 0 < first.parts["resampling"] < second.parts["resampling"]
    assert second.seconds == pytest.approx(sum(second.parts.values()))
    assert "resampling (SMOTE on pixels) " in second.parts_text()
    assert "resampling (SMOTE on pixels) " in second.report()
    # the report's imbalanced set (~7,100 images, ~2,500 new ones): about 2 s on the 2-core dev box
    report = RunConfig.from_dict({**SMALL, "subset": "full", "imbalance": "report_random", "balance": "smote"})
    assert 0.5 < est.resampling_seconds(report, est.run_counts(report)) < 5
    assert est.resampling_seconds(small(balance="random_oversample"), est.run_counts(small())) == 0
    balanced = small(balance="smote")  # nothing to make: imbalanced-learn's import only
    assert est.resampling_seconds(balanced, est.run_counts(balanced)) == est.RESAMPLE_IMPORT_S


def test_smote_in_a_finished_runs_feature_space_adds_that_models_forward(store):
    feature_run = store.create(RunConfig(model="lenet").validated(), run_id="features-1", state="completed")
    lt = {"subset": "per_class", "per_class": 100, "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 10.0}}
    pixels = est.estimate_run(small(**lt, balance="smote"), store)
    features = est.estimate_run(small(**lt, balance="smote",
                                      balance_params={"space": "features", "feature_run": feature_run.run_id}), store)
    assert features.parts["resampling"] > pixels.parts["resampling"]  # the forward pass, and the features' columns
    assert "resampling (SMOTE on a finished run's features) " in features.parts_text()
    cache = json.loads((store.root / est.CACHE_NAME).read_text())
    (timing,) = cache["features"].values()
    assert timing["dims"] == 84 and timing["per_image_s"] > 0  # lenet's penultimate layer
    counts = est.run_counts(small(**lt, balance="smote"))
    assert counts.pool == sum(counts.classes) < counts.train == 10 * max(counts.classes)
    with pytest.raises(ConfigError, match="smote.feature_run 'not-there'"):
        est.estimate_run(small(**lt, balance="smote", balance_params={"space": "features", "feature_run": "not-there"}),
                         store)


def test_cluster_oversampling_costs_its_k_means(store):
    lt = {"subset": "per_class", "per_class": 100, "imbalance": "long_tail", "imbalance_params": {"imbalance_ratio": 10.0}}
    few, many = (small(**lt, balance="cluster_oversample", balance_params={"clusters": k}) for k in (2, 16))
    assert 0 < est.resampling_seconds(few, est.run_counts(few)) < est.resampling_seconds(many, est.run_counts(many))
    estimate = est.estimate_run(many, store)
    assert estimate.parts["resampling"] == pytest.approx(est.resampling_seconds(many, est.run_counts(many)))
    assert "resampling (k-means on pixels) " in estimate.parts_text()
    both = est.combine([estimate, est.estimate_run(small(), store)])  # one run resamples: its label stays
    assert "resampling (k-means on pixels) " in both.parts_text()
    mixed = est.combine([estimate, est.estimate_run(small(**lt, balance="smote"), store)])
    assert "resampling " in mixed.parts_text() and "(k-means" not in mixed.parts_text()


def test_the_time_to_the_first_step_of_a_run_that_resampled_is_not_taken(store):
    _finished_run(store, small(epochs=3, balance="smote"), images_per_s=300.0, eval_seconds=0.5)
    estimate = est.estimate_run(small(epochs=3), store)
    assert estimate.basis == "from 1 finished run of this setting"
    assert estimate.parts["prepare"] != pytest.approx(1.5)  # its 1.5 s held its resampling
    _finished_run(store, small(epochs=3), images_per_s=300.0, eval_seconds=0.5)
    assert est.estimate_run(small(epochs=3), store).parts["prepare"] == pytest.approx(1.5)


# ---- frozen backbones (init_mode linear_probe, crt) ---------------------------------------------------

def test_a_frozen_backbone_is_probed_as_the_run_freezes_it(store, monkeypatch):
    crt = small(init_run="source-1", init_mode="crt")
    assert est.trains_head_only(crt) and est.trains_head_only(small(init_run="source-1", init_mode="linear_probe"))
    assert not est.trains_head_only(small(init_run="source-1")) and not est.trains_head_only(small())
    step = est.TrainingStep(crt, torch.device("cpu"), 16)
    head = {id(p) for p in classifier_head(step.model).parameters()}
    assert {id(p) for p in step.model.parameters() if p.requires_grad} == head
    assert {id(p) for group in step.optimizer.param_groups for p in group["params"]} == head
    step(16)
    assert all(p.grad is None for p in step.model.parameters() if id(p) not in head)  # no backward through it
    assert not step.model.features.training  # its BatchNorms (lenet has none) would keep their statistics
    est.estimate_run(small(init_run="source-1"), store)  # finetune: every weight trains, as from scratch
    probed = []

    def no_probe(cfg, device):
        probed.append(cfg)
        raise AssertionError("probed again")

    monkeypatch.setattr(est, "probe_model", no_probe)
    est.estimate_run(small(), store)  # the finetune run's probe
    with pytest.raises(AssertionError, match="probed again"):  # a frozen backbone has a probe of its own
        est.estimate_run(crt, store)
    assert est.trains_head_only(probed[0])


def test_the_probes_frozen_step_is_cheaper_than_a_full_one():
    """Timed for real, the two alternated so that both see the same load (separate probes of a model as
    small as lenet can differ many times over on a busy machine): a step through a frozen backbone is
    its forward and the head's backward and update."""
    device = torch.device("cpu")
    full = est.TrainingStep(small(batch_size=128, init_run="source-1"), device, 128)
    frozen = est.TrainingStep(small(batch_size=128, init_run="source-1", init_mode="linear_probe"), device, 128)
    times = {full: [], frozen: []}
    for step in (full, frozen, full, frozen):  # warm-up: allocations, the optimizer's state
        step(128)
    for _ in range(9):
        for step in (full, frozen):
            started = time.perf_counter()
            step(128)
            times[step].append(time.perf_counter() - started)
    assert sorted(times[frozen])[4] < sorted(times[full])[4]


def test_a_head_only_run_scales_full_training_runs_of_its_setting(store):
    full = RunConfig.from_dict({**SMALL, "model": "fastnet", "epochs": 3})
    _finished_run(store, full, images_per_s=300.0, eval_seconds=0.5)
    crt = full.replace(init_run="source-1", init_mode="crt")
    estimate = est.estimate_run(crt, store)
    share = est.FROZEN_STEP_SHARE["fastnet"]
    assert 0 < share < 1
    assert estimate.parts["train"] == pytest.approx(share * est.estimate_run(full, store).parts["train"])
    assert estimate.parts["evaluation"] == pytest.approx(3 * 0.5)
    assert "full training" in estimate.basis
    # a finished head-only run of the setting is taken as it is
    _finished_run(store, crt, images_per_s=1000.0, eval_seconds=0.5)
    again = est.estimate_run(crt, store)
    assert again.basis == "from 1 finished run of this setting"
    assert again.parts["train"] == pytest.approx(3 * 150 / 1000.0)
    assert est.estimate_run(full, store).parts["train"] == pytest.approx(3 * 150 / 300.0)  # not the frozen one
