"""The augmentation previewer (app_pages/5_Preview.py) through AppTest, plus its computing helpers.

Grids are kept small (2×2) except where the size matters. Without data the page falls back to the
bundled sample (and fits zca on it), which keeps these tests fast.
"""
from __future__ import annotations

import html
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
from cifar_core.config import parse_chain
from ui.forms import widget_kind

REPO = Path(__file__).resolve().parents[1]
PAGE = str(REPO / "app_pages" / "5_Preview.py")
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
    hflip_p = parse_chain("hflip")[0]["p"]  # no '@p': the step's default probability
    assert [(s["name"], s["p"]) for s in steps(at)] == [("rotation", 0.5), ("hflip", hflip_p)]
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


def test_mixing_coefficients_are_fixed_decimals(no_data):
    """Beta(0.05, 0.05) draws λ within 1e-6 of 0 or 1: never printed as '7.36e-07'."""
    at = page(grid="8×8", chain=[{"name": "mixup", "params": {"alpha": 0.05}}], state={"preview.all_rows": True})
    assert_clean(at)
    body = grids(at)["a"][0]
    titles = [html.unescape(t) for t in tile_titles(body)]
    lams = [re.search(r"λ(\S+)", t).group(1) for t in titles]
    assert len(lams) == 64 and all(re.fullmatch(r"(=[01]\.\d\d|<0\.01|>0\.99),?", x) for x in lams), lams
    assert any(x.startswith(("<", ">")) for x in lams)  # extreme draws are named as such
    assert "e-0" not in body


def test_lambda_text():
    assert ap.lambda_text(7.36e-07) == "λ<0.01"
    assert ap.lambda_text(0.99999) == "λ>0.99"
    assert ap.lambda_text(0.5312) == "λ=0.53"
    assert ap.lambda_text(0.0) == "λ=0.00" and ap.lambda_text(1.0) == "λ=1.00"
    assert ap.lambda_text(0.006) == "λ=0.01"


def test_captions_never_break_inside_a_word(no_data):
    """Each step's caption wraps only between words, on at most STEP_LINES lines (then an ellipsis;
    the whole line is its title), in a short form: no partner (its thumbnail is there), a single
    value without its name."""
    at = page(chain=[{"name": "rotation"}, {"name": "mixup", "params": {"alpha": 1.0}}])
    assert_clean(at)
    body = grids(at)["a"][0]
    assert "overflow-wrap:anywhere" not in body and "word-break:break" not in body
    captions_html = re.findall(r"<figcaption[^>]*>(.*?)</figcaption>", body)
    assert len(captions_html) == 4
    for cap in captions_html:
        lines = re.findall(r'<div title="([^"]*)" style="([^"]*)">([^<]*)</div>', cap)
        assert len(lines) == 2, cap  # one block per step
        for title, style, _ in lines:
            assert "overflow-wrap:normal" in style and "word-break:normal" in style
            assert f"-webkit-line-clamp:{ap.STEP_LINES}" in style and "overflow:hidden" in style
        (rot_title, _, rot_text), (mix_title, _, mix_text) = lines
        assert re.fullmatch(r"rotation -?[\d.]+", rot_text) and rot_title.startswith("rotation angle=")
        assert re.fullmatch(r"mixup λ(=[01]\.\d\d|&lt;0\.01|&gt;0\.99)", mix_text), mix_text
        assert html.unescape(mix_title).startswith("mixup partner=")  # the long form in the title


def test_default_grid_height_is_bounded_for_rotation_mixup_cutmix(no_data):
    chain = [{"name": "rotation"}, {"name": "mixup", "params": {"alpha": 1.0}}, {"name": "cutmix"}]
    at = page(grid="8×8", chain=chain)
    assert_clean(at)
    shown = len(tiles(grids(at)["a"][0]))
    rows = shown // 8
    assert shown % 8 == 0 and 1 <= rows < 8, shown
    assert ap.grid_height_px(rows, 3, 2, True, True) <= ap.MAX_GRID_PX
    assert ap.grid_height_px(rows + 1, 3, 2, True, True) > ap.MAX_GRID_PX  # as many rows as fit
    assert f"Showing {rows} of 8 rows ({shown} variants)" in captions(at)
    code = "\n".join(c.value for c in at.code)
    assert f"n, seed = {shown}, 0" in code  # the snippet reproduces what is shown
    at.toggle(key="preview.all_rows").set_value(True).run()
    assert_clean(at)
    assert len(tiles(grids(at)["a"][0])) == 64
    # the default chain (two steps, no mixing) keeps its whole 8×8 grid
    assert len(tiles(grids(page(grid="8×8"))["a"][0])) == 64


def test_grid_height_estimate_matches_the_drawn_cells():
    xs, ys, _ = ap.sample()
    specs = validate_chain([{"name": "rotation"}, {"name": "cutmix"}])
    v = ap.run_variants(ap.make_chain(specs), xs[0], int(ys[0]), 4, 0, xs, ys)
    body = ap.grid_html(v, 2, 2, True, partner_tiles=xs, source_tile=xs[0])
    # every size that makes up a cell's height is drawn explicitly, as tile_height_px counts it
    assert body.count(f"max-height:{ap.CAPTION_LINE_PX * ap.STEP_LINES}px") == 4 * 2  # 2 steps a tile
    assert body.count(f"max-height:{ap.CAPTION_LINE_PX}px") == 4  # the label weights line
    assert body.count(f"height:{ap.MIX_ROW_PX}px") == 4
    assert ap.tile_height_px(2, 2, True, True) == (64 + ap.MIX_BLOCK_PX + ap.CAPTION_TOP_PX
                                                   + 2 * ap.STEP_LINES * ap.CAPTION_LINE_PX)
    assert ap.bounded_rows(8, 2, 2, False, False) == 8
    assert ap.bounded_rows(8, 9, 6, True, True) == 2 and ap.bounded_rows(8, 40, 6, True, True) == 1  # never 0


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


def test_zca_on_the_training_set_is_capped_and_fitted_once(with_data, monkeypatch):
    """The first look at zca fits on at most PREVIEW_FIT_IMAGES training images (not the step's
    20,000), and reruns, other grids and another epsilon reuse that fit (st.cache_resource)."""
    calls = []
    original = ZCAOp.fit

    def counting_fit(self, x, *args, **kwargs):
        calls.append(self.fit_images)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(ZCAOp, "fit", counting_fit)
    at = page(chain=[{"name": "zca"}])
    assert_clean(at)
    text = captions(at)
    assert f"is fitted on the CIFAR-10 training set, {ap.PREVIEW_FIT_IMAGES:,} images (of the 20,000" in text
    assert calls in ([ap.PREVIEW_FIT_IMAGES], [])  # [] when an earlier test of this process fitted it
    code = "\n".join(c.value for c in at.code)
    assert f"chain.ops[0].fit_images = {ap.PREVIEW_FIT_IMAGES}" in code
    fitted = len(calls)
    at.run()
    at.number_input(key="preview.seed").set_value(3).run()
    uid = steps(at)[0]["uid"]
    at.select_slider(key=f"{EDITOR}.s{uid}.epsilon").set_value(0.1).run()
    assert_clean(at)
    assert "epsilon 0.1." in captions(at)
    assert len(calls) == fitted  # reused: no new fit for reruns, a new seed or a new epsilon
    assert at.toggle(key="preview.full_fit").value is False


def test_fit_count():
    assert ap.fit_count(20000, 50000) == ap.PREVIEW_FIT_IMAGES
    assert ap.fit_count(20000, 50000, full=True) == 20000
    assert ap.fit_count(20000, 200) == 200 and ap.fit_count(100, 50000) == 100


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
    train = AppTest.from_file(str(REPO / "app_pages" / "1_Train.py"), default_timeout=120)
    train.query_params["chain"] = value
    train.run()
    assert not train.exception
    assert [s["name"] for s in train.session_state["train.form.augment.__steps"]] == ["rotation", "cutout"]


def test_use_in_training_is_a_page_link_inside_the_app(no_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.session_state["preview.grid"] = "2×2"
    at.switch_page("app_pages/5_Preview.py").run()
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


def test_zca_fit_on_fewer_images_than_values_goes_through_the_gram_matrix():
    """k ≤ D images: the eigenpairs come from the k×k Gram matrix (the previewer's fast fit); the
    whitening matrix is the covariance route's, and another epsilon still needs no new decomposition."""
    x = (torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).byte()
    op = ZCAOp(1e-2, 150).fit(x, keep_eigenvectors=True)  # 150 images, 192 values each
    assert op.eigenvectors.shape[0] == 192 and op.eigenvectors.shape[1] < 150  # only the non-null directions
    idx = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:150].sort().values
    rows = x[idx].reshape(150, -1).double() / 255
    rows -= rows.mean(0)
    s, u = torch.linalg.eigh(rows.T @ rows / 149)
    expected = (u * (s.clamp_min(0) + 1e-2).rsqrt()) @ u.T
    torch.testing.assert_close(op.matrix.double(), expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(op.with_epsilon(0.3).matrix, ZCAOp(0.3, 150).fit(x).matrix)
