"""The airbench-style tricks of the fast preset: lookahead, alternating flips, bf16 autocast on the CPU."""
import pytest
import torch

from cifar_core.config import RunConfig
from cifar_core.models import create_model
from cifar_core.params import ConfigError
from cifar_core.experiments.presets import preset
from cifar_core.engine import (EMA, AlternatingFlips, Lookahead, alternating_flips, autocast_context, build_tricks,
                               clip_gradients, effective_precision)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _perturb(model, amount=1.0):
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(amount)


def test_lookahead_moves_slow_weights_on_schedule_and_resets_fast_ones():
    model = _net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    look = Lookahead(model, every=5, decay=0.9, total_steps=100)
    _perturb(model)
    look.after_step(model, step=3)  # not a multiple of `every`: nothing happens
    assert torch.equal(model[0].weight, start["0.weight"] + 1)
    look.after_step(model, step=50)
    keep = 0.9 ** 5 * 0.5 ** 3
    for name, value in model.state_dict().items():
        if value.is_floating_point():  # BN running statistics are averaged too
            expected = start[name] + (1 - keep)
            torch.testing.assert_close(look.slow[name], expected)
            torch.testing.assert_close(value, expected)  # fast weights restart from the slow ones
    assert torch.equal(model[1].num_batches_tracked, start["1.num_batches_tracked"])  # ints untouched


def test_lookahead_final_step_ends_on_the_slow_weights():
    model = _net()
    look = Lookahead(model, every=5, decay=0.95, total_steps=10)
    slow = {k: v.clone() for k, v in look.slow.items()}
    _perturb(model, 3.0)
    look.after_step(model, step=7, final=True)
    for name, value in slow.items():
        torch.testing.assert_close(look.slow[name], value)
        torch.testing.assert_close(model.state_dict()[name], value)


def test_lookahead_state_round_trip():
    model = _net()
    look = Lookahead(model, every=2, decay=0.95, total_steps=10)
    _perturb(model)
    look.after_step(model, step=8)
    other = Lookahead(_net(), every=2, decay=0.95, total_steps=10)
    other.load_state_dict(look.state_dict())
    for name in look.slow:
        assert torch.equal(other.slow[name], look.slow[name])


def test_alternating_flips_invert_every_other_epoch():
    base = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    idx = torch.randperm(1000)[:256]
    e0, e1, e2 = (alternating_flips(base, idx, epoch) for epoch in (0, 1, 2))
    assert torch.equal(e0, ~e1) and torch.equal(e0, e2)
    assert 0.35 < e0.float().mean().item() < 0.65


def test_alternating_flip_rejects_a_random_flip_step_too():
    with pytest.raises(ConfigError, match="hflip"):
        RunConfig(alternating_flip=True, augment=[{"name": "random_crop"}, {"name": "hflip"}]).validated()
    cfg = RunConfig(alternating_flip=True, augment=[{"name": "random_crop"}]).validated()
    assert "alt-flip" in cfg.key_tricks()


def test_fast_preset_uses_the_airbench_tricks():
    cfg = RunConfig.from_dict(preset("fast"))
    assert cfg.alternating_flip and cfg.lookahead_every == 5 and cfg.channels_last
    assert cfg.precision == "bf16" and cfg.tta_flip and cfg.tta_translate
    assert [step["name"] for step in cfg.augment] == ["random_crop"]


def test_bf16_autocast_runs_on_the_cpu_and_fp16_falls_back_to_fp32():
    cpu = torch.device("cpu")
    cfg = RunConfig(precision="bf16").validated()
    assert effective_precision(cfg, cpu) == "bf16"
    model = create_model("fastnet", {"width": 0.25}).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with autocast_context(cfg, cpu):
        assert model.block1.conv1(model.whiten(x)).dtype == torch.bfloat16
    fp16 = RunConfig(precision="fp16", device="auto").validated()
    assert effective_precision(fp16, cpu) == "fp32"
    with autocast_context(fp16, cpu):
        assert model.whiten(x).dtype == torch.float32
    with pytest.raises(ConfigError, match="fp16"):
        RunConfig(precision="fp16", device="cpu").validated()


def test_alternating_flips_mirror_the_batch_images_it_picks():
    flips = AlternatingFlips(n_images=8, seed=0, device=torch.device("cpu"))
    x = torch.arange(8 * 3 * 2 * 2, dtype=torch.uint8).view(8, 3, 2, 2)
    idx = torch.tensor([5, 1, 6])
    out = flips.on_batch(x[idx], idx, epoch=1)
    for row, i in enumerate(idx.tolist()):
        mirrored = bool(flips.base[i]) ^ True  # odd epoch: inverted
        assert torch.equal(out[row], x[i].flip(-1) if mirrored else x[i])


def test_tricks_hook_in_order_and_checkpoint_under_fixed_keys():
    model = _net()
    cfg = RunConfig(ema_decay=0.5, lookahead_every=2).validated()
    tricks = build_tricks(cfg, model, n_train=10, total_steps=10, device=torch.device("cpu"))
    assert [type(t) for t in tricks.items] == [EMA, Lookahead]  # the average sees the trained weights first
    assert tricks.eval_weights == "ema" and tricks.eval_model(model) is tricks.items[0].averaged
    assert set(tricks.state_dicts()) == {"ema", "lookahead"}
    plain = build_tricks(RunConfig().validated(), model, 10, 10, torch.device("cpu"))
    assert plain.eval_model(model) is model and plain.eval_weights == "model"
    assert plain.state_dicts() == {"ema": None, "lookahead": None}


def test_lookahead_resumes_from_the_model_when_the_checkpoint_has_none():
    model = _net()
    look = Lookahead(model, every=2, decay=0.95, total_steps=10)
    _perturb(model, 2.0)
    look.resume(None, model)
    for name, slow in look.slow.items():
        assert torch.equal(slow, model.state_dict()[name])


@pytest.mark.parametrize("mode", ["none", "norm", "value"])
def test_clip_gradients_returns_the_norm_before_clipping(mode):
    model = torch.nn.Linear(4, 3)
    model(torch.full((2, 4), 10.0)).sum().backward()
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    cfg = RunConfig(grad_clip=mode, clip_max_norm=0.5, clip_value=0.01).validated()
    assert clip_gradients(cfg, model) == pytest.approx(before)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    if mode == "none":
        assert after == pytest.approx(before)
    elif mode == "norm":
        assert after == pytest.approx(0.5, rel=1e-4)
    else:
        assert max(p.grad.abs().max().item() for p in model.parameters()) <= 0.01


@pytest.mark.parametrize("translate", [False, True])
def test_test_time_views_only_where_the_model_is_unsure(translate):
    from cifar_core.engine.evaluation import views_where_unsure
    from cifar_core.engine import tta_views

    model = create_model("fastnet", {"width": 0.25, "whiten": False}, 10).eval()
    torch.manual_seed(1)
    x = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        full = sum(wt * model(view) for wt, view in tta_views(x, True, translate))
        top = plain.softmax(1).amax(1)
        threshold = float(top.median())  # half the images sure, half not
        mixed = views_where_unsure(model, x, True, translate, threshold)
        sure = top >= threshold
        assert 0 < int(sure.sum()) < len(x)
        torch.testing.assert_close(mixed[sure], plain[sure])  # the sure keep the plain view
        torch.testing.assert_close(mixed[~sure], full[~sure], rtol=1e-4, atol=1e-5)  # the unsure: every view
        torch.testing.assert_close(views_where_unsure(model, x, True, translate, 1.01), full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(views_where_unsure(model, x, True, translate, 1e-9), plain)


def test_tta_confident_is_a_declared_evaluation_option():
    cfg = RunConfig.from_dict({**preset("fast"), "tta_confident": 0.6})
    assert cfg.tta_confident == 0.6
    with pytest.raises(ConfigError, match="tta_confident"):
        RunConfig.from_dict({"tta_confident": 1.5})


def test_ema_starts_from_the_first_step_weights_not_the_initial_ones():
    # no bias correction is needed: the average is a copy after the first update, and the
    # random initial weights only ever weigh decay^steps
    model = torch.nn.Linear(4, 2)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step(model, step=0)
    assert torch.equal(ema.eval_model().module.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step(model, step=1)
    expected = model.weight - 0.999  # 0.999 · (w − 1) + 0.001 · w
    assert torch.allclose(ema.eval_model().module.weight, expected, atol=1e-6)
