"""Verdicts (cifar_core.experiments.verdicts) on constructed study results: held, did not hold, and too
few finished runs, for each study kind."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cifar_core.data import CLASSES
from cifar_core.experiments import verdicts
from cifar_core.experiments.verdicts import HELD, NOT_HELD, TOO_FEW
from cifar_core.params import ConfigError


def frame(rows: list[dict], kind: str, cell_keys: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df.attrs.update(kind=kind, cell_keys=cell_keys, study_id="s")
    return df


def run(cell: dict, seed: int, acc: float | None, state: str = "completed", **extra) -> dict:
    done = state == "completed" and acc is not None
    return {**cell, "seed": seed, "run_id": f"r{seed}-{len(cell)}-{acc}", "state": state,
            "test_acc": acc if done else math.nan, "balanced_acc": acc if done else math.nan, **extra}


# ---- the difference and its interval ----------------------------------------------------------------

def test_difference_is_a_t_interval_over_seeds():
    diff = verdicts.difference([0.10, 0.12, 0.14])
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    assert diff.mean == pytest.approx(0.12) and diff.std == pytest.approx(0.02) and diff.n == 3
    assert (diff.low, diff.high) == (pytest.approx(0.12 - half), pytest.approx(0.12 + half))
    assert diff.above_zero
    assert "+12.0 ± 2.0 pts" in diff.text() and "3 seeds" in diff.text()
    assert not verdicts.difference([0.05, -0.03, 0.04]).above_zero  # the interval reaches below zero
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        verdicts.difference([0.1])


# ---- bn_vs_gn ---------------------------------------------------------------------------------------

def bn_frame(acc: dict, seeds=(0, 1, 2), noise=(0.0, 0.01, -0.01), missing=()) -> pd.DataFrame:
    """acc: {(norm, batch): accuracy}; each seed adds its noise; `missing` cells × seeds stay queued."""
    rows = []
    for seed, eps in zip(seeds, noise):
        for (norm, batch), a in acc.items():
            state = "queued" if (norm, batch, seed) in missing else "completed"
            rows.append(run({"norm": norm, "batch_size": batch}, seed, a + eps, state))
    return frame(rows, "bn_vs_gn", ["norm", "batch_size"])


def test_bn_vs_gn_held():
    df = bn_frame({("batch", 2): 0.20, ("batch", 4): 0.28, ("batch", 64): 0.40,
                   ("group", 2): 0.36, ("group", 4): 0.36, ("group", 64): 0.37})
    v = verdicts.verdict(df)
    assert v.outcome == HELD and v.held
    assert "batch 64 to batch 2" in v.summary and "+20.0" in v.summary and "+1.0" in v.summary
    assert [r["mean (pts)"] for r in v.rows] == [pytest.approx(20.0), pytest.approx(1.0), pytest.approx(19.0)]
    assert all(r["seeds"] == 3 for r in v.rows)


def test_bn_vs_gn_not_held_when_both_norms_degrade_alike():
    """GroupNorm at batch 2 loses 17, 23 and 20 points: as much as BatchNorm's 20."""
    df = bn_frame({("batch", 2): 0.20, ("batch", 64): 0.40, ("group", 2): 0.21, ("group", 64): 0.40})
    df.loc[(df["norm"] == "group") & (df["batch_size"] == 2), "test_acc"] = [0.23, 0.17, 0.20]
    v = verdicts.verdict(df)
    assert v.outcome == NOT_HELD and "not clearly more than GroupNorm's" in v.summary


def test_bn_vs_gn_not_held_when_batchnorm_does_not_degrade():
    df = frame([run({"norm": n, "batch_size": b}, s, a)
                for s, shift in enumerate((0.03, -0.04, 0.02))
                for n, b, a in (("batch", 2, 0.40 + shift), ("batch", 64, 0.40), ("group", 2, 0.40),
                                ("group", 64, 0.40))], "bn_vs_gn", ["norm", "batch_size"])
    v = verdicts.verdict(df)
    assert v.outcome == NOT_HELD and "did not grow beyond the seed noise" in v.summary


def test_bn_vs_gn_too_few_says_how_many_more():
    acc = {("batch", 2): 0.2, ("batch", 64): 0.4, ("group", 2): 0.36, ("group", 64): 0.37}
    df = bn_frame(acc, missing={("batch", 2, 2), ("group", 64, 2), ("group", 2, 1)})
    v = verdicts.verdict(df)
    assert v.outcome == TOO_FEW and v.runs_needed == 3  # seed 1 misses one cell, seed 2 two
    assert "3 more finished runs" in v.summary and "3 of them are still queued or running" in v.summary
    one_seed = bn_frame(acc, seeds=(0,), noise=(0.0,))
    v = verdicts.verdict(one_seed)
    assert v.outcome == TOO_FEW and v.runs_needed == 8  # two more seeds of the four compared cells
    assert "launch it with 3 or more" in v.summary
    single_batch = bn_frame({("batch", 2): 0.2, ("group", 2): 0.3})
    assert verdicts.verdict(single_batch).outcome == TOO_FEW


# ---- ablation ---------------------------------------------------------------------------------------

TRICKS = ["baseline", "+ random crop & flip", "+ rotation", "+ weight decay"]


def ablation_frame(accs: list[float], noise=(0.0, 0.01, -0.012), states=None) -> pd.DataFrame:
    rows = []
    for seed, eps in enumerate(noise):
        for step, a in enumerate(accs):
            state = (states or {}).get((step, seed), "completed")
            rows.append(run({"step": step, "trick": TRICKS[step]}, seed, a + eps + 0.002 * step * seed, state))
    return frame(rows, "ablation", ["step", "trick"])


def test_ablation_held_when_crop_and_flip_is_the_largest_gain():
    v = verdicts.verdict(ablation_frame([0.30, 0.38, 0.39, 0.41]))
    assert v.outcome == HELD and "+ random crop & flip gained +8" in v.summary
    assert [r["effect"] for r in v.rows][0] == "gain" and len(v.rows) == 3


def test_ablation_not_held_when_a_later_step_gains_more():
    v = verdicts.verdict(ablation_frame([0.30, 0.33, 0.32, 0.40]))
    assert v.outcome == NOT_HELD and "largest gain was step 3 (+ weight decay)" in v.summary
    assert v.rows[1]["effect"] == "loss"  # rotation cost a point in every seed


def test_ablation_not_held_when_crop_and_flip_is_within_noise():
    """Crop & flip gains +9, -3, +9 points: the largest mean gain (+5), but not clear of zero."""
    df = ablation_frame([0.30, 0.35, 0.36, 0.36], noise=(0.0, 0.0, 0.0))
    by_seed = {0: [0.30, 0.39, 0.40, 0.40], 1: [0.30, 0.27, 0.28, 0.28], 2: [0.30, 0.39, 0.40, 0.40]}
    df["test_acc"] = [by_seed[seed][step] for seed, step in zip(df["seed"], df["step"])]
    v = verdicts.verdict(df)
    assert v.outcome == NOT_HELD and "had the largest mean gain, +5.0" in v.summary
    assert "reaches zero or below" in v.summary and v.rows[0]["effect"] == "within the seed noise"


def test_ablation_too_few():
    v = verdicts.verdict(ablation_frame([0.3, 0.38, 0.39, 0.41], states={(2, 0): "running", (3, 2): "failed"}))
    assert v.outcome == TOO_FEW and v.runs_needed == 2 and "1 of them is still queued or running" in v.summary


# ---- samplers ---------------------------------------------------------------------------------------

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT, rho 100


def sampler_run(strategy: str, seed: int, recall: list[float]) -> dict:
    return run({"balance": strategy}, seed, float(np.mean(recall)),
               **{f"recall_{c}": r for c, r in zip(CLASSES, recall)},
               **{f"train_count_{c}": n for c, n in zip(CLASSES, COUNTS)})


def samplers_frame(shift: dict, seeds=(0, 1, 2)) -> pd.DataFrame:
    """`none` recalls fall with the class size; each strategy adds shift[strategy] to the 5 small classes
    and takes it from the 5 large ones (plus per-seed noise)."""
    rows = []
    base = np.linspace(0.9, 0.3, 10)
    for seed in seeds:
        noise = 0.005 * (seed - 1)
        rows.append(sampler_run("none", seed, list(base + noise)))
        for name, s in shift.items():
            move = np.r_[np.full(5, -s), np.full(5, s)] + 0.01 * seed * (name == "ldam_drw")
            rows.append(sampler_run(name, seed, list(base + noise + move)))
    return frame(rows, "samplers", ["balance"])


def test_samplers_held_when_every_strategy_moves_recall_to_the_small_classes():
    v = verdicts.verdict(samplers_frame({"weighted_sampler": 0.10, "balanced_softmax": 0.15}))
    assert v.outcome == HELD
    shift = [r for r in v.rows if r["comparison"] == "balanced_softmax: small classes' recall gain − large classes'"]
    assert shift and shift[0]["mean (pts)"] == pytest.approx(30.0) and shift[0]["effect"] == "moved to the small classes"
    balanced = [r for r in v.rows if r["comparison"].startswith("weighted_sampler: balanced")]
    assert balanced[0]["mean (pts)"] == pytest.approx(0.0)  # recall moved, the mean stayed
    assert v.summary.startswith("Every strategy moved recall") and v.headline == "The claim held"


def test_samplers_not_held_names_the_strategies_that_did_not_move_recall():
    v = verdicts.verdict(samplers_frame({"weighted_sampler": 0.10, "random_undersample": 0.0}))
    assert v.outcome == NOT_HELD
    assert "1 of 2 strategies" in v.summary and "only weighted_sampler did" in v.summary
    # one figure per strategy in the summary (the rows hold the intervals): the recall shift in points
    assert "weighted_sampler +20.0 ± 0.0; random_undersample +0.0 ± 0.0." in v.summary
    assert "CI" not in v.summary and "balanced accuracy" not in v.summary


def test_samplers_small_classes_follow_each_runs_counts():
    """Reversed counts (the large classes last) turn the same recall move into a move away from them."""
    df = samplers_frame({"weighted_sampler": 0.10})
    for c, n in zip(CLASSES, reversed(COUNTS)):
        df[f"train_count_{c}"] = n
    v = verdicts.verdict(df)
    assert v.outcome == NOT_HELD and v.rows[1]["mean (pts)"] == pytest.approx(-20.0)


def test_samplers_too_few_and_untestable():
    df = samplers_frame({"weighted_sampler": 0.1}, seeds=(0, 1))
    v = verdicts.verdict(df)
    assert v.outcome == TOO_FEW and v.runs_needed == 2 and "launch it with 3 or more" in v.summary
    only_none = samplers_frame({})
    assert "needs the strategy 'none'" in verdicts.verdict(only_none).summary
    with pytest.raises(ConfigError, match="no verdict"):
        verdicts.verdict(frame([], "nope", []))


# ---- few_labels -------------------------------------------------------------------------------------
def few_labels_frame(accs: dict[str, list[float]], states=None) -> pd.DataFrame:
    rows = [run({"method": method}, seed, acc, (states or {}).get((method, seed), "completed"))
            for method, by_seed in accs.items() for seed, acc in enumerate(by_seed)]
    return frame(rows, "few_labels", ["method"])


def test_few_labels_held_when_every_method_beats_supervised_and_the_pretext_run_is_left_out():
    v = verdicts.verdict(few_labels_frame({"supervised": [0.40, 0.42, 0.41], "fixmatch": [0.50, 0.53, 0.51],
                                           "rotation pretext": [0.10, 0.10, 0.10],
                                           "fine-tune from rotation": [0.45, 0.46, 0.46]}))
    assert v.outcome == HELD and [r["comparison"] for r in v.rows] == ["fixmatch − supervised",
                                                                      "fine-tune from rotation − supervised"]
    assert "fixmatch: +10.3" in v.summary


def test_few_labels_not_held_names_the_methods_that_did_not_beat_supervised():
    v = verdicts.verdict(few_labels_frame({"supervised": [0.40, 0.42, 0.41], "fixmatch": [0.50, 0.53, 0.51],
                                           "mixmatch": [0.41, 0.40, 0.42]}))
    assert v.outcome == NOT_HELD and "1 of 2 methods" in v.summary and "only fixmatch did" in v.summary
    assert v.rows[1]["effect"] == "within the seed noise"


def test_few_labels_too_few_and_untestable():
    v = verdicts.verdict(few_labels_frame({"supervised": [0.4, 0.4, 0.4], "fixmatch": [0.5, 0.5, None]},
                                          states={("fixmatch", 2): "running"}))
    assert v.outcome == TOO_FEW and v.runs_needed == 1 and "still queued or running" in v.summary
    assert verdicts.verdict(few_labels_frame({"fixmatch": [0.5, 0.5, 0.5]})).outcome == TOO_FEW
