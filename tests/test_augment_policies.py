"""TrivialAugment, RandAugment and random erasing (cifar_core/augment_policies.py): per-image draws,
routing of each image's op and magnitude, ranges, identity settings, chain use (CPU, small batches)."""
from __future__ import annotations

import pytest
import torch

from cifar_core.augment import AUGMENTATIONS, AugmentChain
from cifar_core.augment.policies import OP_NAMES, RAND_AUGMENT_SPACE, TRIVIAL_AUGMENT_SPACE

B = 64


def images(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_registered_with_declarations():
    for name in ("trivial_augment", "rand_augment", "random_erasing"):
        entry = AUGMENTATIONS.get(name)
        assert entry.description and entry.tags
        assert entry.validate({}) == entry.defaults()
    assert set(AUGMENTATIONS.get("rand_augment").tags) == {"geometric", "color"}
    assert AUGMENTATIONS.validate("rand_augment", {}) == {"num_ops": 2, "magnitude": 9}


def _single(space, image, k, value):
    """Image-by-image reference: op k applied to one image with its own value."""
    return space[k].apply(image[None], value[None])[0].clamp(0, 1)


def test_trivial_augment_draws_per_image_and_routes_each_draw():
    x = images()
    out, _, sampled = AUGMENTATIONS.build("trivial_augment", {})(x, None, gen(3))
    ops, values = sampled["op"], sampled["magnitude"]
    assert ops.shape == values.shape == (B,)
    assert len(set(ops.tolist())) >= 8  # different images drew different ops in one batch
    for i in range(0, B, 5):
        expected = _single(TRIVIAL_AUGMENT_SPACE, x[i], int(ops[i]), values[i])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    unchanged = ops == OP_NAMES.index("identity")
    assert torch.equal(out[unchanged], x[unchanged])


@pytest.mark.parametrize("name,space", [("trivial_augment", TRIVIAL_AUGMENT_SPACE),
                                        ("rand_augment", RAND_AUGMENT_SPACE)])
def test_magnitudes_stay_in_each_ops_range(name, space):
    limits = {"shear_x": 0.99, "shear_y": 0.99, "translate_x": 32, "translate_y": 32, "rotate": 135,
              "brightness": 0.99, "color": 0.99, "contrast": 0.99, "sharpness": 0.99}
    if name == "rand_augment":
        limits = {**limits, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 150 / 331 * 32,
                  "translate_y": 150 / 331 * 32, "rotate": 30, "brightness": 0.9, "color": 0.9,
                  "contrast": 0.9, "sharpness": 0.9}
    params = {"num_ops": 4, "magnitude": 30} if name == "rand_augment" else {}
    _, _, sampled = AUGMENTATIONS.build(name, params)(images(256), None, gen(0))
    ops, values = sampled["op"].flatten(), sampled["magnitude"].flatten()
    for k, op in enumerate(space):
        v = values[ops == k]
        if op.name in limits:
            assert v.abs().max() <= limits[op.name] + 1e-6, op.name
        elif op.name == "posterize":
            assert v.min() >= (2 if name == "trivial_augment" else 4) and v.max() <= 8
        elif op.name == "solarize":
            assert v.min() >= 0 and v.max() <= 1
    if name == "rand_augment":  # a fixed magnitude at the top bin: every signed op at its maximum
        rotations = values[ops == OP_NAMES.index("rotate")]
        assert torch.allclose(rotations.abs(), torch.full_like(rotations, 30.0))
        assert (rotations > 0).any() and (rotations < 0).any()


def test_rand_augment_applies_each_images_ops_in_order():
    x = images(16)
    out, _, sampled = AUGMENTATIONS.build("rand_augment", {"num_ops": 2, "magnitude": 15})(x, None, gen(7))
    assert sampled["op"].shape == (16, 2)
    for i in range(16):
        first = _single(RAND_AUGMENT_SPACE, x[i], int(sampled["op"][i, 0]), sampled["magnitude"][i, 0])
        second = _single(RAND_AUGMENT_SPACE, first, int(sampled["op"][i, 1]), sampled["magnitude"][i, 1])
        torch.testing.assert_close(out[i], second, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,params", [("trivial_augment", {"strength": 0.0}),
                                         ("rand_augment", {"num_ops": 0}),
                                         ("random_erasing", {"scale": (0.0, 0.0)})])
def test_identity_settings(name, params):
    x = images()
    out, _, _ = AUGMENTATIONS.build(name, params)(x, None, gen(1))
    assert torch.equal(out, x)


def test_trivial_augment_strength_shrinks_magnitudes():
    x = images(256)
    _, _, full = AUGMENTATIONS.build("trivial_augment", {"strength": 1.0})(x, None, gen(2))
    _, _, half = AUGMENTATIONS.build("trivial_augment", {"strength": 0.5})(x, None, gen(2))
    rotate = full["op"] == OP_NAMES.index("rotate")
    assert torch.equal(full["op"], half["op"])  # same draws, scaled magnitudes
    torch.testing.assert_close(half["magnitude"][rotate], full["magnitude"][rotate] / 2)


@pytest.mark.parametrize("value", ["zero", "mean", "random"])
def test_random_erasing_box(value):
    x = images()
    out, _, sampled = AUGMENTATIONS.build("random_erasing", {"value": value})(x, None, gen(4))
    box, area = sampled["box"], sampled["area"]
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32).all() and (y0 + h <= 32).all()
    assert (area > 0).all() and (area <= 0.5).all()
    for i in range(0, B, 7):
        a, b, bw, bh = (int(v) for v in box[i])
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[b:b + bh, a:a + bw] = True
        assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
        erased = out[i][:, inside]
        if value == "zero":
            assert not erased.any()
        elif value == "mean":
            torch.testing.assert_close(erased, x[i].mean((1, 2))[:, None].expand_as(erased))
        else:
            assert not torch.equal(erased, x[i][:, inside])


def test_chain_with_policies_is_seeded_and_records():
    chain = AugmentChain([{"name": "random_crop"}, {"name": "trivial_augment"},
                          {"name": "random_erasing", "p": 0.5}])
    x = (images(8) * 255).to(torch.uint8)
    a, _, records = chain(x, torch.arange(8), gen(9), record=True)
    b, _, _ = chain(x, torch.arange(8), gen(9))
    assert torch.equal(a, b)
    assert all(isinstance(r["trivial_augment"]["op"], int) for r in records)
    erased = [r["random_erasing"]["applied"] for r in records]
    assert any(erased) and not all(erased)
