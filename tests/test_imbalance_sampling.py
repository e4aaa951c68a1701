"""Resampling and margin strategies of the balancing registry (issue 14): SMOTE and cluster-based
oversampling (on pixels and on a finished run's features), class-balanced and square-root sampling,
EasyEnsemble members, LDAM with deferred re-weighting; their checks, mixup with every entry, and
real runs."""
from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_core.config import RunConfig
from cifar_core.engine import LabeledBatch, StepContext, build_model, epoch_order, model_input, prepare, train_run
from cifar_core.engine.features import run_features
from cifar_core.engine.objectives import Supervised, class_weights_at, ldam_logits, supervised_loss
from cifar_core.imbalance import BALANCING, build_balance_plan
from cifar_core.imbalance.strategies import effective_number_weights, planned_epoch_images
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def blend_pair(image: np.ndarray, real: np.ndarray) -> tuple[int, int, float]:
    """(i, j, residual): the pair of `real` images whose segment lies nearest to `image`, and the
    largest pixel distance from the segment (|image - (a + t (b - a))|, t clipped to [0, 1])."""
    s = image.reshape(-1).astype(np.float64)
    flat = real.reshape(len(real), -1).astype(np.float64)
    best = (-1, -1, np.inf)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            a, d = flat[i], flat[j] - flat[i]
            t = np.clip((s - a) @ d / max(d @ d, 1e-12), 0.0, 1.0)
            residual = np.abs(s - a - t * d).max()
            if residual < best[2]:
                best = (i, j, residual)
    return best


# ---- SMOTE -------------------------------------------------------------------------------------

def test_smote_balances_with_blends_of_two_same_class_images():
    y = np.array([0] * 12 + [1] * 5 + [2] * 3)
    x = random_images(len(y), 0)
    plan = build_balance_plan("smote", {"k_neighbors": 3}, y, seed=0, num_classes=3, x=x)
    assert plan.synthetic == 7 + 9 and plan.synthetic_x.shape == (16, 32, 32, 3)
    assert plan.synthetic_x.dtype == np.uint8
    everything = np.concatenate([y, plan.synthetic_y])
    assert np.bincount(everything[plan.indices]).tolist() == [12, 12, 12]
    for image, label in zip(plan.synthetic_x, plan.synthetic_y):
        same_class = x[y == label]
        _, _, residual = blend_pair(image, same_class)
        assert residual <= 1.0  # on the segment, up to rounding to uint8
        assert blend_pair(image, x[y != label])[2] > 10  # not a blend of another class's images


def test_smote_in_feature_space_picks_neighbours_by_features():
    """Class 1's images A, B, C: B is A's neighbour in pixels, C is far; the features say A and C are
    close and B is far. With k = 1, pixel SMOTE blends A with B, feature SMOTE never does."""
    rng = np.random.default_rng(1)
    a = rng.integers(60, 196, (32, 32, 3))
    b = np.clip(a + rng.integers(-60, 61, a.shape), 0, 255)
    c = rng.integers(0, 256, a.shape)
    x = np.concatenate([random_images(10, 2), np.stack([a, b, c]).astype(np.uint8)])
    y = np.array([0] * 10 + [1] * 3)
    features = np.concatenate([np.full((10, 2), 500.0), [[0.0, 0.0], [100.0, 0.0], [1.0, 0.0]]])

    def pairs(space: str) -> set[tuple[int, int]]:
        plan = build_balance_plan("smote", {"k_neighbors": 1, "space": space, "feature_run": "r"}, y, seed=0,
                                  num_classes=2, x=x, features=features)
        found = set()
        for image in plan.synthetic_x:
            i, j, residual = blend_pair(image, x[10:])
            assert residual <= 1.0
            found.add((i, j))
        return found

    assert (0, 1) in pairs("pixels")                       # A-B: neighbours in pixels
    assert pairs("features") <= {(0, 2), (1, 2)}           # always with C, the feature neighbour of A and B


def test_smote_needs_two_images_of_a_class():
    y = np.array([0] * 5 + [1])
    with pytest.raises(ConfigError, match="smote: class 1 has one image"):
        build_balance_plan("smote", {}, y, seed=0, num_classes=2, x=random_images(6, 0))


# ---- cluster-based oversampling ----------------------------------------------------------------

def clustered_images(sizes_per_class: list[list[int]], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, group): images of a few flat colours per class (each colour one cluster), with noise."""
    rng = np.random.default_rng(seed)
    xs, ys, groups = [], [], []
    for c, sizes in enumerate(sizes_per_class):
        for g, n in enumerate(sizes):
            colour = rng.integers(0, 256, 3)
            noise = rng.integers(-8, 9, (n, 32, 32, 3))
            xs.append(np.clip(colour + noise, 0, 255).astype(np.uint8))
            ys += [c] * n
            groups += [c * 10 + g] * n
    return np.concatenate(xs), np.array(ys), np.array(groups)


def test_cluster_oversample_fills_every_cluster_of_every_class_to_the_largest():
    x, y, group = clustered_images([[20, 8, 4], [6, 3, 3]], seed=0)
    plan = build_balance_plan("cluster_oversample", {"clusters": 3}, y, seed=0, num_classes=2, x=x)
    assert plan.synthetic == 0 and plan.indices.max() < len(y)  # real images repeated, none made
    _, per_group = np.unique(group[plan.indices], return_counts=True)
    assert per_group.tolist() == [20] * 6
    assert np.bincount(y[plan.indices]).tolist() == [60, 60]
    assert planned_epoch_images("cluster_oversample", {"clusters": 3}, y, 0, 2) == 2 * 32  # equal clusters: a floor


def test_cluster_oversample_in_feature_space_clusters_by_features():
    """The colours make 2 clusters in pixels; the features split the same images 12 / 4 another way."""
    x, y, colour = clustered_images([[8, 8]], seed=1)
    split = np.array([0] * 6 + [1] * 2 + [0] * 6 + [1] * 2)
    features = np.stack([split * 50.0, np.zeros(16)], 1)
    by_pixels = build_balance_plan("cluster_oversample", {"clusters": 2}, y, 0, 1, x=x)
    by_features = build_balance_plan("cluster_oversample", {"clusters": 2, "space": "features",
                                                            "feature_run": "r"}, y, 0, 1, x=x, features=features)
    assert len(by_pixels.indices) == 16  # colour clusters are already equal
    assert np.bincount(split[by_features.indices]).tolist() == [12, 12]


# ---- class-balanced and square-root sampling ---------------------------------------------------

@pytest.mark.parametrize("name,q", [("class_balanced_sampling", 0.0), ("square_root_sampling", 0.5)])
def test_epochs_draw_classes_with_probability_proportional_to_n_to_the_q(name, q):
    counts = np.array([400, 100, 25])
    y = np.repeat(np.arange(3), counts)
    plan = build_balance_plan(name, {}, y, seed=0, num_classes=3)
    prep = types.SimpleNamespace(epoch_indices=plan.indices, sample_weights=torch.as_tensor(plan.sample_weights),
                                 device=torch.device("cpu"))
    drawn = torch.cat([epoch_order(prep, seed=0, epoch=e) for e in range(400)]).numpy()
    share = np.bincount(y[drawn], minlength=3) / len(drawn)
    expected = counts ** q / (counts ** q).sum()
    assert np.allclose(share, expected, atol=0.01), (share, expected)
    within = np.bincount(drawn[y[drawn] == 2] - 500, minlength=25) / (y[drawn] == 2).sum()
    assert np.allclose(within, 1 / 25, atol=0.01)  # uniform within a class
    assert planned_epoch_images(name, {}, y, 0, 3) == len(y)


# ---- EasyEnsemble members ----------------------------------------------------------------------

def test_easy_ensemble_members_are_balanced_different_and_reproducible():
    y = np.repeat(np.arange(3), [50, 20, 8])
    members = [build_balance_plan("easy_ensemble_member", {"members": 3, "member": m}, y, seed=4,
                                  num_classes=3).indices for m in range(3)]
    for indices in members:
        assert np.bincount(y[indices]).tolist() == [8, 8, 8] and len(set(indices)) == 24
    assert len({tuple(i) for i in members}) == 3
    again = build_balance_plan("easy_ensemble_member", {"members": 3, "member": 1}, y, seed=4, num_classes=3)
    assert np.array_equal(again.indices, members[1])
    other_seed = build_balance_plan("easy_ensemble_member", {"members": 3, "member": 1}, y, seed=5, num_classes=3)
    assert not np.array_equal(other_seed.indices, members[1])


@pytest.mark.parametrize("balance,params,message", [
    ("easy_ensemble_member", {"members": 3, "member": 3}, r"easy_ensemble_member\.member: 3 is not below members = 3"),
    ("easy_ensemble_member", {"members": 1}, r"easy_ensemble_member\.members: 1 is below the minimum"),
    ("smote", {"space": "features"}, r"smote\.feature_run: space=features needs the id of a completed run"),
    ("cluster_oversample", {"space": "features", "feature_run": "../x"}, r"cluster_oversample\.feature_run: invalid"),
    ("smote", {"k_neighbors": 0}, r"smote\.k_neighbors"),
    ("ldam_drw", {"drw_start": 1.5}, r"ldam_drw\.drw_start"),
])
def test_bad_parameters_are_config_errors_of_the_run_config(balance, params, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(balance=balance, balance_params=params).validated()
    problems = RunConfig.problems({"balance": balance, "balance_params": params})
    assert any(re.search(message, p) for p in problems), problems


# ---- LDAM-DRW ----------------------------------------------------------------------------------

def test_ldam_margins_follow_the_definition():
    y = np.repeat(np.arange(4), [500, 100, 20, 0])
    plan = build_balance_plan("ldam_drw", {"max_margin": 0.7, "scale": 2.0}, y, seed=0, num_classes=4)
    raw = np.array([500, 100, 20]) ** -0.25
    assert np.allclose(plan.ldam_margins[:3], raw * 0.7 / raw.max(), rtol=1e-6) and plan.ldam_margins[3] == 0
    assert np.allclose(plan.drw_weights, effective_number_weights(y, 4, 0.9999), rtol=1e-6)
    assert plan.class_weights is None and plan.drw_start == 0.8 and plan.ldam_scale == 2.0

    margins = torch.as_tensor(plan.ldam_margins)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = logits.clone()
    expected[torch.arange(6), labels] -= margins[labels]
    assert torch.allclose(ldam_logits(logits, labels, margins, 2.0), 2.0 * expected)
    soft = 0.3 * F.one_hot(labels, 4) + 0.7 * F.one_hot(labels.roll(1), 4)  # a mixup blend
    assert torch.allclose(ldam_logits(logits, soft.float(), margins, 1.0), logits - margins * soft)


def test_deferred_reweighting_switches_at_drw_start_of_the_steps():
    weights = torch.tensor([0.5, 1.5])
    prep = types.SimpleNamespace(class_weights=None, drw_weights=weights, drw_start=0.8)
    switched = [class_weights_at(prep, StepContext(prep, step, torch.Generator(), total_steps=10)) is weights
                for step in range(10)]
    assert switched == [False] * 8 + [True] * 2
    assert class_weights_at(prep, None) is None and class_weights_at(prep, StepContext(prep, 9, None)) is None

    margins = torch.tensor([0.2, 0.6])
    ldam = types.SimpleNamespace(class_weights=None, drw_weights=weights, drw_start=0.8, logit_offsets=None,
                                 ldam_margins=margins, ldam_scale=3.0, focal_gamma=0.0,
                                 cfg=types.SimpleNamespace(label_smoothing=0.0))
    logits = torch.tensor([[1.0, 0.5], [0.2, 0.9], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.4, 0.6]])
    shifted = 3.0 * (logits - margins * targets)
    for step, weight in ((7, None), (8, weights)):
        loss = supervised_loss(ldam, logits, targets, StepContext(ldam, step, None, total_steps=10))
        assert torch.allclose(loss, F.cross_entropy(shifted, targets, weight=weight))


def test_label_smoothing_with_balanced_softmax_leaves_the_raw_logits_unbiased():
    # free raw logits for one image of the majority class, trained to the loss's optimum: with the log
    # prior added in the loss, the test-time (raw) logits must still pick the true class and treat the
    # other classes alike, whatever their priors
    prior = torch.tensor([0.90, 0.09, 0.01])
    prep = types.SimpleNamespace(class_weights=None, drw_weights=None, drw_start=1.0, logit_offsets=prior.log(),
                                 ldam_margins=None, ldam_scale=1.0, focal_gamma=0.0,
                                 cfg=types.SimpleNamespace(label_smoothing=0.2))
    raw = torch.zeros(1, 3, requires_grad=True)
    optimizer = torch.optim.LBFGS([raw], lr=0.5, max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = supervised_loss(prep, raw, torch.tensor([0]))
        loss.backward()
        return loss
    optimizer.step(closure)
    z = raw.detach()[0]
    assert z[0] > z[1] + 1 and z[0] > z[2] + 1  # uniform smoothing made the 1% class win here
    assert z[1] == pytest.approx(z[2].item(), abs=0.05)
    # without offsets, smoothing is the plain uniform one
    plain = types.SimpleNamespace(**{**vars(prep), "logit_offsets": None})
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(supervised_loss(plain, logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.2))


# ---- a finished run: SMOTE trains; its features feed the feature-space strategies ---------------

def tiny(**changes) -> RunConfig:
    base = dict(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=16,
                imbalance="long_tail", imbalance_params={"imbalance_ratio": 8}, val_size=0, test_size=100,
                epochs=1, batch_size=64, device="cpu", precision="fp32", augment=[{"name": "hflip"}])
    base.update(changes)
    return RunConfig(**base).validated()


class RecordingSupervised(Supervised):
    """The supervised objective, remembering the progress each step's context reports."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.contexts: list[tuple[int, int]] = []

    def loss(self, model, batch, ctx):
        self.contexts.append((ctx.step, ctx.total_steps))
        return super().loss(model, batch, ctx)


@pytest.fixture(scope="module")
def smote_run(tmp_path_factory, cifar_npz):
    cfg = tiny(balance="smote")
    objective = RecordingSupervised(cfg)
    record = train_run(cfg, RunStore(tmp_path_factory.mktemp("runs")), run_id="smote", data_source=str(cifar_npz),
                       objective=objective)
    return record, objective


def test_a_tiny_smote_run_completes_and_says_how_many_images_it_made(smote_run):
    record, objective = smote_run
    status = record.status()
    assert status["state"] == "completed", status.get("error")
    labeled = status["split"]["labeled_per_class"]
    assert status["split"]["n_synthetic"] == 10 * max(labeled) - sum(labeled) > 0
    assert sum(status["split"]["synthetic_per_class"]) == status["split"]["n_synthetic"]
    assert status["train_images"] == 10 * max(labeled)
    total = status["total_steps"]
    assert objective.contexts == [(step, total) for step in range(total)]  # the loop tells the loss its progress


def test_feature_space_strategies_use_the_finished_runs_features(smote_run, cifar_npz):
    record, _ = smote_run
    store = RunStore(record.root)
    cfg = tiny(balance="cluster_oversample", balance_params={"clusters": 2, "space": "features",
                                                             "feature_run": "smote"})
    prep = prepare(cfg, str(cifar_npz), store)
    features = run_features(store, "smote", prep.train_x, "cluster_oversample.feature_run")
    assert features.shape[0] == prep.train_x.shape[0] and features.shape[1] > 0 and np.isfinite(features).all()
    expected = build_balance_plan("cluster_oversample", cfg.balance_params, prep.train_y.numpy(), cfg.seed, 10,
                                  x=prep.train_x.permute(0, 2, 3, 1).numpy(), features=features)
    assert np.array_equal(prep.epoch_indices, expected.indices)
    smote = prepare(tiny(balance="smote", balance_params={"space": "features", "feature_run": "smote"}),
                    str(cifar_npz), store)
    assert smote.synthetic > 0 and smote.split_summary["n_synthetic"] == smote.synthetic
    assert torch.bincount(smote.train_y).unique().numel() == 1  # balanced
    assert smote.labeled_counts.sum() == smote.train_x.shape[0] - smote.synthetic


def test_a_missing_or_unfinished_feature_run_fails_before_training(tmp_path, cifar_npz):
    store = RunStore(tmp_path)
    cfg = tiny(balance="smote", balance_params={"space": "features", "feature_run": "nope"})
    with pytest.raises(ConfigError, match=r"smote\.feature_run nope: no such run"):
        prepare(cfg, str(cifar_npz), store)
    store.create(tiny(), run_id="queued", state="queued")
    with pytest.raises(ConfigError, match=r"smote\.feature_run queued is queued, not completed"):
        prepare(cfg.replace(balance_params={"space": "features", "feature_run": "queued"}), str(cifar_npz), store)
    record = train_run(cfg, store, run_id="asks", data_source=str(cifar_npz))
    assert record.state() == "failed" and "smote.feature_run nope: no such run" in record.status()["error"]
    assert not record.metrics_path.exists() or not record.read_metrics()  # no step was trained


# ---- mixup with every entry --------------------------------------------------------------------

@pytest.mark.parametrize("name", BALANCING.names())
def test_one_mixup_step_gives_a_finite_loss_with_every_balancing_entry(name, cifar_npz):
    cfg = tiny(balance=name, augment=[{"name": "hflip"}, {"name": "mixup", "params": {"alpha": 1.0}}])
    prep = prepare(cfg, str(cifar_npz))
    torch.manual_seed(0)
    model = build_model(cfg, prep)
    idx = epoch_order(prep, cfg.seed, 0)[:32]
    x_aug, y_soft, _ = prep.chain(prep.train_x[idx], prep.train_y[idx], torch.Generator().manual_seed(0))
    assert y_soft.dim() == 2 and (y_soft.max(1).values < 1).any()  # soft targets
    batch = LabeledBatch(prep.train_x[idx], x_aug, model_input(prep, x_aug), prep.train_y[idx], y_soft)
    for step in (0, 9):  # before and after a deferred re-weighting
        result = Supervised(cfg).loss(model, batch, StepContext(prep, step, torch.Generator(), total_steps=10))
        assert torch.isfinite(result.loss) and result.loss.item() > 0
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    hard = supervised_loss(prep, model(batch.x).detach(), batch.y, None)
    assert torch.isfinite(hard)


def test_duration_estimates_count_the_images_each_entry_trains_on():
    from cifar_core.experiments.estimate import run_counts

    lt = dict(subset="per_class", per_class=100, imbalance="long_tail", imbalance_params={"imbalance_ratio": 10})
    counts = RunConfig(**lt).validated()
    labeled = run_counts(counts).pool
    assert run_counts(RunConfig(**lt, balance="smote").validated()).train == 10 * 100 > labeled
    assert run_counts(RunConfig(**lt, balance="square_root_sampling").validated()).train == labeled
    member = run_counts(RunConfig(**lt, balance="easy_ensemble_member",
                                  balance_params={"members": 3, "member": 2}).validated())
    assert member.train == 10 * 10 and member.pool == labeled


@pytest.mark.parametrize("name, flags, imbalance_params, balance", [
    ("report's imbalanced set (fast, 32 epochs)",
     "--imbalance report_random --imbalance-params low=500,high=1000 --epochs 32 --eval-every 32 "
     "--batch-size 512 --lr 1.0", {"low": 500, "high": 1000}, "none"),
    ("CIFAR-10-LT rho 100 (fast, balanced softmax, 60 epochs)",
     "--imbalance long_tail --imbalance-params imbalance_ratio=100 --balance balanced_softmax --epochs 60 "
     "--eval-every 60 --batch-size 512 --lr 1.0", {"imbalance_ratio": 100, "n_max": 5000}, "balanced_softmax"),
])
def test_the_imbalanced_presets_are_the_benchmarked_configs(tmp_path, capsys, name, flags, imbalance_params,
                                                            balance):
    # bench/README.md measures these presets through flags on top of `fast`: each must stay one config
    from cifar_core.cli import main
    configs = []
    for args in (["--preset", name], ["--preset", "fast", *flags.split()]):
        assert main(["--runs-root", str(tmp_path), "train", *args, "--print-config"]) == 0
        configs.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "name"})
    assert configs[0] == configs[1]
    assert configs[0]["imbalance_params"] == imbalance_params and configs[0]["balance"] == balance
