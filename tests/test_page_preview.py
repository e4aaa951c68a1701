"""The augmentation previewer (pages/5_Preview.py) through AppTest, plus its computing helpers.

Grids are kept small (2×2) except where the size matters. Without data the page falls back to the
bundled sample (and fits zca on it), which keeps these tests fast.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote

import numpy as np
import pytest
import torch
from PIL import Image


from streamlit.testing.v1 import AppTest

from cifar_core.augment import AUGMENTATIONS, ZCAOp, validate_chain
from cifar_core.augment import preview as ap
from ui.forms import widget_kind

REPO = Path(__file__).resolve().parents[1]
PAGE = str(REPO / "pages" / "5_Preview.py")
EDITOR = "preview.a"


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(tmp_path / "missing.npz"))
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "empty"))
    from ui.common import clear_data_status
    clear_data_status()


@pytest.fixture
def with_data(cifar_npz, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    from ui.common import clear_data_status
    clear_data_status()


def page(grid: str = "2×2", state: dict | None = None, **query) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=180)
    at.session_state["preview.grid"] = grid
    for k, v in (state or {}).items():
        at.session_state[k] = v
    for k, v in query.items():
        at.query_params[k] = v if isinstance(v, str) else json.dumps(v)
    return at.run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    # ConfigErrors may be shown (they are messages for the user); anything else is a bug
    unexpected = [e.value for e in at.error if " failed: " in e.value or "Traceback" in e.value]
    assert not unexpected, unexpected


def grids(at: AppTest) -> dict[str, str]:
    """The HTML of each grid on the page, by chain letter ('a', 'b'), last one wins per letter."""
    out = {}
    for h in at.get("html"):
        m = re.search(r'class="pv-grid pv-grid-(\w)"', h.proto.body)
        if m:
            out.setdefault(m.group(1), [])
            out[m.group(1)].append(h.proto.body)
    return out


def tiles(body: str) -> list[str]:
    """The variant tiles' image sources."""
    return re.findall(r'<img src="(data:image/png;base64,[^"]+)" width="\d+" height="\d+" alt="variant', body)


def tile_titles(body: str) -> list[str]:
    return re.findall(r'alt="variant \d+" title="([^"]*)"', body)


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def steps(at: AppTest, key: str = EDITOR) -> list[dict]:
    return at.session_state[f"{key}.__steps"]


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

def test_default_page_renders_a_grid_with_parameters(no_data):
    at = page(grid="8×8")
    assert_clean(at)
    assert [t.value for t in at.title] == ["Augmentation previewer"]
    body = grids(at)["a"][0]
    assert len(tiles(body)) == 64
    titles = tile_titles(body)
    assert len(titles) == 64 and all("random_crop dy=" in t for t in titles)
    assert "hflip" in body
    assert any("original, 32×32" in el.captions for el in at.image)
    assert any("AugmentChain(" in c.value and "manual_seed(seed)" in c.value for c in at.code)


def test_enlarged_tiles_are_nearest_neighbour(no_data):
    at = page(grid="2×2", state={"preview.scale": 4})
    data = tiles(grids(at)["a"][0])[0].split(",", 1)[1]
    import base64
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert img.shape == (128, 128, 3)
    blocks = img.reshape(32, 4, 32, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every 4×4 block is one pixel


def _extreme(param, which: str):
    if param.kind == "bool":
        return which == "high"
    if param.kind == "choice":
        return param.choices[0] if which == "low" else param.choices[-1]
    if param.kind == "str":
        return param.default
    bound = param.low if which == "low" else param.high
    if param.kind == "float_pair":
        return (float(bound), float(bound))
    return int(bound) if param.kind == "int" else float(bound)


def _set_widget(at: AppTest, param, key: str, value) -> None:
    kind = widget_kind(param)
    if kind in ("slider", "range"):
        at.slider(key=key).set_value(tuple(value) if kind == "range" else value)
    elif kind == "log":
        at.select_slider(key=key).set_value(value)
    elif kind == "number":
        at.number_input(key=key).set_value(value)
    elif kind == "select":
        at.selectbox(key=key).set_value(value)
    elif kind == "checkbox":
        at.checkbox(key=key).set_value(value)
    elif kind == "pair":
        at.number_input(key=f"{key}.low").set_value(value[0])
        at.number_input(key=f"{key}.high").set_value(value[1])
    else:
        at.text_input(key=key).set_value(value)


def expected_tiles(at: AppTest, grid: int = 4) -> int:
    """A chain that draws nothing and always applies shows one variant; any other the whole grid."""
    chain = ap.make_chain(validate_chain([{k: s[k] for k in ("name", "params", "p")} for s in steps(at)]))
    return 1 if ap.is_deterministic(chain) else grid


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_augmentation_at_defaults_and_range_extremes(no_data, name):
    """Whatever the registry holds: defaults, then every parameter (and p) at its low extreme, then
    at its high extreme, set through the generated controls."""
    entry = AUGMENTATIONS.get(name)
    at = page(chain=[{"name": name}])
    assert_clean(at)
    assert [s["name"] for s in steps(at)] == [name]
    assert len(tiles(grids(at)["a"][0])) == expected_tiles(at), "defaults must render a grid"
    uid = steps(at)[0]["uid"]
    for which in ("low", "high"):
        for param in entry.params:
            _set_widget(at, param, f"{EDITOR}.s{uid}.{param.name}", _extreme(param, which))
        at.slider(key=f"{EDITOR}.s{uid}.p").set_value(0.0 if which == "low" else 1.0)
        at.run()
        assert_clean(at)
        if not [e for e in at.error]:  # a combination the op refuses is reported, not drawn
            body = grids(at)["a"][0]
            assert len(tiles(body)) == expected_tiles(at), (name, which)
            if which == "low":  # p = 0: the step never applies
                assert all(f"{name}: –" in t for t in tile_titles(body)), (name, tile_titles(body)[:1])


def test_unknown_or_bad_chain_in_the_link_is_a_message(no_data):
    at = page(chain='[{"name": "no_such_op"}]')
    assert_clean(at)
    assert any("no_such_op" in e.value for e in at.error)
    at = page(chain="[not json")
    assert_clean(at)
    assert any("not valid JSON" in e.value for e in at.error)


def test_cli_style_chain_in_the_link(no_data):
    at = page(chain="rotation:degrees=30@0.5;hflip")
    assert_clean(at)
    assert [(s["name"], s["p"]) for s in steps(at)] == [("rotation", 0.5), ("hflip", 1.0)]
    assert at.number_input(key=f"{EDITOR}.s{steps(at)[0]['uid']}.degrees").value == 30.0


def test_seed_is_reproducible_and_reroll_changes_it(no_data):
    at = page(chain=[{"name": "rotation", "params": {"degrees": 45}}])
    first = tiles(grids(at)["a"][0])
    at.run()
    assert tiles(grids(at)["a"][0]) == first  # same seed, same images
    at.number_input(key="preview.seed").set_value(7).run()
    assert tiles(grids(at)["a"][0]) != first
    at.button(key="preview.reroll").click().run()
    assert_clean(at)
    assert at.number_input(key="preview.seed").value != 7


def test_slider_change_changes_the_grid(no_data):
    at = page(chain=[{"name": "rotation", "params": {"degrees": 10}}])
    before = tiles(grids(at)["a"][0])
    uid = steps(at)[0]["uid"]
    at.number_input(key=f"{EDITOR}.s{uid}.degrees").set_value(90.0).run()
    assert_clean(at)
    after = tiles(grids(at)["a"][0])
    assert len(after) == 4 and after != before


def test_sample_class_index_and_random(no_data):
    at = page()
    at.selectbox(key="preview.sample.class").set_value("ship").run()
    at.slider(key="preview.sample.index").set_value(5).run()
    assert_clean(at)
    assert any(s.value.startswith("ship · sample image 5 of its class") for s in at.subheader)
    at.button(key="preview.sample.random").click().run()
    assert_clean(at)
    assert len(tiles(grids(at)["a"][0])) == 4


def test_dataset_source_with_data(with_data):
    at = page(state={"preview.source": "dataset"})
    assert_clean(at)
    assert not at.warning
    assert any(re.match(r"cat · test image #[\d,]+$", s.value) for s in at.subheader), [s.value for s in at.subheader]
    at.radio(key="preview.data.split").set_value("train").run()
    at.number_input(key="preview.data.index").set_value(4999).run()  # the last cat of the training set
    assert_clean(at)
    assert any(re.match(r"cat · train image #[\d,]+$", s.value) for s in at.subheader)
    at.radio(key="preview.data.split").set_value("test").run()  # 4999 is out of range there: clamped
    assert_clean(at)
    assert at.number_input(key="preview.data.index").value == 999
    at.button(key="preview.data.random").click().run()
    assert_clean(at)
    code = "\n".join(c.value for c in at.code)
    assert "load_cifar10()" in code and "data.x_" in code


def test_dataset_source_without_data_falls_back_to_the_sample(no_data):
    at = page(state={"preview.source": "dataset"})
    assert_clean(at)
    warning = "\n".join(w.value for w in at.warning)
    assert "CIFAR-10 not found" in warning and "bundled sample instead" in warning
    assert len(tiles(grids(at)["a"][0])) == 4


def test_mixup_and_cutmix_show_partner_and_label_weights(no_data):
    at = page(chain=[{"name": "mixup", "params": {"alpha": 1.0}}, {"name": "cutmix", "p": 0.5}])
    assert_clean(at)
    body = grids(at)["a"][0]
    titles = tile_titles(body)
    assert all("mixup partner=" in t and "λ=" in t and "labels: " in t for t in titles), titles[0]
    assert body.count('title="mixup partner: ') == 4  # a partner thumbnail under every tile
    assert "of the label stays 'cat'" in captions(at)


def test_per_image_standardization_shows_the_value_range(no_data):
    at = page(chain=["per_image_standardization"])
    assert_clean(at)
    text = captions(at)
    assert "Values after the chain" in text
    m = re.search(r"per-tile mean (-?[\d.]+) … (-?[\d.]+), std ([\d.]+) … ([\d.]+)", text)
    assert m and abs(float(m.group(1))) < 1e-3 and abs(float(m.group(3)) - 1) < 1e-3, text


def test_colour_steps_show_histograms(no_data):
    at = page(chain=[{"name": "brightness", "params": {"strength": 0.5}}])
    assert_clean(at)
    assert "Per-channel histograms" in captions(at)
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    at = page(chain=["hflip"])
    assert "Per-channel histograms" not in captions(at)


def test_zca_fitted_on_the_sample_without_data(no_data):
    at = page(chain=[{"name": "zca", "params": {"fit_images": 100}}])
    assert_clean(at)
    text = captions(at)
    assert "is fitted on the bundled sample (CIFAR-10 was not found), 100 images" in text, text
    assert "weights feeding the centre pixel" in text
    code = "\n".join(c.value for c in at.code)
    assert "chain.fit(xs)" in code


def test_zca_fitted_on_the_training_set_with_data(with_data):
    at = page(chain=[{"name": "zca", "params": {"fit_images": 100, "epsilon": 0.1}}])
    assert_clean(at)
    assert "is fitted on the CIFAR-10 training set, 100 images" in captions(at)
    assert "chain.fit(load_cifar10().x_train)" in "\n".join(c.value for c in at.code)


def test_comparison_mode_same_images_and_seed(no_data):
    at = page(chain=[{"name": "zoom"}], compare=[{"name": "random_resized_crop"}])
    assert_clean(at)
    assert at.toggle(key="preview.compare").value is True
    found = grids(at)
    assert set(found) == {"a", "b"}
    a, b = tile_titles(found["a"][0]), tile_titles(found["b"][0])
    assert all("zoom zoom=" in t for t in a) and all("random_resized_crop scale=" in t for t in b)
    assert len([c for c in at.code if "AugmentChain(" in c.value]) == 2
    # the same chain on both sides gives the same tiles: same images, same seed
    uid = steps(at, "preview.b")[0]["uid"]
    at.button(key=f"preview.b.s{uid}.remove").click().run()
    at.selectbox(key="preview.b.__add_choice").set_value("zoom").run()
    at.button(key="preview.b.__add").click().run()
    assert_clean(at)
    found = grids(at)
    assert tiles(found["a"][0]) == tiles(found["b"][0])


def test_comparison_toggle_and_example(no_data):
    at = page()
    at.toggle(key="preview.compare").set_value(True).run()
    assert_clean(at)
    assert set(grids(at)) == {"a", "b"}
    at.button(key="preview.example").click().run()
    assert_clean(at)
    assert [s["name"] for s in steps(at, "preview.a")] == ["zoom"]
    assert [s["name"] for s in steps(at, "preview.b")] == ["random_resized_crop"]


def _jpeg(size=(120, 80)) -> bytes:
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((30, 30, 200), (size[0] // 2, 0, size[0], size[1]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_upload_path(no_data):
    at = page()
    at.radio(key="preview.source").set_value("upload").run()
    assert_clean(at)
    assert any("Upload one or more images" in i.value for i in at.info)
    good = _jpeg()
    bad = good[: len(good) // 3]
    at.file_uploader(key="preview.upload").set_value([("photo.jpg", good, "image/jpeg"),
                                                       ("broken.jpg", bad, "image/jpeg")]).run()
    assert_clean(at)
    assert any(e.value.startswith("broken.jpg: the image data is truncated or corrupt") for e in at.error)
    md = "\n".join(m.value for m in at.markdown)
    assert "How it was reduced" in md and "120×80 → resized 48×32 → centre crop 32×32" in md
    assert any(s.value == "photo.jpg (your image)" for s in at.subheader)
    assert len(tiles(grids(at)["a"][0])) == 4
    code = "\n".join(c.value for c in at.code)
    assert "read_image('photo.jpg').tile, 10" in code and "num_classes=11" in code


def test_several_uploads_pick_which_to_augment(no_data):
    at = page(state={"preview.source": "upload"})
    files = [(f"img{i}.jpg", _jpeg((40 + i, 40)), "image/jpeg") for i in range(3)]
    at.file_uploader(key="preview.upload").set_value(files).run()
    assert_clean(at)
    assert at.multiselect(key="preview.upload.pick").value == ["img0.jpg"]
    at.multiselect(key="preview.upload.pick").set_value(["img0.jpg", "img2.jpg"]).run()
    assert_clean(at)
    assert len(grids(at)["a"]) == 2
    # two files with the same name stay apart
    at.file_uploader(key="preview.upload").set_value(files + [("img0.jpg", _jpeg((60, 40)), "image/jpeg")]).run()
    assert_clean(at)
    assert at.multiselect(key="preview.upload.pick").options == ["img0.jpg", "img1.jpg", "img2.jpg", "img0.jpg (2)"]


def test_use_in_training_link_round_trips_to_the_train_page(no_data, tmp_path, monkeypatch):
    chain = [{"name": "rotation", "params": {"degrees": 30.0}, "p": 0.5}, {"name": "cutout"}]
    at = page(chain=chain)
    assert_clean(at)
    link = next(m.value for m in at.markdown if "in training](Train?chain=" in m.value)
    value = unquote(link.split("Train?chain=", 1)[1].rstrip(")"))
    assert validate_chain(json.loads(value)) == validate_chain(chain)
    # the Train page reads that value into its form
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(tmp_path / "runs"))
    train = AppTest.from_file(str(REPO / "pages" / "1_Train.py"), default_timeout=120)
    train.query_params["chain"] = value
    train.run()
    assert not train.exception
    assert [s["name"] for s in train.session_state["train.form.augment.__steps"]] == ["rotation", "cutout"]


def test_use_in_training_is_a_page_link_inside_the_app(no_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.session_state["preview.grid"] = "2×2"
    at.switch_page("pages/5_Preview.py").run()
    assert_clean(at)
    links = [el for el in at.get("page_link") if "in training" in el.proto.label]
    assert links, [el.proto.label for el in at.get("page_link")]
    query = parse_qs(links[0].proto.query_string)
    assert validate_chain(json.loads(query["chain"][0]))[0]["name"] == "random_crop"


# ---------------------------------------------------------------------------------------------
# the helpers
# ---------------------------------------------------------------------------------------------

def test_snippet_reproduces_the_grid():
    """The code shown on the page gives exactly the page's variants and records."""
    specs = validate_chain([{"name": "random_crop"}, {"name": "rotation", "params": {"degrees": 20}},
                            {"name": "mixup", "params": {"alpha": 0.4}, "p": 0.5}])
    source = ap.sample_source(42)
    xs, ys, _ = ap.sample()
    v = ap.run_variants(ap.make_chain(specs), source.tile, source.label, 9, 123, xs, ys)
    code = ap.code_snippet(specs, source, 9, 123, mixing=True, fit_line=None)
    scope: dict = {}
    exec(compile(code, "<snippet>", "exec"), scope)  # noqa: S102 (our own generated code)
    np.testing.assert_array_equal(scope["out"].numpy(), v.out)
    assert scope["records"] == v.records
    np.testing.assert_allclose(scope["soft_labels"].numpy(), v.soft[:, :10], atol=1e-7)


def test_variants_are_one_batched_call_with_a_partner_pool():
    xs, ys, _ = ap.sample()
    chain = ap.make_chain(validate_chain(["cutmix"]))
    v = ap.run_variants(chain, xs[0], int(ys[0]), 16, 0, xs, ys)
    assert v.out.shape == (16, 3, 32, 32) and len(v.records) == 16 and len(v.pool) == 48
    assert v.soft.shape == (16, ap.NUM_CLASSES)
    np.testing.assert_allclose(v.soft.sum(1), 1.0, atol=1e-6)
    no_mix = ap.run_variants(ap.make_chain(validate_chain(["hflip"])), xs[0], int(ys[0]), 16, 0, xs, ys)
    assert len(no_mix.pool) == 0


def test_zca_epsilon_change_reuses_the_decomposition():
    x = (torch.rand(300, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).byte()
    base = ZCAOp(1e-2, 200).fit(x, keep_eigenvectors=True)
    fresh = ZCAOp(0.3, 200).fit(x)
    assert torch.equal(base.with_epsilon(0.3).matrix, fresh.matrix)
    assert fresh.eigenvectors is None and base.fit_count == 200
    with pytest.raises(RuntimeError):
        fresh.with_epsilon(0.1)
