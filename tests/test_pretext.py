"""The rotation pretext (cifar_core/engine/pretext.py): its targets on hand-made images, its loss and
metrics, its config rules, a short real pretext run whose rotation accuracy rises above chance, and runs
initialised from it (the head re-initialised: engine/init_from.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cifar_core.config import RunConfig
from cifar_core.engine import LabeledBatch, StepContext, build_model, model_input, prepare, train_run
from cifar_core.engine.checkpoints import read_checkpoint
from cifar_core.engine.init_from import crt_config, init_candidates, load_init_source
from cifar_core.engine.objectives import OBJECTIVES, objective_for
from cifar_core.engine.pretext import ROTATIONS, Rotation, rotate_four
from cifar_core.models import classifier_head, create_model
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

PRETEXT = "pretext"
# lenet: the cheapest model (no BatchNorm), its head a plain Linear layer (classifier[-1])
TINY = dict(model="lenet", subset="per_class", per_class=30, val_size=0, test_size=200, batch_size=30, lr=0.05,
            log_every=10, augment=[{"name": "random_crop"}, {"name": "hflip"}])


def tiny(**changes) -> RunConfig:
    return RunConfig(**{**TINY, **changes}).validated()


# ---- targets ------------------------------------------------------------------------------------------

def test_rotate_four_turns_a_known_image_counter_clockwise():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    rotated, targets = rotate_four(image)
    assert targets.tolist() == [0, 1, 2, 3]
    expected = [[[0, 1], [2, 3]],   # 0°
                [[1, 3], [0, 2]],   # 90° counter-clockwise: the right column becomes the top row
                [[3, 2], [1, 0]],   # 180°
                [[2, 0], [3, 1]]]   # 270°
    assert rotated[:, 0].tolist() == expected


def test_rotate_four_rows_are_image_i_at_rotation_k(cifar):
    images = torch.from_numpy(cifar.x_train[:3]).permute(0, 3, 1, 2).float()
    rotated, targets = rotate_four(images.contiguous(memory_format=torch.channels_last))
    assert rotated.shape == (12, 3, 32, 32) and rotated.is_contiguous(memory_format=torch.channels_last)
    for k in range(ROTATIONS):
        for i in range(3):
            row = k * 3 + i
            assert targets[row] == k
            assert torch.equal(torch.rot90(rotated[row], -k, dims=(1, 2)), images[i])  # turned back: the image
    assert torch.equal(rotated[6:9], images.flip(2, 3))  # 180° is both flips
    assert not torch.equal(rotated[3:6], images.flip(3))  # 90° is no mirror image


class CornerModel(torch.nn.Module):
    """Knows which way up an image is from its one bright pixel (top-left when upright): logits are the
    brightness of the corners where 0°, 90°, 180° and 270° put that pixel, then 6 zeros."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        corners = [x[:, 0, 0, 0], x[:, 0, -1, 0], x[:, 0, -1, -1], x[:, 0, 0, -1]]
        return torch.cat([torch.stack(corners, 1), torch.zeros(x.shape[0], 6)], 1)


def marked_batch(n: int) -> LabeledBatch:
    x = torch.zeros(n, 3, 32, 32)
    x[:, :, 0, 0] = 1.0
    y = torch.arange(n) % 10
    return LabeledBatch(x.to(torch.uint8), x, x, y, torch.nn.functional.one_hot(y, 10).float())


def test_the_loss_targets_every_rotation_of_every_image():
    prep = SimpleNamespace(unlabeled_x=torch.zeros(0, 3, 32, 32, dtype=torch.uint8))
    objective, model = Rotation(tiny(objective="rotation")), CornerModel()
    result = objective.loss(model, marked_batch(6), StepContext(prep, 0, torch.Generator()))
    assert model.inputs[0].shape == (24, 3, 32, 32)  # 6 images × 4 rotations, in one forward
    assert result.metric_values()["rotation_acc"] == 1.0  # a model that knows the orientation is always right
    assert result.logits.shape == (6, ROTATIONS) and result.correct() == 6
    assert result.targets.tolist() == [0, 1, 2, 3, 0, 1]  # train_acc: image i at rotation i mod 4
    flipped = Rotation(tiny(objective="rotation")).loss(
        lambda x: -CornerModel()(x), marked_batch(6), StepContext(prep, 0, torch.Generator()))
    assert flipped.metric_values()["rotation_acc"] == 0.0 and flipped.correct() == 0


def test_with_a_label_budget_the_unlabeled_pool_joins_the_batch(cifar_npz):
    cfg = tiny(objective="rotation", per_class=20, label_budget=100)
    prep = prepare(cfg, str(cifar_npz))
    assert prep.unlabeled_x.shape[0] == 100
    x_uint8, y = prep.train_x[:10], prep.train_y[:10]
    x_aug, y_soft, _ = prep.chain(x_uint8, y, torch.Generator().manual_seed(0))
    batch = LabeledBatch(x_uint8, x_aug, model_input(prep, x_aug), y, y_soft)
    recorder = CornerModel()
    result = Rotation(cfg).loss(recorder, batch, StepContext(prep, 0, torch.Generator().manual_seed(1)))
    seen = recorder.inputs[0]
    assert seen.shape == (4 * 20, 3, 32, 32)  # the 10 labeled images and 10 drawn from the pool, 4 rotations each
    assert torch.equal(seen[:10], batch.x) and not torch.equal(seen[10:20], batch.x)
    assert result.correct() <= 10 and result.logits.shape == (10, ROTATIONS)


# ---- config -------------------------------------------------------------------------------------------

def test_rotation_is_registered_and_chosen_by_the_config():
    assert "rotation" in OBJECTIVES.names()
    assert type(objective_for(tiny(objective="rotation"))) is Rotation


@pytest.mark.parametrize("changes, fragment", [
    ({"tta_flip": True}, "test-time augmentation only costs time"),
    ({"balance": "weighted_sampler"}, "has nothing to balance"),
    ({"augment": [{"name": "vflip"}]}, "step vflip makes that ambiguous"),
    ({"augment": [{"name": "mixup"}]}, "step mixup makes that ambiguous"),
    ({"augment": [{"name": "rotation", "params": {"degrees": 60}}]}, "step rotation makes that ambiguous"),
    ({"distill": "soft", "teacher_run": "t"}, "cannot be combined with distillation"),
])
def test_rotation_refuses_options_that_use_labels_or_blur_the_orientation(changes, fragment):
    problems = RunConfig.problems({"objective": "rotation", **changes})
    assert any(fragment in p for p in problems), problems
    with pytest.raises(ConfigError, match=fragment):
        RunConfig(objective="rotation", **changes).validated()
    assert RunConfig(**{k: v for k, v in changes.items() if k not in ("distill", "teacher_run")}).validated()


def test_rotation_accepts_mild_augmentation():
    assert RunConfig(objective="rotation", augment=[{"name": "random_crop"}, {"name": "hflip"},
                                                    {"name": "rotation", "params": {"degrees": 30}}]).validated()


# ---- a real pretext run, and runs that start from it ---------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory, cifar_npz) -> RunStore:
    """A runs root with one completed rotation pretext: lenet, 300 images, 20 epochs (200 steps of 30)."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    record = train_run(tiny(objective="rotation", epochs=20, eval_every=20), store, run_id=PRETEXT,
                       data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    return store


def test_the_pretext_learns_rotations_above_chance(store):
    record = store.record(PRETEXT)
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert rows[-1]["step"] == 200
    first, last = rows[0]["rotation_acc"], sum(r["rotation_acc"] for r in rows[-5:]) / 5
    assert first < 0.32 and last > 0.35 and last > first + 0.05, (first, last)  # chance: 0.25
    results = record.results()
    assert results["pretext"] == "rotation" and "meaningless" in results["pretext_note"]
    assert results["rotation_test_acc"] > 0.35  # 800 test predictions: chance is 0.25 ± 0.015
    probe = results["linear_probe"]
    assert probe["train_images"] == 300 and probe["features"] == 84 and 0.0 <= probe["test_acc"] <= 1.0
    status = record.status()
    assert status["pretext"] == "rotation" and status["rotation_test_acc"] == results["rotation_test_acc"]
    assert status["linear_probe_acc"] == probe["test_acc"]
    assert [c["pretext"] for c in init_candidates(store) if c["run_id"] == PRETEXT] == ["rotation"]


def built(store: RunStore, cifar_npz, cfg: RunConfig) -> tuple[torch.nn.Module, dict]:
    """(model, init_from info) as the trainer builds them."""
    torch.manual_seed(cfg.seed)
    source = load_init_source(store, cfg)
    return build_model(cfg, prepare(cfg, str(cifar_npz)), source), source.info


def head_keys(model: torch.nn.Module) -> set[str]:
    head = classifier_head(model)
    path = next(name for name, module in model.named_modules() if module is head)
    return {f"{path}.{k}" for k in head.state_dict()}


@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
def test_250_labels_from_the_pretext_load_every_weight_but_the_head(store, cifar_npz, mode):
    cfg = tiny(seed=4, label_budget=250, epochs=2, init_run=PRETEXT, init_mode=mode)
    model, info = built(store, cifar_npz, cfg)
    source = read_checkpoint(store.record(PRETEXT)).evaluation_weights()[0]
    state, heads = model.state_dict(), head_keys(model)
    assert heads and state.keys() == source.keys()
    assert all(torch.equal(state[k].cpu(), source[k].cpu()) for k in source if k not in heads)
    torch.manual_seed(cfg.seed)
    fresh = create_model(cfg.model, cfg.model_params).state_dict()
    assert all(torch.equal(state[k].cpu(), fresh[k]) and not torch.equal(state[k].cpu(), source[k].cpu())
               for k in heads)  # the head this seed builds, not the rotation head
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == (heads if mode == "linear_probe" else set(state))
    assert info["pretext"] == "rotation" and info["head"].startswith("re-initialised")
    assert info["test_acc"] is None and info["linear_probe_acc"] == store.record(PRETEXT).status()["linear_probe_acc"]


def test_a_fine_tune_from_the_pretext_trains_and_says_so(store, cifar_npz):
    record = train_run(tiny(seed=1, label_budget=250, epochs=2, init_run=PRETEXT), store, run_id="finetuned",
                       data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    assert record.status()["init_from"]["pretext"] == "rotation"
    assert "pretext" not in record.results()  # a classifier: its test accuracy means what it says
    assert [c["pretext"] for c in init_candidates(store) if c["run_id"] == "finetuned"] == [None]


def test_continuing_the_pretext_keeps_its_head(store, cifar_npz):
    cfg = tiny(seed=2, objective="rotation", epochs=1, init_run=PRETEXT)
    model, info = built(store, cifar_npz, cfg)
    source = read_checkpoint(store.record(PRETEXT)).evaluation_weights()[0]
    assert all(torch.equal(v.cpu(), source[k].cpu()) for k, v in model.state_dict().items())
    assert "pretext" not in info and info["head"] == "loaded from the source"


def test_crt_from_a_pretext_trains_the_classes(store):
    cfg = crt_config(store, PRETEXT)
    assert cfg.objective == "supervised" and cfg.init_mode == "crt" and cfg.init_run == PRETEXT
