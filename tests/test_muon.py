"""Optimizer muon: Muon steps for conv filters, SGD for the rest (cifar_core/engine/muon.py), in the
trainer (schedule, clipping, GradScaler, lookahead, EMA, checkpoints, resume), the config and the preset."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_core.cli import main
from cifar_core.config import RunConfig
from cifar_core.engine import build_optimizer, train_run
from cifar_core.engine.muon import MuonSGD, newton_schulz, orthogonalized
from cifar_core.experiments.presets import preset
from cifar_core.models import create_model
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore

# The Newton–Schulz iteration's singular values land within about 0.5–1.5 of 1 (Keller Jordan's Muon).
NS_LOW, NS_HIGH = 0.5, 1.5


def muon_cfg(**changes) -> RunConfig:
    base = dict(model="fastnet", optimizer="muon", lr=0.1, momentum=0.9, muon_lr=0.2, muon_momentum=0.6,
                weight_decay=5e-4, bias_lr_scale=4.0)
    return RunConfig(**{**base, **changes}).validated()


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = batch()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("shape", [(64, 216), (256, 2304), (128, 64)])  # fastnet's filter banks; a tall one
def test_newton_schulz_output_is_close_to_orthogonal(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g)
    singular = torch.linalg.svdvals(x)
    assert x.shape == g.shape and x.dtype == g.dtype
    assert NS_LOW < singular.min() and singular.max() < NS_HIGH, (singular.min(), singular.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)  # it keeps the singular vectors: close to U·Vᵀ
    assert F.cosine_similarity(x.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_conv_filters_take_orthogonalized_steps_and_the_rest_plain_sgd():
    cfg = muon_cfg(muon_momentum=0.0)
    model = tiny_net()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model)
    filters = [p for p in model.parameters() if p.ndim == 4]
    *sgd_groups, muon_group = optimizer.param_groups
    assert muon_group["orthogonalize"] and {id(p) for p in muon_group["params"]} == {id(p) for p in filters}
    assert muon_group["lr_scale"] * cfg.lr == pytest.approx(cfg.muon_lr) and muon_group["weight_decay"] == 0
    for group in optimizer.param_groups:  # the trainer's schedule sets each group's lr from lr_scale
        group["lr"] = cfg.lr * group["lr_scale"]

    # the rest: exactly torch.optim.SGD with the same groups (weight decay on the head only, biases × 4)
    ref_params = dict(zip([id(p) for p in model.parameters()], reference.parameters()))
    ref_sgd = torch.optim.SGD([{**{k: v for k, v in g.items() if k != "params"},
                                "params": [ref_params[id(p)] for p in g["params"]]} for g in sgd_groups])
    before = [p.detach().clone() for p in filters]
    x, y = batch()
    for net in (model, reference):
        F.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in filters]
    optimizer.step()
    ref_sgd.step()
    for group in sgd_groups:
        for p in group["params"]:
            torch.testing.assert_close(p, ref_params[id(p)], rtol=0, atol=1e-7)

    # the filters: renormalized to norm √out_channels, then moved by lr × the orthogonalized gradient
    lr = muon_group["lr"]
    for w, w0, g in zip(filters, before, grads):
        renormalized = w0 * (w0.shape[0] ** 0.5 / w0.norm())
        step = (renormalized - w) / lr
        torch.testing.assert_close(step, orthogonalized(g), rtol=1e-4, atol=1e-5)
        singular = torch.linalg.svdvals(step.reshape(w.shape[0], -1))
        assert NS_LOW < singular.min() and singular.max() < NS_HIGH


def test_a_few_steps_reduce_the_loss():
    model = tiny_net()
    losses = train_steps(model, build_optimizer(muon_cfg(), model), 15)
    assert losses[-1] < 0.75 * losses[0], losses


def test_state_dict_round_trip_continues_exactly():
    cfg = muon_cfg()
    model = tiny_net()
    optimizer = build_optimizer(cfg, model)
    train_steps(model, optimizer, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are read
    resumed = tiny_net()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_optimizer(cfg, resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_optimizer.param_groups[-1]["orthogonalize"] is True
    train_steps(model, optimizer, 2)
    train_steps(resumed, resumed_optimizer, 2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_grad_scaler_unscales_before_the_muon_step():
    cfg = muon_cfg()
    plain, scaled = tiny_net(), tiny_net()
    plain_optimizer, scaled_optimizer = build_optimizer(cfg, plain), build_optimizer(cfg, scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    plain_optimizer.step()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaler.unscale_(scaled_optimizer)
    scaler.step(scaled_optimizer)
    scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_orthogonalized_groups_refuse_weight_decay_and_vectors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="no weight decay"):
        MuonSGD([{"params": [conv.weight], "orthogonalize": True, "weight_decay": 1e-4}], lr=0.1)
    optimizer = MuonSGD([conv.weight], lr=0.1, orthogonalize=True)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        optimizer.add_param_group({"params": [conv.bias], "orthogonalize": True})
    assert len(optimizer.param_groups) == 1


def test_training_with_muon_resumes_exactly(tmp_path, cifar_npz):
    """Stopped mid-epoch and resumed, with the tricks that keep state outside the optimizer (lookahead,
    EMA) and gradient clipping: the same weights, momentum buffers and accuracy as without the stop."""
    cfg = RunConfig(model="fastnet", model_params={"width": 0.25}, subset="per_class", per_class=30, val_size=0,
                    test_size=1000, epochs=2, batch_size=60, optimizer="muon", lr=0.2, muon_lr=0.2,
                    schedule="onecycle", label_smoothing=0.1, log_every=2, grad_clip="norm", clip_max_norm=2.0,
                    lookahead_every=3, ema_decay=0.9, alternating_flip=True, channels_last=True,
                    augment=[{"name": "random_crop"}]).validated()
    store, data = RunStore(tmp_path), str(cifar_npz)
    full = train_run(cfg, store, run_id="full", data_source=data)
    part = train_run(cfg, store, run_id="part", data_source=data, stop_at_step=4)
    assert part.state() == "cancelled"
    train_run(cfg, store, run_id="part", data_source=data, resume=True)
    assert full.state() == part.state() == "completed"
    a = torch.load(full.checkpoint_path("last"), weights_only=True)
    b = torch.load(part.checkpoint_path("last"), weights_only=True)
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    for key, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert full.results()["test_acc"] == pytest.approx(part.results()["test_acc"], abs=2e-4)
    *_, muon_group = a["optimizer"]["param_groups"]
    assert muon_group["orthogonalize"] and len(muon_group["params"]) == 6  # fastnet's 6 convs; whitening frozen
    assert muon_group["lr"] == pytest.approx(a["optimizer"]["param_groups"][0]["lr"] * cfg.muon_lr / cfg.lr)


def test_fast_muon_preset_validates():
    cfg = RunConfig.from_dict(preset("fast muon"))
    assert cfg.optimizer == "muon" and cfg.model == "fastnet" and cfg.model_params["whiten"]
    assert (cfg.epochs, cfg.batch_size, cfg.muon_lr, cfg.muon_momentum, cfg.momentum) == (9, 1250, 0.24, 0.6, 0.85)
    # bench/README.md measured these on the CPU: the hardest 1,000 of 1,250, views below 0.7 confidence
    assert (cfg.select_keep, cfg.select_proxy_width, cfg.select_proxy_every, cfg.lr) == (0.8, 0.25, 4, 0.83)
    assert cfg.tta_confident == 0.7
    assert cfg.nesterov and cfg.label_smoothing == 0.2 and cfg.tta_flip and cfg.tta_translate
    assert cfg.alternating_flip and cfg.lookahead_every == 0


def test_wide_muon_preset_is_fast_muon_on_airbench95s_widths():
    wide, fast = RunConfig.from_dict(preset("wide muon")), RunConfig.from_dict(preset("fast muon"))
    differs = {k for k, v in wide.to_dict().items() if fast.to_dict()[k] != v}
    assert differs == {"name", "epochs", "eval_every", "model_params"} and wide.epochs == 13
    params = wide.model_params
    assert (params["channels1"], params["channels2"], params["channels3"], params["width"]) == (128, 384, 384, 1.0)
    model = create_model("fastnet", params)
    assert 4.5e6 < sum(p.numel() for p in model.parameters()) < 4.7e6  # airbench95's 4.6 M


def test_cli_takes_optimizer_muon(tmp_path, capsys):
    code = main(["--runs-root", str(tmp_path), "train", "--model", "fastnet", "--optimizer", "muon",
                 "--muon-lr", "0.3", "--print-config"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["optimizer"] == "muon" and out["muon_lr"] == 0.3 and out["muon_momentum"] == 0.6
    code = main(["--runs-root", str(tmp_path), "train", "--preset", "fast muon", "--print-config"])
    assert code == 0 and json.loads(capsys.readouterr().out)["optimizer"] == "muon"


def test_muon_settings_apply_only_to_optimizer_muon_and_cnns():
    assert RunConfig.applies("muon_lr", {"optimizer": "muon"}) and not RunConfig.applies("muon_lr", {"optimizer": "sgd"})
    assert RunConfig.applies("nesterov", {"optimizer": "muon"})
    with pytest.raises(ConfigError, match="not a convolutional network"):
        RunConfig(model="vit", optimizer="muon").validated()
    assert RunConfig(model="resnet18", optimizer="muon").validated().optimizer == "muon"


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_the_whitening_bias_gets_a_group_of_its_own_until_its_epoch(optimizer):
    from cifar_core.models import create_model
    model = create_model("fastnet", {"width": 0.25, "whiten_bias_epochs": 3.0}, 10)
    model.init_from_data(torch.randn(64, 3, 32, 32))
    cfg = RunConfig(model="fastnet", optimizer=optimizer, bias_lr_scale=64.0).validated()
    groups = build_optimizer(cfg, model).param_groups
    temporary = [g for g in groups if "until_epoch" in g]
    assert len(temporary) == 1 and temporary[0]["params"] == [model.whiten.bias]
    assert temporary[0]["until_epoch"] == 3.0 and temporary[0]["lr_scale"] == 64.0
    assert temporary[0]["weight_decay"] == 0.0
    everything = [id(p) for g in groups for p in g["params"]]
    assert len(everything) == len(set(everything))  # the bias is in no other group
    assert id(model.whiten.weight) not in everything  # the whitening filters stay frozen
    if optimizer == "muon":
        assert groups[-1]["orthogonalize"] is True  # the filter group stays last
    frozen = create_model("fastnet", {"width": 0.25}, 10)
    frozen.init_from_data(torch.randn(64, 3, 32, 32))
    assert not any("until_epoch" in g for g in build_optimizer(cfg, frozen).param_groups)
