"""Semi-supervised objectives (engine/semisup.py): registration, config rules, the helpers on hand-made
tensors, single steps on real unlabeled images, short runs with EMA and an exact FlexMatch resume."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_core.cli import main as cli_main
from cifar_core.config import OBJECTIVE_NAMES, SEMI_SUPERVISED_OBJECTIVES, RunConfig
from cifar_core.data import CLASSES, build_split, load_cifar10
from cifar_core.engine import (OBJECTIVES, LabeledBatch, StepContext, build_model, draw_unlabeled, model_input,
                               prepare, train_run)
from cifar_core.engine.semisup import flexmatch_thresholds, mixmatch_mix, pseudo_accuracy, sharpen
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

BATCH = 20


def tiny(**changes) -> RunConfig:
    base = dict(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=20, label_budget=40,
                val_size=0, test_size=100, epochs=2, batch_size=BATCH, lr=0.1, log_every=1, ema_decay=0.999,
                objective="fixmatch", ssl_unlabeled_ratio=2, augment=[{"name": "random_crop"}, {"name": "hflip"}])
    base.update(changes)
    return RunConfig(**base).validated()


@pytest.fixture(scope="module")
def prep(cifar_npz):
    return prepare(tiny(), str(cifar_npz))


def labeled_batch(prep) -> LabeledBatch:
    x, y = prep.train_x[:BATCH], prep.train_y[:BATCH]
    x_float = x.float() / 255
    return LabeledBatch(x, x_float, model_input(prep, x_float), y, F.one_hot(y, 10).float())


def one_step(prep, model, **changes):
    """(objective, StepResult) of one step of tiny(**changes)'s objective, drawing from seed 0."""
    cfg = tiny(**changes)
    objective = OBJECTIVES.build(cfg.objective, {}, cfg=cfg)
    objective.attach(prep)
    ctx = StepContext(prep, 0, torch.Generator().manual_seed(0), total_steps=10)
    return objective, objective.loss(model, labeled_batch(prep), ctx)


class Constant(nn.Module):
    """Predicts class `label` for every image, with probability ≈ 0.94."""

    def __init__(self, label: int):
        super().__init__()
        self.logits = nn.Parameter(5.0 * F.one_hot(torch.tensor(label), 10).float())

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.mean((1, 2, 3))[:, None]


def test_every_objective_name_but_rotation_is_registered():
    assert set(OBJECTIVES.names()) >= set(SEMI_SUPERVISED_OBJECTIVES)
    assert all(name in OBJECTIVES.names() for name in OBJECTIVE_NAMES if name != "rotation")


def test_describe_lists_the_objectives(capsys):
    assert cli_main(["describe"]) == 0
    described = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)["objectives"]}
    assert set(SEMI_SUPERVISED_OBJECTIVES) <= set(described)
    assert "RandAugment" in described["fixmatch"]["description"]


def test_semi_supervised_objectives_need_unlabeled_images():
    for name in SEMI_SUPERVISED_OBJECTIVES:
        with pytest.raises(ConfigError, match=f"objective {name}.*--label-budget.*250 or 4000"):
            RunConfig(objective=name).validated()
    with pytest.raises(ConfigError, match="labels all 200 training images: set --label-budget below 200"):
        tiny(label_budget=200)
    assert any("--label-budget" in p for p in RunConfig.problems({"objective": "fixmatch"}))
    assert tiny(objective="supervised", label_budget=0).label_budget == 0  # supervised needs none
    assert tiny(label_budget=190).label_budget == 190
    with pytest.raises(ConfigError, match="fixmatch trains in one process for now: set nproc to 1"):
        RunConfig(objective="fixmatch", label_budget=250, nproc=2).validated()


def test_the_form_shows_each_objectives_options_only():
    applies = RunConfig.applies
    assert applies("ssl_threshold", {"objective": "fixmatch"})
    assert not applies("ssl_threshold", {"objective": "mixmatch"})
    assert applies("mixmatch_k", {"objective": "mixmatch"}) and not applies("mixmatch_k", {"objective": "fixmatch"})
    assert applies("ssl_rampup", {"objective": "mixmatch"}) and not applies("ssl_rampup", {"objective": "supervised"})
    assert {"ssl_threshold", "ssl_unlabeled_ratio", "ssl_weight", "ssl_rampup", "mixmatch_k", "mixmatch_temperature",
            "mixmatch_alpha", "mixmatch_weight"} <= set(RunConfig.sections()["semi"])
    flags = tiny(ssl_threshold=0.8).to_flags()
    assert flags[flags.index("--ssl-threshold") + 1] == "0.8"


def test_pseudo_accuracy_counts_the_masked_images_against_their_true_labels():
    true = torch.tensor([0, 1, 2, 3])
    assert pseudo_accuracy(true.clone(), torch.ones(4, dtype=torch.bool), true) == 1.0  # a perfect model
    wrong_where_unmasked = torch.tensor([0, 1, 9, 9])
    assert pseudo_accuracy(wrong_where_unmasked, torch.tensor([True, True, False, False]), true) == 1.0
    assert pseudo_accuracy(wrong_where_unmasked, torch.tensor([True, False, True, False]), true) == 0.5
    assert pseudo_accuracy(true, torch.zeros(4, dtype=torch.bool), true) is None


def test_flexmatch_thresholds_follow_the_normalized_learning_effect():
    # 8 pool images: 4 never confidently predicted, 3 as class 0, 1 as class 1, none as class 2
    predictions = torch.tensor([-1, -1, -1, -1, 0, 0, 0, 1])
    beta = torch.tensor([3 / 4, 1 / 4, 0.0])  # warm-up: the 4 unused images outnumber class 0's 3
    torch.testing.assert_close(flexmatch_thresholds(predictions, 3, 0.95), 0.95 * beta / (2 - beta))
    used = torch.tensor([0, 0, 0, 1, 1, 2])  # every image used: β = σ / max σ
    expected = torch.tensor([0.9, 0.9 * (2 / 3) / (4 / 3), 0.9 * (1 / 3) / (5 / 3)])
    torch.testing.assert_close(flexmatch_thresholds(used, 3, 0.9), expected)
    assert flexmatch_thresholds(torch.full((5,), -1), 3, 0.95).eq(0).all()  # nothing learned yet: threshold 0


def test_sharpen_and_mixmatch_mix_on_hand_made_tensors():
    torch.testing.assert_close(sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.36, 0.16]]) / 0.52)
    probs = torch.tensor([[0.2, 0.3, 0.5]])
    torch.testing.assert_close(sharpen(probs, 1.0), probs)
    assert sharpen(probs, 0.01).argmax() == 2 and sharpen(probs, 0.01).max() > 0.99
    x, targets = torch.tensor([[1.0], [0.0]]), torch.eye(2)
    for lam in (0.3, 0.7):  # λ' = max(λ, 1 − λ) = 0.7 either way
        mixed_x, mixed_t = mixmatch_mix(x, targets, lam, torch.tensor([1, 0]))
        torch.testing.assert_close(mixed_x, torch.tensor([[0.7], [0.3]]))
        torch.testing.assert_close(mixed_t, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))


def test_prepared_keeps_the_true_labels_of_the_unlabeled_pool(prep, cifar_npz):
    y_train = load_cifar10(str(cifar_npz)).y_train
    split = build_split(y_train, {"subset": "per_class", "per_class": 20, "label_budget": 40}, 0)
    assert prep.unlabeled_y.dtype == torch.int64 and prep.unlabeled_y.shape == (160,)
    assert np.array_equal(prep.unlabeled_y.numpy(), y_train[split.unlabeled_idx])


def test_pseudo_labels_are_scored_against_the_true_labels(prep):
    objective, result = one_step(prep, Constant(3), objective="pseudo_label", ssl_threshold=0.5)
    positions, _ = draw_unlabeled(prep, 2 * BATCH, torch.Generator().manual_seed(0))
    expected = (prep.unlabeled_y[positions] == 3).float().mean()
    metrics = result.metric_values()
    assert metrics["mask_rate"] == 1.0 and metrics["pseudo_acc"] == pytest.approx(float(expected))
    assert 0 < metrics["pseudo_acc"] < 1
    totals = objective.results()["pseudo_labels"]
    assert totals["per_class_counts"] == {name: (2 * BATCH if name == "cat" else 0) for name in CLASSES}
    assert totals["pseudo_acc"] == pytest.approx(float(expected)) and totals["images"] == 2 * BATCH


def test_the_threshold_decides_which_images_are_trained_on(prep):
    torch.manual_seed(0)
    model = build_model(tiny(), prep)
    _, none = one_step(prep, model, ssl_threshold=1.0)
    assert none.metric_values()["mask_rate"] == 0.0 and "pseudo_acc" not in none.metrics
    assert none.metric_values()["unlabeled_loss"] == 0.0
    _, every = one_step(prep, model, ssl_threshold=0.0)
    assert every.metric_values()["mask_rate"] == 1.0 and 0.0 <= every.metric_values()["pseudo_acc"] <= 1.0
    assert every.metric_values()["unlabeled_loss"] > 0


class Recorder(nn.Module):
    """Wraps a model; remembers (batch size, whether gradients were on) of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.passes = model, []

    def forward(self, x):
        self.passes.append((x.shape[0], torch.is_grad_enabled()))
        return self.model(x)


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch"])
def test_a_separate_weak_pass_runs_without_gradients_and_keeps_the_pseudo_labels(prep, name):
    unlabeled = tiny().ssl_unlabeled_ratio * BATCH
    torch.manual_seed(0)
    model = build_model(tiny(), prep).eval()  # eval: BatchNorm by its running statistics in both passes
    joint, separate = Recorder(model), Recorder(model)
    _, a = one_step(prep, joint, objective=name, ssl_threshold=0.0)
    _, b = one_step(prep, separate, objective=name, ssl_threshold=0.0, ssl_weak_pass="separate")
    assert joint.passes == [(BATCH + 2 * unlabeled, True)]
    assert separate.passes == [(unlabeled, False), (BATCH + unlabeled, True)]
    assert b.logits.shape == (BATCH, 10) and b.loss.requires_grad
    # the same images, views and weights: the same pseudo-labels, so the same loss
    assert a.metric_values()["pseudo_acc"] == b.metric_values()["pseudo_acc"]
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
    b.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_run_with_a_separate_weak_pass_completes_and_logs_its_metrics(tmp_path, cifar_npz):
    cfg = tiny(objective="flexmatch", ssl_threshold=0.15, ssl_weak_pass="separate")
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert len(rows) == 4 and all(np.isfinite(r["train_loss"]) and 0 <= r["mask_rate"] <= 1 for r in rows)
    assert record.results()["pseudo_labels"]["images"] == 4 * 2 * BATCH


def test_the_weak_pass_option_is_offered_for_fixmatch_and_flexmatch_only():
    applies = RunConfig.applies
    assert applies("ssl_weak_pass", {"objective": "fixmatch"}) and applies("ssl_weak_pass", {"objective": "flexmatch"})
    assert not applies("ssl_weak_pass", {"objective": "pseudo_label"})
    with pytest.raises(ConfigError, match="ssl_weak_pass"):
        tiny(ssl_weak_pass="later")
    flags = tiny(ssl_weak_pass="separate").to_flags()
    assert flags[flags.index("--ssl-weak-pass") + 1] == "separate"


def test_flexmatch_remembers_confident_predictions(prep):
    objective, result = one_step(prep, Constant(3), objective="flexmatch", ssl_threshold=0.9)
    assert result.metric_values()["mask_rate"] == 1.0  # nothing learned yet: every class's threshold is 0
    drawn = draw_unlabeled(prep, 2 * BATCH, torch.Generator().manual_seed(0))[0].unique()
    predictions = objective.state_dict()["predictions"]
    assert predictions[drawn].eq(3).all() and (predictions >= 0).sum() == len(drawn)
    thresholds = objective.class_thresholds()
    beta = len(drawn) / (160 - len(drawn))
    assert thresholds[3] == pytest.approx(0.9 * beta / (2 - beta)) and thresholds[torch.arange(10) != 3].eq(0).all()


@pytest.mark.parametrize("name", SEMI_SUPERVISED_OBJECTIVES)
def test_each_objective_trains_with_ema_and_logs_its_metrics(tmp_path, cifar_npz, name):
    cfg = tiny(objective=name, ssl_threshold=0.15, ssl_rampup=0.5)
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert len(rows) == 4 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert all(np.isfinite(r["unlabeled_loss"]) and 0 <= r["mask_rate"] <= 1 for r in rows)
    assert [r["unlabeled_weight"] for r in rows][:2] == [0.0, (75.0 if name == "mixmatch" else 1.0) / 2]
    results = record.results()
    assert results["evaluated_with"] == "ema"
    totals = results["pseudo_labels"]
    assert totals["images"] == 4 * 2 * BATCH and sum(totals["per_class_counts"].values()) == totals["masked"]
    if name == "mixmatch":
        assert totals["mask_rate"] == 1.0 and all("pseudo_acc" in r for r in rows)
    if name == "flexmatch":
        assert set(totals["class_thresholds"]) == set(CLASSES) and "threshold_mean" in rows[0]


def test_a_resumed_flexmatch_run_keeps_its_state(tmp_path, cifar_npz):
    cfg = tiny(objective="flexmatch", ssl_threshold=0.15)
    store = RunStore(tmp_path)
    full = train_run(cfg, store, run_id="full", data_source=str(cifar_npz))
    part = train_run(cfg, store, run_id="part", data_source=str(cifar_npz), stop_at_step=2)
    assert part.state() == "cancelled"
    train_run(cfg, store, run_id="part", data_source=str(cifar_npz), resume=True)
    assert part.state() == "completed"
    a = torch.load(full.checkpoint_path("last"), weights_only=True)
    b = torch.load(part.checkpoint_path("last"), weights_only=True)
    assert (a["objective"]["predictions"] >= 0).any()  # the state is not trivial
    assert torch.equal(a["objective"]["predictions"], b["objective"]["predictions"])
    for key, value in a["objective"]["totals"].items():
        assert torch.equal(value, b["objective"]["totals"][key]), key
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert full.results()["pseudo_labels"] == part.results()["pseudo_labels"]


def test_the_duration_estimate_counts_the_images_each_objective_trains_on():
    """The estimator scales a supervised step by the objective's images per labeled image: FixMatch's
    forward pass holds the labeled batch, μ weak and μ strong views; MixMatch's K·μ guesses are also
    forward-only passes before training; the rotation pretext sees 4 copies of the labeled and as many
    unlabeled images."""
    from cifar_core.engine import objective_class

    def images(objective: str, **changes) -> float:
        cfg = RunConfig(objective=objective, **changes).validated()
        return objective_class(cfg).images_per_labeled(cfg)

    assert images("supervised") == 1.0
    assert images("pseudo_label", label_budget=250, ssl_unlabeled_ratio=7) == 8.0
    assert images("fixmatch", label_budget=250, ssl_unlabeled_ratio=7) == 15.0
    assert images("flexmatch", label_budget=250, ssl_unlabeled_ratio=3) == 7.0
    assert images("fixmatch", label_budget=250, ssl_unlabeled_ratio=6, ssl_weak_pass="separate") == pytest.approx(9.0)
    assert images("mixmatch", label_budget=250, ssl_unlabeled_ratio=3, mixmatch_k=2) == pytest.approx(1 + 6 + 2)
    assert images("rotation") == 4.0 and images("rotation", label_budget=250) == 8.0


def test_an_unlabeled_ratio_that_does_not_fit_memory_fails_the_run_before_its_first_step(tmp_path, cifar_npz,
                                                                                        monkeypatch):
    from cifar_core.engine import loop
    per_image = {}
    original = loop.activation_bytes_per_image

    def measured(*args):
        per_image["bytes"] = original(*args)
        return per_image["bytes"]

    monkeypatch.setattr(loop, "activation_bytes_per_image", measured)
    # room for a supervised step of BATCH images, not for FixMatch's μ = 50 unlabeled views on top
    fits = tiny(objective="supervised", label_budget=0, ema_decay=0.0)
    monkeypatch.setattr(loop, "free_memory_bytes", lambda device: 10**12)
    assert train_run(fits, RunStore(tmp_path / "a"), data_source=str(cifar_npz)).state() == "completed"
    room = 3 * BATCH * per_image["bytes"]
    monkeypatch.setattr(loop, "free_memory_bytes", lambda device: room)
    record = train_run(fits.replace(name="again"), RunStore(tmp_path / "b"), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    record = train_run(tiny(ssl_unlabeled_ratio=50), RunStore(tmp_path / "c"), data_source=str(cifar_npz))
    status = record.status()
    assert status["state"] == "failed" and status.get("step", 0) == 0
    assert "MiB of activations" in status["error"] and "lower batch_size or ssl_unlabeled_ratio" in status["error"]
    assert "Traceback" not in status["error"], status["error"]
