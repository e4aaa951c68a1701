"""Tests for cifar_core.models (CPU only, small batches)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_core.models import (MODELS, check_model, classifier_head, count_params, create_model,
                               penultimate_features)
from cifar_core.params import ConfigError

torch.set_num_threads(min(2, torch.get_num_threads()))

ALL = MODELS.names()


def _meta(name, params=None):
    """Build on the meta device: structure and parameter counts without the cost of initialisation."""
    with torch.device("meta"):
        return create_model(name, params)


def _x(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registry_entries_have_tags_and_descriptions():
    assert set(ALL) >= {"resnet18", "resnet34", "lenet", "alexnet", "fastnet"}
    allowed = {"cnn", "resnet", "baseline", "fast", "transformer", "vit", "cait"}
    for entry in MODELS.entries.values():
        assert entry.description
        assert entry.tags and set(entry.tags) <= allowed
    assert "fast" in MODELS.get("fastnet").tags
    assert "resnet" in MODELS.get("resnet18").tags
    assert "baseline" in MODELS.get("lenet").tags
    MODELS.describe()  # JSON-able declarations build


@pytest.mark.parametrize("name", ALL)
def test_output_shape_with_defaults(name):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 10)
    assert create_model(name, num_classes=7).eval()(_x(2)).shape == (2, 7)


@pytest.mark.parametrize("name", [n for n in ALL if n != "resnet34"])  # resnet34: same code as resnet18
def test_channels_last_autocast_and_backward(name):
    model = create_model(name).train().to(memory_format=torch.channels_last)
    x = _x(4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out.float(), torch.arange(4)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_resnet_parameter_counts():
    n18 = count_params(_meta("resnet18"))
    n34 = count_params(_meta("resnet34"))
    assert abs(n18 - 11.17e6) < 0.1e6, n18
    assert abs(n34 - 21.28e6) < 0.1e6, n34
    assert n18 == 11_173_962 and n34 == 21_282_122  # torchvision-style CIFAR ResNets


@pytest.mark.parametrize("norm,shortcut,stem", list(itertools.product(
    ("batch", "group", "none"), ("projection", "zero_pad"), ("cifar", "imagenet"))))
def test_resnet18_every_combination_runs(norm, shortcut, stem):
    model = create_model("resnet18", {"norm": norm, "shortcut": shortcut, "stem": stem}).eval()
    with torch.no_grad():
        out = model(_x(2))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias is not None) == (norm == "none") for m in convs)
    has = {t: any(isinstance(m, t) for m in model.modules()) for t in (nn.BatchNorm2d, nn.GroupNorm)}
    assert has[nn.BatchNorm2d] == (norm == "batch")
    assert has[nn.GroupNorm] == (norm == "group")
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules()) == (stem == "imagenet")


@pytest.mark.parametrize("groups", [24, 3, 100, 512])
def test_groupnorm_groups_must_divide(groups):
    with pytest.raises(ConfigError, match=rf"groups={groups} must divide.*64, 128, 256, 512"):
        create_model("resnet18", {"norm": "group", "groups": groups})
    with pytest.raises(ConfigError, match="resnet34: GroupNorm"):
        check_model("resnet34", {"norm": "group", "groups": groups})
    # groups are ignored unless norm=group
    check_model("resnet18", {"norm": "batch", "groups": groups})


def test_groupnorm_valid_groups():
    model = _meta("resnet18", {"norm": "group", "groups": 16})
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 16 for m in gns)


def _shortcut_params(model):
    return sum(count_params(m.shortcut) for m in model.modules() if hasattr(m, "shortcut"))


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_zero_pad_shortcut_is_parameter_free(name):
    proj = _meta(name, {"shortcut": "projection"})
    zero = _meta(name, {"shortcut": "zero_pad"})
    assert _shortcut_params(zero) == 0
    # 3 downsampling shortcuts: 1x1 conv + BN each
    expected = sum(c_in * c_out + 2 * c_out for c_in, c_out in ((64, 128), (128, 256), (256, 512)))
    assert _shortcut_params(proj) == expected
    assert count_params(proj) - count_params(zero) == expected


def test_zero_pad_shortcut_values():
    block = create_model("resnet18", {"shortcut": "zero_pad"}).layer2[0]
    x = _x(2)[:, :1].expand(2, 64, 32, 32).contiguous()
    y = block.shortcut(x)
    assert y.shape == (2, 128, 16, 16)
    assert torch.equal(y[:, 32:96], x[:, :, ::2, ::2])
    assert not y[:, :32].any() and not y[:, 96:].any()


@pytest.mark.parametrize("name", [n for n in ALL if any(p.name == "dropout" for p in MODELS.get(n).params)])
def test_dropout_present_iff_positive(name):
    def has_dropout(m):
        return any(isinstance(mod, nn.Dropout) for mod in m.modules())

    assert not has_dropout(_meta(name, {"dropout": 0.0}))
    model = _meta(name, {"dropout": 0.3})
    assert has_dropout(model)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    if not name.startswith("resnet"):  # resnet forward with dropout is covered by a run below
        assert create_model(name, {"dropout": 0.3}).eval()(_x(2)).shape == (2, 10)


def test_resnet_dropout_and_imagenet_stem_in_train_mode():
    model = create_model("resnet18", {"dropout": 0.3, "stem": "imagenet"}).train()
    assert model(_x(2)).shape == (2, 10)  # layer4 is 1x1 here; BN still has 2 values per channel


def test_alexnet_default_dropout_and_width():
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in create_model("alexnet").modules())
    small = create_model("alexnet", {"width": 0.5})
    assert count_params(small) < count_params(_meta("alexnet"))
    assert small.eval()(_x(2)).shape == (2, 10)


def test_lenet_activation():
    tanh = create_model("lenet", {"activation": "tanh"})
    assert any(isinstance(m, nn.Tanh) for m in tanh.modules())
    assert not any(isinstance(m, nn.ReLU) for m in tanh.modules())
    assert count_params(tanh) == 62_006


def _correlated_images(n=600, seed=0):
    """Synthetic 'normalized images' with strong spatial and channel correlations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 34, 34, generator=g)
    x = F.avg_pool2d(x, 3, stride=1)  # neighbouring pixels correlated
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.5, 1.0, 0.5], [0.2, 0.7, 1.0]])
    x = torch.einsum("dc,nchw->ndhw", mix, x) + 0.3
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def test_fastnet_init_from_data_whitens_and_freezes():
    model = create_model("fastnet")
    layer = model.whiten
    assert layer.weight.requires_grad  # a normal conv until initialised
    x = _correlated_images(n=300)
    assert model.init_from_data(x) is True
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    with torch.no_grad():
        out = layer(x)  # (N, 24, 31, 31)
    assert out.shape[1:] == (24, 31, 31)
    assert torch.allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # +/- eigenvector pairs
    proj = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert proj.mean(0).abs().max() < 1e-3
    cov = torch.cov(proj.T)
    off_diag = cov - torch.diag(torch.diag(cov))
    assert off_diag.abs().max() < 1e-3, cov
    # eps (5e-4) shrinks each direction by lambda / (lambda + eps): ~1 for all but the weakest ones
    diag = torch.diag(cov)
    assert (diag <= 1 + 1e-3).all() and (diag > 0.8).all(), diag
    assert (diag[:8] - 1).abs().max() < 0.02, diag
    assert (cov - torch.eye(12, dtype=cov.dtype)).abs().max() < 0.1, cov
    # frozen weights get no gradient; the rest of the net trains
    model.train()
    F.cross_entropy(model(x[:8]), torch.arange(8) % 10).backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert model.head.weight.grad is not None
    trainable = count_params(model, trainable_only=True)
    assert trainable < count_params(model)


def test_fastnet_whitening_without_eps_gives_identity_covariance():
    model = create_model("fastnet")
    x = _correlated_images(n=200, seed=2)
    model.init_from_data(x, eps=1e-10)
    with torch.no_grad():
        proj = model.whiten(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(proj.T)
    assert (cov - torch.eye(12, dtype=cov.dtype)).abs().max() < 1e-3, cov


def test_fastnet_whitening_uses_at_most_max_images():
    x = _correlated_images(n=300, seed=1)
    a = create_model("fastnet")
    a.init_from_data(x, max_images=100)
    b = create_model("fastnet")
    b.init_from_data(x[torch.linspace(0, 299, 100).long()])
    assert torch.allclose(a.whiten.weight, b.whiten.weight, atol=1e-5)


def test_fastnet_without_whitening_is_a_normal_conv():
    model = create_model("fastnet", {"whiten": False})
    before = model.whiten.weight.clone()
    assert model.init_from_data(_correlated_images(n=20)) is False
    assert torch.equal(model.whiten.weight, before)
    assert model.whiten.weight.requires_grad


def test_fastnet_architecture_details():
    model = create_model("fastnet")
    assert model.whiten.kernel_size == (2, 2) and model.whiten.out_channels == 24
    assert model.head.bias is None
    widths = [model.block1.conv1.out_channels, model.block2.conv1.out_channels,
              model.block3.conv1.out_channels]
    assert widths == [64, 256, 256]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    wide = create_model("fastnet", {"width": 0.5})
    assert wide.block2.conv1.out_channels == 128
    airbench95 = create_model("fastnet", {"channels1": 128, "channels2": 384, "channels3": 384})
    assert [airbench95.block1.conv1.out_channels, airbench95.block2.conv1.out_channels,
            airbench95.block3.conv1.out_channels, airbench95.head.in_features] == [128, 384, 384, 384]
    assert airbench95.eval()(_x(2)).shape == (2, 10)
    half = create_model("fastnet", {"channels1": 128, "width": 0.5})  # width multiplies every group
    assert half.block1.conv1.out_channels == 64 and half.block3.conv1.out_channels == 128
    assert wide.eval()(_x(2)).shape == (2, 10)


def test_check_model_returns_validated_params_on_meta():
    params = check_model("resnet18", {"norm": "group", "groups": "16", "dropout": 0.1})
    assert params == {"norm": "group", "groups": 16, "dropout": 0.1, "shortcut": "projection",
                      "stem": "cifar", "width": 1.0}
    narrow = create_model("resnet18", {"width": 0.25, "norm": "group", "groups": 8})
    assert [narrow.layer1[0].conv1.out_channels, narrow.layer4[0].conv1.out_channels] == [16, 128]
    with pytest.raises(ConfigError, match=r"groups=32 must divide .*\(16, 32, 64, 128\)"):
        check_model("resnet18", {"width": 0.25, "norm": "group", "groups": 32})
    for name in ALL:
        assert check_model(name, {}) == MODELS.get(name).defaults()
    assert check_model("fastnet", {"width": 2.0}, num_classes=100)["width"] == 2.0


@pytest.mark.parametrize("name,params,match", [
    ("resnet18", {"dropout": 1.5}, "dropout"),
    ("resnet18", {"norm": "layer"}, "norm"),
    ("resnet18", {"groups": 0}, "groups"),
    ("resnet34", {"stem": "tiny"}, "stem"),
    ("lenet", {"activation": "sigmoid"}, "activation"),
    ("alexnet", {"width": 10}, "width"),
    ("fastnet", {"whiten": "maybe"}, "whiten"),
    ("fastnet", {"depth": 3}, "unknown parameter"),
    ("vgg99", {}, "unknown model"),
])
def test_check_model_rejects_bad_values(name, params, match):
    with pytest.raises(ConfigError, match=match):
        check_model(name, params)
    with pytest.raises(ConfigError, match=match):
        create_model(name, params)


def test_num_classes_validated():
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("lenet", num_classes=0)
    with pytest.raises(ConfigError, match="num_classes"):
        check_model("lenet", {}, num_classes=0)


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = create_model("resnet34")
    assert all(p.is_meta for p in model.parameters())


def _fastnet_with_trained_like_norms(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("fastnet", {"width": 0.25})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 2)
            module.running_var.uniform_(0.1, 9)
            module.bias.data.normal_(0, 1)
    return model.eval()


def test_fastnet_fold_for_inference_is_exact_and_removes_the_pooled_norms():
    model = _fastnet_with_trained_like_norms()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        note = model.fold_for_inference()
        after = model(x)
    assert note and "3 of 3" in note
    assert all(isinstance(b.norm1, nn.Identity) and b.conv1.bias is not None
               for b in (model.block1, model.block2, model.block3))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3  # only the norm2s remain
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_fastnet_fold_refuses_train_mode_and_negative_scales():
    model = _fastnet_with_trained_like_norms().train()
    assert model.fold_for_inference() is None and isinstance(model.block1.norm1, nn.BatchNorm2d)
    model.eval()
    with torch.no_grad():
        model.block2.norm1.weight[0] = -1.0  # then BN is decreasing in that channel: max-pool no longer commutes
    assert "2 of 3" in model.fold_for_inference()
    assert isinstance(model.block2.norm1, nn.BatchNorm2d)
    assert isinstance(model.block1.norm1, nn.Identity) and isinstance(model.block3.norm1, nn.Identity)


@pytest.mark.parametrize("name", ["resnet18", "lenet", "alexnet", "fastnet", "vit", "cait"])
def test_penultimate_features_are_what_the_head_maps_to_the_logits(name):
    model = create_model(name, {}).eval()
    x = torch.rand(3, 3, 32, 32)
    features = penultimate_features(model, x)
    head = classifier_head(model)
    assert features.shape == (3, head.in_features)
    with torch.no_grad():
        logits = model(x)
        from_features = head(features)
    scale = getattr(model, "scale", 1.0)  # fastnet scales its head's output
    assert torch.allclose(logits, from_features * scale, atol=1e-5)
