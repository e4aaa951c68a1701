"""Training objectives: selection, the unlabeled pool, and a toy semi-supervised objective registered
here to prove that the loop runs objectives that draw unlabeled batches and log their own metrics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_core.config import RunConfig
from cifar_core.data import build_split, load_cifar10
from cifar_core.engine import (OBJECTIVES, Objective, StepResult, draw_unlabeled, model_input, objective_for,
                               prepare, seeded_generator, supervised_loss, train_run)
from cifar_core.engine.objectives import Distill, Supervised
from cifar_core.engine.rng import OBJECTIVE_DRAWS
from cifar_core.params import ConfigError, Param
from cifar_core.runs import RunStore

UNLABELED_PER_STEP = 16


def tiny(**changes) -> RunConfig:
    base = dict(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=30,
                label_budget=100, val_size=0, test_size=200, epochs=2, batch_size=50, lr=0.1,
                log_every=1, augment=[{"name": "random_crop"}, {"name": "hflip"}])
    base.update(changes)
    return RunConfig(**base).validated()


class Consistency(Objective):
    """Cross-entropy on the labeled batch plus `weight` times the squared distance between the
    predictions on two augmentations of a batch drawn from the unlabeled pool (Π-model style)."""

    def __init__(self, cfg, weight: float):
        super().__init__(cfg)
        self.weight = weight
        self.draws = 0
        self.positions: dict[int, torch.Tensor] = {}  # step -> positions into prep.unlabeled_x

    def loss(self, model, batch, ctx):
        prep = ctx.prep
        positions, images = draw_unlabeled(prep, UNLABELED_PER_STEP, ctx.rng)
        self.positions[ctx.step] = positions.cpu()
        self.draws += positions.shape[0]
        views = [model_input(prep, prep.chain(images, None, ctx.rng)[0]) for _ in range(2)]
        logits = model(torch.cat([batch.x, *views]))
        labeled, first, second = logits.split([batch.x.shape[0], images.shape[0], images.shape[0]])
        consistency = F.mse_loss(first.float().softmax(1), second.float().softmax(1))
        loss = supervised_loss(prep, labeled, batch.y_soft) + self.weight * consistency
        return StepResult(loss, labeled, batch.y_soft, {"consistency_loss": consistency})

    def state_dict(self):
        return {"draws": torch.tensor(self.draws)}

    def load_state_dict(self, state):
        self.draws = int(state["draws"])


@pytest.fixture
def consistency_registered():
    OBJECTIVES.register("consistency", params=(Param("weight", "float", 1.0, 0.0, 10.0),))(Consistency)
    yield
    del OBJECTIVES.entries["consistency"]


def test_the_run_config_picks_supervised_or_distill():
    assert type(objective_for(RunConfig().validated())) is Supervised
    distilled = RunConfig(distill="soft", teacher_run="teacher").validated()
    assert type(objective_for(distilled)) is Distill
    assert {"supervised", "distill"} <= set(OBJECTIVES.names())
    with pytest.raises(ConfigError, match="unknown objective 'nope'.*supervised"):
        OBJECTIVES.get("nope")


def test_prepared_holds_the_unlabeled_pool(cifar_npz):
    cfg = tiny()
    prep = prepare(cfg, str(cifar_npz))
    split = build_split(load_cifar10(str(cifar_npz)).y_train, {"subset": "per_class", "per_class": 30,
                                                              "label_budget": 100}, cfg.seed)
    x_train = load_cifar10(str(cifar_npz)).x_train
    assert prep.train_x.shape == (100, 3, 32, 32) and prep.unlabeled_x.shape == (200, 3, 32, 32)
    assert prep.unlabeled_x.dtype == torch.uint8
    expected = np.ascontiguousarray(x_train[split.unlabeled_idx].transpose(0, 3, 1, 2))
    assert np.array_equal(prep.unlabeled_x.numpy(), expected)
    everything = prepare(tiny(label_budget=0), str(cifar_npz))
    assert everything.unlabeled_x.shape == (0, 3, 32, 32) and everything.train_x.shape[0] == 300
    with pytest.raises(ConfigError, match="unlabeled images.*label_budget"):
        draw_unlabeled(everything, 4, torch.Generator())


def test_a_registered_objective_draws_unlabeled_images_and_logs_its_metric(tmp_path, cifar_npz,
                                                                           consistency_registered):
    cfg = tiny()
    objective = OBJECTIVES.build("consistency", {"weight": 2.0}, cfg=cfg)
    record = train_run(cfg, RunStore(tmp_path), run_id="semi", data_source=str(cifar_npz), objective=objective)
    assert record.state() == "completed", record.status()
    total = record.status()["total_steps"]
    assert total == 4 and record.status()["split"]["n_unlabeled"] == 200

    train_rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert len(train_rows) == total
    assert all(np.isfinite(r["consistency_loss"]) and r["consistency_loss"] >= 0 for r in train_rows)

    # every step drew from the unlabeled pool, from the generator of (seed, step)
    assert sorted(objective.positions) == list(range(total)) and objective.draws == total * UNLABELED_PER_STEP
    prep = prepare(cfg, str(cifar_npz))
    for step, positions in objective.positions.items():
        expected, _ = draw_unlabeled(prep, UNLABELED_PER_STEP, seeded_generator(cfg.seed, OBJECTIVE_DRAWS, step))
        assert torch.equal(positions, expected)
    assert len(torch.cat(list(objective.positions.values())).unique()) > UNLABELED_PER_STEP

    last = torch.load(record.checkpoint_path("last"), weights_only=True)
    assert int(last["objective"]["draws"]) == total * UNLABELED_PER_STEP


def test_objective_state_is_checkpointed_and_resumed(tmp_path, cifar_npz, consistency_registered):
    cfg = tiny()
    store = RunStore(tmp_path)
    part = train_run(cfg, store, run_id="part", data_source=str(cifar_npz), stop_at_step=3,
                     objective=OBJECTIVES.build("consistency", {}, cfg=cfg))
    assert part.state() == "cancelled"
    resumed = OBJECTIVES.build("consistency", {}, cfg=cfg)
    train_run(cfg, store, run_id="part", data_source=str(cifar_npz), resume=True, objective=resumed)
    assert part.state() == "completed"
    assert resumed.draws == 4 * UNLABELED_PER_STEP and sorted(resumed.positions) == [3]  # 3 restored + 1 drawn
    steps = [r["step"] for r in part.read_metrics() if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_supervised_checkpoints_keep_every_key(tmp_path, cifar_npz):
    record = train_run(tiny(label_budget=0, epochs=1), RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    last = torch.load(record.checkpoint_path("last"), weights_only=True)
    assert {"model", "optimizer", "ema", "scaler", "lookahead", "step", "best_acc", "elapsed", "model_name",
            "model_params", "eval_weights", "normalizers", "tta", "objective", "rng", "format"} == set(last)
    assert last["objective"] == {} and last["ema"] is None and last["lookahead"] is None
    assert all("consistency_loss" not in r and "distill_loss" not in r for r in record.read_metrics())
