"""Tests for cifar_core.augment (CPU, small synthetic batches)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar_core.augment import AUGMENTATIONS, AugmentChain, validate_chain
from cifar_core.params import ConfigError

NAMES = AUGMENTATIONS.names()
B = 8


def synthetic_images(n: int = B, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Structured images in [0, 1]: coloured gradients, stripes and a bright square per image."""
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    freq = torch.randint(1, 6, (n, 1, 1, 1), generator=g).float()
    img = 0.5 + 0.25 * torch.sin(freq * 6.28 * xx + phase) + 0.2 * (yy - 0.5)
    k = max(2, size // 4)
    pos = torch.randint(0, size - k, (n, 2), generator=g)
    r = torch.arange(size)
    top, left = pos[:, 0, None, None], pos[:, 1, None, None]
    sq = ((r[None, :, None] >= top) & (r[None, :, None] < top + k)
          & (r[None, None, :] >= left) & (r[None, None, :] < left + k))
    img = torch.where(sq[:, None], torch.rand(n, 3, 1, 1, generator=g), img)
    return img.clamp(0, 1).float()


def one_hot(n: int = B, seed: int = 0) -> torch.Tensor:
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(y, 10).float()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# parameters that make every op the identity (normalizers have no "strength")
ZERO = {
    "random_crop": {"padding": 0},
    "random_resized_crop": {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)},
    "zoom": {"zoom": (1.0, 1.0)},
    "rotation": {"degrees": 0},
    "translate": {"max_shift": 0.0},
    "brightness": {"strength": 0.0},
    "contrast": {"strength": 0.0},
    "saturation": {"strength": 0.0},
    "hue": {"strength": 0.0},
    "mean_blur": {"kernel_size": 1},
    "median_blur": {"kernel_size": 1},
    "gaussian_blur": {"kernel_size": 1},
    "bilateral_blur": {"kernel_size": 1},
    "cutout": {"size": 0},
    "mixup": {"alpha": 0.0},
    "cutmix": {"alpha": 0.0},
    "trivial_augment": {"strength": 0.0},
    "rand_augment": {"num_ops": 0},
    "random_erasing": {"scale": (0.0, 0.0)},
}
NORMALIZERS = {"per_image_standardization", "zca"}
# ops that change every image they are given: only their chain step's p (0) makes them the identity
MIRRORS = {"hflip", "vflip"}
# zca's fit is an eigendecomposition of a (3*H*W)^2 covariance: 8x8 images keep it instant
SIZE = {"zca": 8}


def images_for(name: str, n: int = B, seed: int = 0) -> torch.Tensor:
    return synthetic_images(n, size=SIZE.get(name, 32), seed=seed)


def build(name: str, params: dict | None = None, fit_on: torch.Tensor | None = None):
    op = AUGMENTATIONS.build(name, params or {})
    if op.needs_fit:
        op.fit(fit_on if fit_on is not None else images_for(name, 300, seed=99))
    return op


def test_every_entry_is_declared():
    assert set(NAMES) == set(ZERO) | NORMALIZERS | MIRRORS
    for e in AUGMENTATIONS.entries.values():
        assert e.description and e.tags, e.name
        assert set(e.tags) <= {"geometric", "color", "blur", "erase", "mix", "normalize"}
        e.validate({})  # defaults are valid


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_sampled(name):
    x, y = images_for(name), one_hot()
    op = build(name)
    out, y_out, sampled = op(x, y, gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if not op.normalizes:
        assert out.min() >= 0 and out.max() <= 1
    assert y_out.shape == y.shape
    assert torch.allclose(y_out.sum(1), torch.ones(B))
    for k, v in sampled.items():
        assert isinstance(v, torch.Tensor) and v.shape[0] == B, k
    assert torch.equal(x, images_for(name)), "input modified in place"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    x, y = images_for(name), one_hot()
    op = build(name)
    a, ya, sa = op(x, y, gen(5))
    b, yb, sb = op(x, y, gen(5))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if op.stochastic:
        c, _, _ = op(x, y, gen(6))
        assert not torch.equal(a, c)
    else:
        c, _, _ = op(x, y, gen(6))
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(ZERO))
def test_identity_at_zero_strength(name):
    x, y = images_for(name), one_hot()
    out, y_out, _ = build(name, ZERO[name])(x, y, gen(3))
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()
    assert torch.allclose(y_out, y)


@pytest.mark.parametrize("name", NAMES)
def test_records(name):
    x = images_for(name)
    params = {"fit_images": 300} if name == "zca" else {}
    chain = AugmentChain([{"name": name, "params": params}])
    chain.fit(images_for(name, 300, seed=99))
    out, y, records = chain(x, torch.arange(B) % 10, gen(2), record=True)
    assert len(records) == B
    keys = set(build(name)(x, one_hot(), gen(2))[2]) - {"applied"}
    for r in records:
        assert set(r) == {name}
        assert isinstance(r[name]["applied"], bool)
        assert keys <= set(r[name])
        for k in keys:
            assert isinstance(r[name][k], (int, float, bool, list)), (k, r[name][k])
    _, _, none = chain(x, None, gen(2))
    assert none is None


# ---------------------------------------------------------------- specific behaviour

@pytest.mark.parametrize("pad_mode,torch_mode", [("reflect", "reflect"), ("zero", "constant")])
def test_random_crop_matches_manual_crop(pad_mode, torch_mode):
    x = synthetic_images()
    out, _, s = build("random_crop", {"padding": 4, "pad_mode": pad_mode})(x, None, gen(4))
    padded = F.pad(x, (4, 4, 4, 4), mode=torch_mode)
    assert s["dx"].abs().max() <= 4 and s["dy"].abs().max() <= 4
    assert (s["dx"] != 0).any()
    for i in range(B):
        dy, dx = int(s["dy"][i]) + 4, int(s["dx"][i]) + 4
        assert torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])


def test_hflip_flips_exactly_recorded_images():
    x = synthetic_images(32)
    chain = AugmentChain(["hflip"])  # the step's p is the flip probability: 0.5 by default
    assert chain.specs == [{"name": "hflip", "params": {}, "p": 0.5}]
    out, _, rec = chain(x, None, gen(7), record=True)
    applied = torch.tensor([r["hflip"]["applied"] for r in rec])
    assert 0 < applied.sum() < 32
    expected = torch.where(applied[:, None, None, None], x.flip(-1), x)
    assert torch.equal(out, expected)
    # the images flipped are those of the step's coin, drawn once per image from the generator
    assert torch.equal(applied, torch.rand(32, generator=gen(7)) < 0.5)


def test_flips_have_one_probability():
    for name in ("hflip", "vflip"):
        assert AUGMENTATIONS.get(name).params == ()  # no p_flip: the chain step's p alone
    x = synthetic_images()
    out, _, _ = build("vflip")(x, None, gen(0))  # the op mirrors every image it is given
    assert torch.equal(out, x.flip(-2))
    out, _, _ = AugmentChain([{"name": "hflip", "p": 1.0}])(x, None, gen(0))
    assert torch.equal(out, x.flip(-1))
    # an old record's default flip (p_flip 0.5 inside a step of p 1) flips the same images as before:
    # the step's coin, drawn from the generator as the old op's was
    x = synthetic_images(32)
    spec = {"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}
    out, _, _ = AugmentChain([spec])(x, None, gen(3))
    flipped = torch.rand(32, generator=gen(3)) < 0.5
    assert torch.equal(out, torch.where(flipped[:, None, None, None], x.flip(-1), x))
    with pytest.raises(ConfigError, match=r"augment\[0\] hflip.p_flip: 2.0 is above the maximum"):
        validate_chain([{"name": "hflip", "params": {"p_flip": 2}}])


@pytest.mark.parametrize("spec, p", [
    ({"name": "hflip", "params": {"p_flip": 0.5}, "p": 1.0}, 0.5),   # a run record of an older version
    ({"name": "hflip", "params": {"p_flip": 0.5}}, 0.5),             # p absent: the old default 1
    ({"name": "vflip", "params": {"p_flip": 0.5}, "p": 0.5}, 0.25),  # both: one probability p · p_flip
    ({"name": "hflip", "params": {"p_flip": "1"}, "p": 0.3}, 0.3),
])
def test_older_flip_specs_with_p_flip_still_load(spec, p):
    (step,) = validate_chain([spec])
    assert step == {"name": spec["name"], "params": {}, "p": pytest.approx(p)}
    assert validate_chain([step]) == [step]


def test_zoom_differs_from_random_resized_crop():
    x = synthetic_images()
    z, _, sz = build("zoom")(x, None, gen(8))
    r, _, sr = build("random_resized_crop")(x, None, gen(8))
    assert not torch.allclose(z, r, atol=1e-3)
    assert set(sz) == {"zoom", "offset"} and set(sr) == {"scale", "ratio", "box"}
    # ramps along x (channel 0) and y (channel 1): zoom scales both slopes by the same 1/s,
    # random_resized_crop with a non-square ratio stretches the axes differently
    ramp = torch.arange(32.0) / 31
    img = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.zeros(32, 32)])
    img = img.expand(4, 3, 32, 32)
    zin, _, sz = build("zoom", {"zoom": (1.3, 1.9)})(img, None, gen(0))
    slope_x = zin[:, 0, :, 1:] - zin[:, 0, :, :-1]
    slope_y = zin[:, 1, 1:, :] - zin[:, 1, :-1, :]
    expect = (1 / (31 * sz["zoom"]))[:, None, None]
    assert torch.allclose(slope_x, expect.expand_as(slope_x), atol=1e-4)
    assert torch.allclose(slope_y, expect.expand_as(slope_y), atol=1e-4)
    rrc, _, sr = build("random_resized_crop", {"scale": (0.5, 0.5), "ratio": (2.0, 2.0)})(img, None, gen(0))
    ratio_of_slopes = (rrc[:, 1, 1:, :] - rrc[:, 1, :-1, :]).mean((1, 2)) / (
        rrc[:, 0, :, 1:] - rrc[:, 0, :, :-1]).mean((1, 2))
    cw, ch = sr["box"][:, 2], sr["box"][:, 3]
    assert torch.allclose(ratio_of_slopes, (ch - 1) / (cw - 1), rtol=1e-3)  # axes stretched unequally
    assert (ratio_of_slopes < 0.6).all()


def test_zoom_out_pads():
    x = torch.ones(4, 3, 32, 32)
    out, _, _ = build("zoom", {"zoom": (0.5, 0.5), "pad_mode": "zero"})(x, None, gen(0))
    black = (out.sum(1) < 1e-6).float().mean(dim=(1, 2))
    assert torch.allclose(black, torch.full((4,), 0.75), atol=0.1)


def test_random_resized_crop_box_inside_image():
    x = synthetic_images(64)
    _, _, s = build("random_resized_crop", {"scale": (0.05, 1.0), "ratio": (0.2, 5.0)})(x, None, gen(1))
    x0, y0, w, h = s["box"].unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 32 + 1e-4).all() and (y0 + h <= 32 + 1e-4).all()
    assert (s["scale"] <= 1 + 1e-6).all() and (s["scale"] >= 0.0).all()


def test_rotation_angle_range_and_effect():
    x = synthetic_images()
    out, _, s = build("rotation", {"degrees": 30})(x, None, gen(0))
    assert (s["angle"].abs() <= 30).all()
    assert not torch.allclose(out, x, atol=1e-3)
    # 180 degrees twice is (up to interpolation at exact pixel centres) the identity
    a = torch.full((B,), 180.0)
    from kornia.geometry.transform import rotate
    assert torch.allclose(rotate(rotate(x, a), a), x, atol=1e-4)


def test_translate_integer_shift():
    x = synthetic_images()
    out, _, s = build("translate", {"max_shift": 0.25, "pad_mode": "zero"})(x, None, gen(3))
    for i in range(B):
        dx, dy = int(s["dx"][i]), int(s["dy"][i])
        ref = torch.zeros_like(x[i])
        src = x[i, :, max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)]
        ref[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_color_factors_in_range():
    x = synthetic_images()
    for name in ("brightness", "contrast", "saturation"):
        _, _, s = build(name, {"strength": 0.3})(x, None, gen(0))
        assert ((s["factor"] >= 0.7) & (s["factor"] <= 1.3)).all()
    out, _, s = build("brightness", {"strength": 0.5})(x * 0.5, None, gen(0))
    assert torch.allclose(out, (x * 0.5 * s["factor"][:, None, None, None]).clamp(0, 1), atol=1e-6)
    _, _, s = build("hue", {"strength": 0.5})(x, None, gen(0))
    assert (s["shift"].abs() <= 0.5).all()


def test_per_image_standardization():
    x = synthetic_images()
    out, _, _ = build("per_image_standardization")(x, None, None)
    flat = out.reshape(B, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(B), atol=1e-5)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(B), atol=1e-4)
    # a constant image: std floor 1/sqrt(N) keeps it finite
    const, _, _ = build("per_image_standardization")(torch.full((2, 3, 32, 32), 0.3), None, None)
    assert torch.allclose(const, torch.zeros_like(const))


def test_zca_whitens():
    # small images so the covariance (48 x 48) is estimated well from 4000 samples
    g = gen(0)
    mix = torch.randn(48, 48, generator=g) * 0.1 + torch.eye(48)
    data = (torch.randn(4000, 48, generator=g) @ mix * 0.05 + 0.5).reshape(4000, 3, 4, 4)
    op = build("zca", {"epsilon": 1e-5, "fit_images": 4000}, fit_on=data)
    white, _, _ = op(data, None, None)
    flat = white.reshape(4000, -1)
    cov = torch.cov(flat.T)
    assert torch.allclose(flat.mean(0), torch.zeros(48), atol=1e-3)
    assert torch.allclose(torch.diagonal(cov), torch.ones(48), atol=0.02)
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() < 0.02
    # uint8 input is accepted by fit (converted chunk by chunk)
    op8 = build("zca", {"fit_images": 500}, fit_on=(synthetic_images(600, size=8) * 255).byte())
    assert op8.fitted and op8.matrix.shape == (192, 192)
    with pytest.raises(ValueError, match="fitted on images"):
        op8(synthetic_images(2), None, None)


def test_zca_unfitted_raises():
    op = AUGMENTATIONS.build("zca", {})
    with pytest.raises(RuntimeError, match="not fitted"):
        op(synthetic_images(2), None, None)
    chain = AugmentChain(["zca"])
    assert chain.normalizes and chain.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        chain(synthetic_images(2), None, gen(0))


def test_cutout_holes():
    x = torch.ones(B, 3, 32, 32)
    out, _, s = build("cutout", {"size": 8, "n_holes": 1})(x, None, gen(0))
    erased = (out == 0).all(1).float().sum(dim=(1, 2))
    cy, cx = s["center_y"][:, 0], s["center_x"][:, 0]
    side_y = (cy + 4).clamp(max=32) - (cy - 4).clamp(min=0)
    side_x = (cx + 4).clamp(max=32) - (cx - 4).clamp(min=0)
    expect = side_y * side_x
    assert torch.equal(erased, expect.float())
    mean_fill, _, _ = build("cutout", {"size": 8, "fill": "mean"})(x * 0.4, None, gen(0))
    assert torch.allclose(mean_fill, x * 0.4)


def test_mixup_labels():
    x, y = synthetic_images(16), one_hot(16)
    out, ym, s = build("mixup", {"alpha": 1.0})(x, y, gen(0))
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert sorted(s["partner"].tolist()) == list(range(16))
    lam = s["lam"][:, None, None, None]
    assert torch.allclose(out, lam * x + (1 - lam) * x[s["partner"]], atol=1e-6)
    assert torch.allclose(ym, s["lam"][:, None] * y + (1 - s["lam"][:, None]) * y[s["partner"]])


def test_cutmix_lam_matches_pasted_area():
    # every image is a constant equal to its index, so the pasted pixels are easy to count
    n = 32
    x = torch.arange(n).float()[:, None, None, None].expand(n, 3, 32, 32) / n
    y = one_hot(n)
    out, ym, s = build("cutmix", {"alpha": 1.0})(x, y, gen(0))
    assert torch.allclose(ym.sum(1), torch.ones(n))
    partner, lam, box = s["partner"], s["lam"], s["box"]
    x0, y0, x1, y1 = box.unbind(1)
    assert torch.allclose(lam, 1 - ((x1 - x0) * (y1 - y0)).float() / 1024)
    own = (out == x).all(1).float().mean(dim=(1, 2))
    moved = partner != torch.arange(n)
    assert moved.sum() > n // 2
    assert torch.allclose(own[moved], lam[moved], atol=1e-6)
    for i in torch.nonzero(moved).flatten().tolist():
        pasted = out[i, :, int(y0[i]):int(y1[i]), int(x0[i]):int(x1[i])]
        assert (pasted == x[int(partner[i]), 0, 0, 0]).all()
    assert torch.allclose(ym, lam[:, None] * y + (1 - lam[:, None]) * y[partner])


# ---------------------------------------------------------------- chain

def test_chain_p0_identity_and_p1_all_applied():
    x = synthetic_images(16)
    y = torch.arange(16) % 10
    c0 = AugmentChain([{"name": "rotation", "params": {"degrees": 30}, "p": 0.0},
                       {"name": "mixup", "p": 0.0}])
    out, ys, rec = c0(x, y, gen(0), record=True)
    assert torch.equal(out, x) and torch.equal(ys, F.one_hot(y, 10).float())
    assert not any(r[k]["applied"] for r in rec for k in r)
    c1 = AugmentChain([{"name": "rotation", "params": {"degrees": 30}, "p": 1.0}])
    out, _, rec = c1(x, y, gen(0), record=True)
    assert all(r["rotation"]["applied"] for r in rec)
    assert all(not torch.allclose(out[i], x[i], atol=1e-3) for i in range(16))


def test_chain_partial_p_applies_only_to_chosen():
    x = synthetic_images(64)
    chain = AugmentChain([{"name": "cutout", "params": {"size": 16}, "p": 0.5}])
    out, _, rec = chain(x, None, gen(1), record=True)
    applied = torch.tensor([r["cutout"]["applied"] for r in rec])
    assert 10 < applied.sum() < 54
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(changed, applied)
    assert all("center_y" in r["cutout"] for r, a in zip(rec, applied) if a)
    # batch-level op with p: only chosen images are mixed, soft labels stay normalized
    mix = AugmentChain([{"name": "mixup", "params": {"alpha": 1.0}, "p": 0.5}])
    out, ys, rec = mix(x, torch.arange(64) % 10, gen(2), record=True)
    applied = torch.tensor([r["mixup"]["applied"] for r in rec])
    assert torch.equal(out[~applied], x[~applied])
    assert torch.allclose(ys.sum(1), torch.ones(64))
    assert (ys[~applied].max(1).values == 1).all()


def test_chain_inputs_uint8_soft_and_determinism():
    x = synthetic_images(16)
    xu = (x * 255).round().byte()
    chain = AugmentChain(["random_crop", "hflip", "brightness", {"name": "cutmix", "p": 0.5}],
                         num_classes=10)
    a, ya, ra = chain(xu, torch.arange(16) % 10, gen(9), record=True)
    b, yb, rb = chain(xu.float() / 255, F.one_hot(torch.arange(16) % 10, 10).float(), gen(9), record=True)
    assert torch.equal(a, b) and torch.equal(ya, yb) and ra == rb
    assert a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    c, _, _ = chain(xu, torch.arange(16) % 10, gen(10))
    assert not torch.equal(a, c)
    y100, = chain(xu, torch.arange(16), gen(9), num_classes=100)[1:2]
    assert y100.shape == (16, 100)
    assert not chain.normalizes and AugmentChain(["per_image_standardization"]).normalizes


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_chain_fused_remaps_match_step_by_step(p):
    specs = [{"name": "random_crop", "params": {"pad_mode": "zero"}, "p": p},
             {"name": "hflip", "p": p},
             {"name": "random_crop", "params": {"padding": 2}, "p": p},
             {"name": "vflip", "p": p},
             {"name": "cutout", "p": p},
             {"name": "hflip", "p": p},
             {"name": "random_crop", "params": {"padding": 3, "pad_mode": "zero"}, "p": p}]
    x, y = synthetic_images(32), torch.arange(32) % 10
    fused, plain = AugmentChain(specs), AugmentChain(specs)
    plain._fuse = False
    a, ya, ra = fused(x, y, gen(3), record=True)
    b, yb, rb = plain(x, y, gen(3), record=True)
    assert torch.equal(a, b) and torch.equal(ya, yb) and ra == rb
    assert not torch.equal(a, x)


def test_chain_uint8_remaps_equal_float_path():
    # leading crops/flips run on uint8 pixels before the /255 conversion: same result as float
    x = (synthetic_images(16) * 255).round().byte()
    chain = AugmentChain([{"name": "random_crop", "params": {"pad_mode": "zero"}}, "hflip", "vflip"])
    a, _, _ = chain(x, None, gen(4))
    b, _, _ = chain(x.float() / 255, None, gen(4))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    empty, _, _ = chain(x[:0], None, gen(4))
    assert empty.dtype == torch.float32 and empty.shape == (0, 3, 32, 32)
    off, _, _ = AugmentChain([{"name": "hflip", "p": 0.0}])(x, None, gen(4))
    assert off.dtype == torch.float32 and torch.equal(off, x.float() / 255)


def test_chain_duplicate_steps_get_distinct_record_keys():
    chain = AugmentChain(["hflip", "hflip"])
    _, _, rec = chain(synthetic_images(), None, gen(0), record=True)
    assert set(rec[0]) == {"hflip", "hflip#2"}


def test_chain_fit_zca():
    chain = AugmentChain(["random_crop", {"name": "zca", "params": {"fit_images": 200}}])
    chain.fit((synthetic_images(300, size=8) * 255).byte())
    out, _, _ = chain(synthetic_images(size=8), None, gen(0))
    assert out.shape == (B, 3, 8, 8) and chain.normalizes and not chain.needs_fit
    # numpy NHWC uint8 (the data module's layout) is accepted too
    nhwc = (synthetic_images(300, size=8) * 255).byte().permute(0, 2, 3, 1).numpy()
    chain.fit(nhwc)
    assert chain.ops[1].matrix.shape == (192, 192)


# ---------------------------------------------------------------- validation

def test_validate_chain_fills_defaults_and_coerces():
    specs = validate_chain(["hflip", {"name": "rotation", "params": {"degrees": "30"}, "p": "0.5"},
                            {"name": "random_crop", "params": {"padding": 2.0}}])
    assert specs[0] == {"name": "hflip", "params": {}, "p": 0.5}
    assert specs[1] == {"name": "rotation", "params": {"degrees": 30.0, "pad_mode": "reflect"}, "p": 0.5}
    assert specs[2]["params"]["padding"] == 2 and isinstance(specs[2]["params"]["padding"], int)
    assert validate_chain([]) == []
    assert validate_chain(specs) == specs


@pytest.mark.parametrize("specs,message", [
    (["hflip", "hflip", {"name": "rotation", "params": {"degrees": 400}}],
     "augment[2] rotation.degrees: 400.0 is above the maximum 180"),
    ([{"name": "blurr"}], "augment[0] unknown augmentation 'blurr'"),
    ([{"name": "hflip", "p": 1.5}], "augment[0] hflip.p: 1.5 is above the maximum 1"),
    ([{"name": "hflip", "p": -0.1}], "augment[0] hflip.p: -0.1 is below the minimum 0"),
    ([{"name": "rotation", "params": {"angle": 3}}], "augment[0] rotation: unknown parameter(s) angle"),
    ([{"name": "mean_blur", "params": {"kernel_size": 4}}],
     "augment[0] mean_blur.kernel_size: 4 must be odd"),
    ([{"name": "zoom", "params": {"zoom": [1.5, 0.5]}}],
     "augment[0] zoom.zoom: low 1.5 is greater than high 0.5"),
    ([{"name": "hflip", "prob": 0.5}], "augment[0]: unknown key(s) prob"),
    ([{"params": {}}], "augment[0]: missing augmentation name"),
    ([42], "augment[0]: expected {name, params, p}"),
    ({"name": "hflip"}, "augment: expected a list of steps"),
    ("hflip", "augment: expected a list of steps"),
    (["per_image_standardization", "brightness"], "augment[1] brightness: colour steps clamp"),
])
def test_validate_chain_errors(specs, message):
    with pytest.raises(ConfigError) as err:
        validate_chain(specs)
    assert message in str(err.value)
    with pytest.raises(ConfigError):
        AugmentChain(specs)


def test_generator_must_be_cpu_and_sampled_on_cpu():
    x = synthetic_images()
    chain = AugmentChain(["rotation"])
    if torch.cuda.is_available():  # pragma: no cover - exercised only on GPU machines
        a, _, _ = chain(x, None, gen(0))
        b, _, _ = chain(x.cuda(), None, gen(0))
        assert torch.allclose(a, b.cpu(), atol=1e-4)
    class NotCpu:
        device = torch.device("cuda")
    with pytest.raises(ValueError, match="CPU"):
        chain(x, None, NotCpu())
