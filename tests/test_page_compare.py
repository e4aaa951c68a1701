"""The Compare page as people use W&B / TensorBoard / Aim (issue 13, app item 6), rendered with
Streamlit's AppTest over run records written by hand: many runs, groups with mean ± std, a pinned
baseline's deltas, best vs last validation accuracy, and tags and a note saved into the record."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.runs import RunStore, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
COMPARE_PAGE = str(REPO / "app_pages" / "3_Compare.py")


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("CIFAR_LAB_RUNS", str(root))
    monkeypatch.setattr(jobs, "ensure_worker", lambda store=None: False)  # nothing here may start training
    return RunStore(root)


def make_run(store: RunStore, run_id: str, *, test_acc: float = 0.9, val_accs=(0.5, 0.7, 0.6), seed: int = 0,
             lr: float = 0.05, loss_shift: float = 0.0, tags=(), note: str = "", created: float | None = None):
    """A completed run: 3 epochs of 10 steps, an eval per epoch, results.json."""
    cfg = RunConfig(model="lenet", epochs=len(val_accs), lr=lr, seed=seed).validated()
    record = store.create(cfg, run_id=run_id, state="queued")
    steps = 10 * len(val_accs)
    record.update_status(state="completed", created=created or time.time(), started=time.time() - 60,
                         finished=time.time() - 1, total_steps=steps, steps_per_epoch=10, step=steps,
                         best_val_acc=max(val_accs), test_acc=test_acc, params=1000)
    for step in range(1, steps + 1):
        record.append_metrics({"kind": "train", "step": step, "epoch": step / 10, "train_loss": 2.3 - step / 20
                               + loss_shift, "train_acc": step / 40, "lr": lr, "elapsed": step * 0.1})
        if step % 10 == 0:
            record.append_metrics({"kind": "eval", "step": step, "epoch": step / 10, "val_loss": 1.5 + loss_shift,
                                   "val_acc": val_accs[step // 10 - 1], "elapsed": step * 0.1 + 0.05})
    atomic_write_json(record.results_path, {"test_acc": test_acc, "balanced_acc": test_acc, "macro_f1": test_acc,
                                            "train_seconds": 59.0, "steps": steps})
    if tags or note:
        record.write_annotations(list(tags), note)
    return record


def app(runs: list[str] | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(COMPARE_PAGE, default_timeout=60)
    if runs:
        at.query_params["runs"] = ",".join(runs)
    return at.run()


def assert_ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def table(at, column: str):
    found = [df.value for df in at.dataframe if column in df.value.columns]
    assert found, f"no table with a {column!r} column"
    return found[0]


def texts(at) -> str:
    return "\n".join(str(el.value) for kind in ("warning", "error", "info", "success", "caption", "markdown")
                     for el in getattr(at, kind))


def test_more_than_ten_runs_can_be_picked(store):
    now = time.time()
    ids = [f"r{i:02d}" for i in range(14)]
    for i, rid in enumerate(ids):
        make_run(store, rid, test_acc=0.5 + i / 100, tags=("sweep",) if i % 2 else (), created=now - 100 + i)
    at = app()
    assert_ok(at)
    assert len(at.multiselect(key="cmp_runs").value) == 2
    at.button(key="cmp_pick_shown").click().run()  # no filter: every run is shown
    assert_ok(at)
    assert sorted(at.multiselect(key="cmp_runs").value) == ids
    assert len(table(at, "test acc %")) == 14
    at.multiselect(key="cmp_runs").set_value([]).run()
    at.multiselect(key="cmp_filter_tags").set_value(["sweep"]).run()  # the filter narrows the bulk pick
    at.button(key="cmp_pick_shown").click().run()
    assert_ok(at)
    assert sorted(at.multiselect(key="cmp_runs").value) == ids[1::2]
    assert len(table(at, "run id")) == 7


def test_grouping_by_tag_shows_mean_and_std(store):
    make_run(store, "a1", test_acc=0.80, tags=["lr-low"], seed=1)
    make_run(store, "a2", test_acc=0.90, tags=["lr-low"], seed=2, loss_shift=0.2)
    make_run(store, "b1", test_acc=0.70, tags=["lr-high"], lr=0.2)
    at = app(["a1", "a2", "b1"])
    assert_ok(at)
    at.selectbox(key="cmp_group").select("tag").run()
    assert_ok(at)
    groups = table(at, "group").set_index("group")
    assert groups.loc["lr-low", "n"] == 2 and groups.loc["lr-low", "test acc %"] == "85.00 ± 7.07"
    assert groups.loc["lr-high", "test acc %"] == "70.00"  # one run: no std
    assert groups.loc["lr-low", "val acc best %"] == "70.00 ± 0.00"
    specs = [el.proto.spec for el in at.get("vega_lite_chart")]
    assert any('"area"' in spec and '"hi"' in spec for spec in specs), "no mean ± std band"
    assert "band: ± one standard deviation" in texts(at)
    at.selectbox(key="cmp_group").select("same config, any seed").run()  # a1 and a2 differ only in seed
    assert_ok(at)
    assert sorted(table(at, "group")["n"]) == [1, 2]


def test_a_pinned_baseline_gives_deltas(store):
    make_run(store, "base", test_acc=0.90, val_accs=(0.6, 0.8, 0.7))
    make_run(store, "other", test_acc=0.85, val_accs=(0.5, 0.6, 0.65), lr=0.1)
    at = app(["other", "base"])
    assert_ok(at)
    at.selectbox(key="cmp_baseline").select("base").run()
    assert_ok(at)
    final = table(at, "Δ test acc (pp)").set_index("run")
    other = next(label for label in final.index if "(baseline)" not in label)
    base = next(label for label in final.index if "(baseline)" in label)
    assert final.loc[other, "Δ test acc (pp)"] == pytest.approx(-5.0)
    assert final.loc[other, "Δ val acc best (pp)"] == pytest.approx(-15.0)
    assert final.loc[other, "Δ val acc last (pp)"] == pytest.approx(-5.0)
    assert final.loc[base, "Δ test acc (pp)"] == 0.0
    diff = table(at, "key")
    assert "(baseline)" in diff.columns[1]  # the baseline is the diff's reference column


def test_best_and_last_validation_accuracy(store):
    make_run(store, "r1", val_accs=(0.5, 0.7, 0.6))
    make_run(store, "r2", val_accs=(0.4, 0.45, 0.55))
    at = app(["r1", "r2"])
    assert_ok(at)
    final = table(at, "test acc %")
    assert list(final["val acc best %"]) == pytest.approx([70.0, 55.0])
    assert list(final["val acc last %"]) == pytest.approx([60.0, 55.0])


def test_tags_and_note_are_edited_and_stored_in_the_record(store):
    make_run(store, "r1")
    make_run(store, "r2")
    at = app(["r1", "r2"])
    assert_ok(at)
    at.selectbox(key="cmp_ann_run").select("r2").run()
    at.text_input(key="cmp_tags_r2").input("seed-sweep, baseline").run()
    at.text_area(key="cmp_note_r2").input("lr 0.05 was too low").run()
    at.button(key="cmp_ann_save").click().run()
    assert_ok(at)
    ann = store.record("r2").annotations()
    assert ann.tags == ("seed-sweep", "baseline") and ann.note == "lr 0.05 was too low"
    assert "Saved for" in texts(at)
    assert "seed-sweep, baseline" in list(table(at, "test acc %")["tags"])
    at.text_input(key="cmp_tags_r2").input("fine, not ok!").run()
    at.button(key="cmp_ann_save").click().run()
    assert_ok(at)
    assert "invalid tag 'ok!'" in texts(at)
    assert store.record("r2").annotations().tags == ("seed-sweep", "baseline")  # nothing stored


def test_a_damaged_annotations_file_is_a_message(store):
    make_run(store, "r1")
    make_run(store, "r2")
    store.record("r1").annotations_path.write_text("{not json")
    at = app(["r1", "r2"])
    assert_ok(at)
    assert "annotations.json is unreadable" in texts(at)


def test_final_metrics_show_calibration_and_group_accuracies(store):
    from cifar_core.runs import read_json

    imbalanced = {"ece": 0.12, "group_acc": {"many": 0.95, "medium": 0.8, "few": 0.4}}
    for rid, extra in (("lt", imbalanced), ("lt2", {**imbalanced, "ece": 0.05}), ("old", {})):
        record = make_run(store, rid)
        atomic_write_json(record.results_path, {**read_json(record.results_path), **extra})
    at = app(["lt", "lt2", "old"])
    assert_ok(at)
    final = table(at, "ECE")
    assert list(final["ECE"].iloc[:2]) == pytest.approx([0.12, 0.05])
    assert final["ECE"].isna().iloc[2]  # older results: no ECE
    assert list(final["few-shot acc %"].iloc[:2]) == pytest.approx([40.0, 40.0])
    assert list(final["many-shot acc %"].iloc[:2]) == pytest.approx([95.0, 95.0])
    at.selectbox(key="cmp_baseline").select("lt").run()
    assert_ok(at)
    assert table(at, "Δ ECE")["Δ ECE"].iloc[1] == pytest.approx(-0.07)
    at.selectbox(key="cmp_group").select("same config, any seed").run()
    assert_ok(at)
    assert "ece" in table(at, "group").columns and "few-shot acc %" in table(at, "group").columns


def test_runs_without_the_new_metrics_do_not_get_empty_columns(store):
    make_run(store, "a")
    make_run(store, "b", lr=0.1)
    at = app(["a", "b"])
    assert_ok(at)
    columns = table(at, "test acc %").columns
    assert "ECE" not in columns and "few-shot acc %" not in columns
