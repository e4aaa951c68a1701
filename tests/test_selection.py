"""Data selection by a small proxy model (engine/selection.py, airbench96_faster): the rules of the
option, the share of each batch the model trains on and who picks it, and tiny real runs (a half-width
fastnet on 200 CIFAR-10 images) that complete, report the selection and resume exactly."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifar_core.config import RunConfig
from cifar_core.engine import model_input, objective_for, prepare, train_run
from cifar_core.engine.objectives import LabeledBatch, StepContext, Supervised
from cifar_core.engine.selection import ProxySelect, hardest
from cifar_core.models import count_params, create_model
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

REPO = Path(__file__).resolve().parents[1]


def tiny(**changes) -> RunConfig:
    base = dict(model="fastnet", model_params={"width": 0.5}, subset="per_class", per_class=20, val_size=0,
                test_size=200, epochs=2, batch_size=40, lr=0.2, log_every=1, select_keep=0.5, device="cpu",
                augment=[{"name": "random_crop"}, {"name": "hflip"}])
    base.update(changes)
    return RunConfig(**base).validated()


def test_select_keep_below_one_trains_with_the_proxy_objective():
    assert type(objective_for(tiny())) is ProxySelect
    assert type(objective_for(tiny(select_keep=1.0))) is Supervised
    assert RunConfig().validated().select_keep == 1.0  # off unless asked for


@pytest.mark.parametrize("changes, fragment", [
    ({"objective": "fixmatch", "subset": "full", "label_budget": 250}, "supervised objective"),
    ({"distill": "soft", "teacher_run": "teacher-1"}, "supervised objective"),
    ({"nproc": 2}, "one process"),
    ({"model": "vit", "model_params": {}}, "no width parameter.*fastnet"),
    ({"select_proxy_width": 0.125}, "select_proxy_width 0.125"),  # fastnet's width starts at 0.25
    ({"select_keep": 0.0}, "select_keep"),
])
def test_what_selection_cannot_do_is_a_clear_message(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny(**changes)


def test_hardest_keeps_the_highest_losses_in_batch_order():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0])
    assert hardest(losses, 2).tolist() == [1, 3]
    assert hardest(losses, 5).tolist() == [0, 1, 2, 3, 4]


class Recorder(torch.nn.Module):
    """The run's model, noting the batch sizes it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


def test_the_model_trains_on_the_share_the_proxy_finds_hardest(cifar_npz):
    cfg = tiny(select_proxy_every=2, label_smoothing=0.2)
    prep = prepare(cfg, str(cifar_npz))
    objective = objective_for(cfg)
    objective.attach(prep)
    x_uint8, y = prep.train_x[:40], prep.train_y[:40]
    x_augmented = x_uint8.float() / 255
    batch = LabeledBatch(x_uint8, x_augmented, model_input(prep, x_augmented), y, F.one_hot(y, 10).float())
    model = Recorder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    for step, proxy_trains in [(0, True), (1, False)]:
        with torch.no_grad():  # the proxy's own ranking of the batch, computed the way it does it
            losses = F.cross_entropy(objective.proxy(batch.x).float(), batch.y_soft, reduction="none",
                                     label_smoothing=0.2)
        before = [p.detach().clone() for p in objective.proxy.parameters()]
        result = objective.loss(model, batch, StepContext(prep, step, torch.Generator(), total_steps=10))
        assert model.sizes[-1] == 20  # half of the batch reaches the model
        assert torch.equal(result.targets, batch.y_soft[hardest(losses, 20)])  # the proxy's hardest half
        assert result.metrics["proxy_loss"].item() == pytest.approx(losses.mean().item(), rel=1e-5)
        moved = any(not torch.equal(b, p) for b, p in zip(before, objective.proxy.parameters()))
        assert moved == proxy_trains  # the proxy steps every select_proxy_every steps only
        assert result.loss.requires_grad and torch.isfinite(result.loss)
    assert count_params(objective.proxy) < count_params(run_model())


def test_with_a_balancing_loss_the_proxy_ranks_images_by_that_loss(cifar_npz):
    """Balanced Softmax adds the log prior to the logits in the loss: the proxy ranks (and trains on) the
    images by that loss, not by plain cross-entropy, which would call the rare classes' images hardest
    once the proxy has learnt the prior and so re-balance a second time."""
    cfg = tiny(per_class=40, imbalance="long_tail", imbalance_params={"imbalance_ratio": 10},
               balance="balanced_softmax", select_proxy_every=1)
    prep = prepare(cfg, str(cifar_npz))
    assert prep.logit_offsets is not None
    objective = objective_for(cfg)
    objective.attach(prep)
    x_uint8, y = prep.train_x[:40], prep.train_y[:40]
    x_augmented = x_uint8.float() / 255
    batch = LabeledBatch(x_uint8, x_augmented, model_input(prep, x_augmented), y, F.one_hot(y, 10).float())
    with torch.no_grad():
        logits = objective.proxy(batch.x).float()
    balanced = F.cross_entropy(logits + prep.logit_offsets, batch.y_soft, reduction="none")
    plain = F.cross_entropy(logits, batch.y_soft, reduction="none")
    assert not torch.equal(hardest(balanced, 20), hardest(plain, 20))  # the two rankings differ here
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))
    result = objective.loss(model, batch, StepContext(prep, 0, torch.Generator(), total_steps=10))
    assert torch.equal(result.targets, batch.y_soft[hardest(balanced, 20)])
    assert result.metrics["proxy_loss"].item() == pytest.approx(balanced.mean().item(), rel=1e-5)


def run_model() -> torch.nn.Module:
    """The network of tiny(): the proxy is the same at a quarter of the width instead of half."""
    return create_model("fastnet", {"width": 0.5})


def same_training(run_a: Path, run_b: Path) -> None:
    """bench/compare_runs.py on two run folders: every metric line and results.json, timings ignored."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_runs.py"), str(run_a), str(run_b)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_run_with_selection_completes_reports_it_and_resumes_exactly(tmp_path, cifar_npz):
    store = RunStore(tmp_path)
    whole = train_run(tiny(), store, run_id="whole", data_source=str(cifar_npz))
    assert whole.state() == "completed", whole.status()
    selection = whole.results()["data_selection"]
    assert selection["keep"] == 0.5 and selection["proxy_width"] == 0.25 and selection["proxy_every"] == 4
    assert 0 < selection["proxy_parameters"] < count_params(run_model())
    rows = [r for r in whole.read_metrics() if r["kind"] == "train"]
    assert len(rows) == 10 and all(r["proxy_loss"] > 0 for r in rows)
    last = torch.load(whole.checkpoint_path("last"), weights_only=True)
    assert {"proxy", "proxy_optimizer"} <= set(last["objective"])

    part = train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), stop_at_step=7)
    assert part.state() == "cancelled"
    train_run(tiny(), store, run_id="part", data_source=str(cifar_npz), resume=True)
    assert part.state() == "completed", part.status()
    same_training(whole.path, part.path)  # the proxy's weights, momentum and statistics came back


def test_selection_does_not_change_the_model_s_initial_weights(cifar_npz):
    from cifar_core.engine.loop import build_model

    prep = prepare(tiny(), str(cifar_npz))
    torch.manual_seed(0)
    objective_for(tiny()).attach(prep)  # builds the proxy before the model, as the trainer does
    with_proxy = build_model(tiny(), prep).state_dict()
    torch.manual_seed(0)
    without = build_model(tiny(select_keep=1.0), prep).state_dict()
    assert all(torch.equal(with_proxy[k], without[k]) for k in without)
