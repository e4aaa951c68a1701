"""ViT and CaiT (cifar_core/transformers.py): shapes, parameter counts, LayerScale, class attention,
invalid combinations, ONNX export with a dynamic batch, and a short real training (CPU, tiny models)."""
from __future__ import annotations

import pytest
import torch

from cifar_core.config import RunConfig
from cifar_core.models import MODELS, check_model, count_params, create_model
from cifar_core.params import ConfigError
from cifar_core.runs import RunStore
from cifar_core.engine import train_run
from cifar_core.models.transformers import (ClassAttentionBlock, LayerScale, architecture_summary)

TINY = {"embed_dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "drop_path": 0.0}
TINY_CAIT = {**TINY, "class_depth": 2}


def _x(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _meta(name, params):
    with torch.device("meta"):
        return create_model(name, params)


def test_registered_with_declared_params():
    assert {"vit", "cait"} <= set(MODELS.names())
    for name in ("vit", "cait"):
        entry = MODELS.get(name)
        assert "transformer" in entry.tags and entry.description
        declared = {p.name for p in entry.params}
        assert {"patch_size", "embed_dim", "depth", "heads", "mlp_ratio", "dropout", "drop_path",
                "tokenizer"} <= declared
        for p in entry.params:
            assert p.kind in ("choice", "bool") or (p.low is not None and p.high is not None), p.name
    assert {"pool"} <= {p.name for p in MODELS.get("vit").params}
    assert {"class_depth", "layer_scale_init"} <= {p.name for p in MODELS.get("cait").params}


@pytest.mark.parametrize("name", ["vit", "cait"])
@pytest.mark.parametrize("tokenizer", ["linear", "conv"])
@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_output_shape_for_each_patch_size(name, tokenizer, patch_size):
    params = {**(TINY_CAIT if name == "cait" else TINY), "patch_size": patch_size, "tokenizer": tokenizer}
    model = create_model(name, params, num_classes=7).eval()
    tokens = model.tokenizer(_x(3))
    assert tokens.shape == (3, (32 // patch_size) ** 2, 32)
    with torch.no_grad():
        assert model(_x(3)).shape == (3, 7)


@pytest.mark.parametrize("pool", ["cls", "gap", "seq"])
def test_vit_pooling_options(pool):
    model = create_model("vit", {**TINY, "pool": pool}).train()
    assert (model.cls_token is not None) == (pool == "cls")
    assert model.pos_embed.shape[1] == 64 + (pool == "cls")
    out = model(_x(4))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no unused parameter


def _block_params(d, hidden):
    attention = (3 * d * d + 3 * d) + (d * d + d)
    mlp = (d * hidden + hidden) + (hidden * d + d)
    return attention + mlp + 4 * d  # + two LayerNorms


def _vit_params(p, d, depth, ratio, classes, pool="cls"):
    hidden = int(round(d * ratio))
    tokens = (32 // p) ** 2 + (pool == "cls")
    return (3 * p * p * d + d) + tokens * d + (d if pool == "cls" else 0) \
        + depth * _block_params(d, hidden) + 2 * d + (d * classes + classes) + (d + 1 if pool == "seq" else 0)


def _cait_params(p, d, depth, class_depth, ratio, classes):
    hidden = int(round(d * ratio))
    class_block = (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + (d * hidden + hidden) \
        + (hidden * d + d) + 4 * d + 2 * d  # q, kv, proj, MLP, two LayerNorms, two LayerScales
    return (3 * p * p * d + d) + (32 // p) ** 2 * d + d + depth * (_block_params(d, hidden) + 2 * d) \
        + class_depth * class_block + 2 * d + (d * classes + classes)


@pytest.mark.parametrize("patch_size,pool", [(2, "cls"), (4, "gap"), (8, "seq"), (16, "cls")])
def test_vit_parameter_count_matches_formula(patch_size, pool):
    params = {"patch_size": patch_size, "embed_dim": 96, "depth": 3, "heads": 3, "mlp_ratio": 3.0, "pool": pool}
    assert count_params(_meta("vit", params)) == _vit_params(patch_size, 96, 3, 3.0, 10, pool)


def test_cait_parameter_count_matches_formula():
    params = {"patch_size": 4, "embed_dim": 64, "depth": 4, "class_depth": 2, "heads": 4, "mlp_ratio": 4.0}
    assert count_params(_meta("cait", params)) == _cait_params(4, 64, 4, 2, 4.0, 10)


def test_default_and_preset_sizes():
    assert count_params(_meta("vit", {})) == _vit_params(4, 192, 6, 2.0, 10) == 1_806_538
    assert count_params(_meta("cait", {})) == _cait_params(4, 192, 6, 2, 2.0, 10) == 2_403_466
    # the conv tokenizer replaces the 4x4 patch conv (3*16*192 + 192) by conv3x3 3->64 and 64->192
    conv = count_params(_meta("vit", {"tokenizer": "conv"}))
    assert conv - count_params(_meta("vit", {})) == (3 * 9 * 64 + 64 * 9 * 192) - (3 * 16 * 192 + 192)


@pytest.mark.parametrize("init", [1e-5, 0.1])
def test_layer_scale_initial_values(init):
    model = create_model("cait", {**TINY_CAIT, "layer_scale_init": init})
    scales = [m for m in model.modules() if isinstance(m, LayerScale)]
    # two per block (attention and MLP branch), self-attention and class-attention blocks alike
    assert len(scales) == 2 * (TINY_CAIT["depth"] + TINY_CAIT["class_depth"])
    for m in scales:
        assert m.gamma.shape == (32,) and m.gamma.requires_grad
        assert torch.equal(m.gamma.detach(), torch.full((32,), init))
    assert not any(isinstance(m, LayerScale) for m in create_model("vit", TINY).modules())


def test_class_token_joins_only_in_class_attention_layers():
    model = create_model("cait", {**TINY_CAIT, "patch_size": 8}).eval()
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = ([tuple(a.shape) for a in args], tuple(output.shape))
        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(record(f"sa{i}"))
    for i, block in enumerate(model.class_blocks):
        block.register_forward_hook(record(f"ca{i}"))
    with torch.no_grad():
        model(_x(2))
    for i in range(TINY_CAIT["depth"]):  # self-attention blocks: the 16 patch tokens, no class token
        assert seen[f"sa{i}"] == ([(2, 16, 32)], (2, 16, 32))
    for i in range(TINY_CAIT["class_depth"]):  # class attention: reads the patches, returns the class token
        assert seen[f"ca{i}"] == ([(2, 16, 32), (2, 1, 32)], (2, 1, 32))


def test_class_attention_updates_only_the_class_token():
    block = ClassAttentionBlock(16, 2, 32, 0.0, 0.0, layer_scale=1.0).eval()
    patches, cls = torch.randn(2, 9, 16), torch.randn(2, 1, 16)
    before = patches.clone()
    with torch.no_grad():
        out = block(patches, cls)
        # the class token's update depends on the patches (it attends to them) ...
        other = block(patches.flip(0), cls)
    assert out.shape == (2, 1, 16) and torch.equal(patches, before)
    assert not torch.allclose(out, other)
    # ... and every patch position contributes: permuting the patches leaves it unchanged
    with torch.no_grad():
        permuted = block(patches[:, torch.randperm(9)], cls)
    torch.testing.assert_close(out, permuted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params,match", [
    ("vit", {"patch_size": 3}, "patch_size 3 must divide the image size 32"),
    ("vit", {"patch_size": 5}, r"choose 2, 4, 8, 16"),
    ("cait", {"patch_size": 6}, "patch_size 6 must divide"),
    ("vit", {"embed_dim": 100, "heads": 3}, "embed_dim 100 is not divisible by heads 3"),
    ("cait", {"embed_dim": 192, "heads": 5}, "not divisible by heads 5"),
    ("vit", {"patch_size": 32}, "patch_size"),
    ("vit", {"pool": "max"}, "pool"),
    ("cait", {"tokenizer": "resnet"}, "tokenizer"),
    ("cait", {"class_depth": 0}, "class_depth"),
    ("cait", {"layer_scale_init": 0.0}, "layer_scale_init"),
    ("vit", {"drop_path": 0.9}, "drop_path"),
])
def test_invalid_combinations_rejected(name, params, match):
    with pytest.raises(ConfigError, match=match):
        check_model(name, params)
    with pytest.raises(ConfigError, match=match):
        RunConfig(model=name, model_params=params).validated()


def test_attention_uses_scaled_dot_product_attention(monkeypatch):
    import torch.nn.functional as F
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        create_model("cait", {**TINY_CAIT, "patch_size": 8}).eval()(_x(2))
    # (B, heads, queries, head_dim): 2 self-attention blocks over 16 tokens, 2 class-attention with 1 query
    assert calls == [(2, 2, 16, 16)] * 2 + [(2, 2, 1, 16)] * 2


def test_stochastic_depth_only_in_training():
    model = create_model("vit", {**TINY, "drop_path": 0.5})
    rates = [getattr(b.drop_path, "p", 0.0) for b in model.blocks]
    assert rates == [0.0, 0.5]  # rising linearly to drop_path at the last block
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(_x(2)), model(_x(2)))


def test_architecture_summary_names_the_tokenizer():
    params = check_model("vit", {"tokenizer": "conv", "pool": "seq"})
    assert "conv tokenizer" in architecture_summary("vit", params)
    assert "seq pooling" in architecture_summary("vit", params)
    assert "linear patch embedding" in architecture_summary("cait", check_model("cait", {}))
    assert architecture_summary("fastnet", {}) == "fastnet"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter we use
@pytest.mark.parametrize("name,params", [
    ("vit", {**TINY, "patch_size": 4}),
    ("vit", {**TINY, "pool": "seq", "tokenizer": "conv", "dropout": 0.1}),
    ("cait", {**TINY_CAIT, "tokenizer": "conv", "patch_size": 8}),
])
def test_onnx_export_dynamic_batch_parity(name, params, tmp_path):
    from cifar_core.data import load_sample
    from cifar_core.serve.export import check_parity, export_module
    torch.manual_seed(0)
    model = create_model(name, params).eval()
    path = export_module(model, tmp_path / f"{name}.onnx")
    report = check_parity(model, path, load_sample()[0][:7], single=7)  # batch 1 (x7) and batch 7
    assert report["batch_sizes"] == [1, 7]
    assert report["max_abs_diff_batch_1"] <= 1e-4 and report["max_abs_diff_batch_n"] <= 1e-4
    from cifar_core.serve.inference import Classifier
    for batch in (1, 7):
        assert Classifier(path).logits(load_sample()[0][:batch]).shape == (batch, 10)


def test_short_real_training_beats_chance(tmp_path, cifar_npz):
    cfg = RunConfig(
        model="vit", model_params={"patch_size": 4, "embed_dim": 64, "depth": 2, "heads": 2,
                                   "tokenizer": "linear", "pool": "gap", "drop_path": 0.0},
        subset="per_class", per_class=100, val_size=0, test_size=500, epochs=4, batch_size=50,
        optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine",
        schedule_params={"warmup_epochs": 0.5}, label_smoothing=0.1, grad_clip="norm", clip_max_norm=1.0,
        log_every=4, augment=[{"name": "random_crop"}, {"name": "hflip"}]).validated()
    record = train_run(cfg, RunStore(tmp_path), data_source=str(cifar_npz))
    assert record.state() == "completed", record.status()
    assert record.results()["test_acc"] > 0.2, record.results()["test_acc"]  # chance is 0.10
    rows = [r for r in record.read_metrics() if r["kind"] == "train"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
