"""`python -m cifar_core split`: the per-class counts of a run's split, the same the trainer uses;
and the CIFAR-10-LT profile's counts, which must be those of the standard benchmark."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cifar_core import cli
from cifar_core.config import RunConfig
from cifar_core.data import CLASSES, long_tail_counts
from cifar_core.engine.prepare import prepare

# CIFAR-10-LT as built by LDAM-DRW (Cao et al. 2019) and BagofTricks-LT: class c keeps
# int(5000 * (1/rho) ** (c / 9)) images; totals 20,431 / 13,996 / 12,406 / 11,203.
CIFAR10_LT = {
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    200: [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25],
}


@pytest.mark.parametrize("rho", sorted(CIFAR10_LT))
def test_long_tail_counts_are_the_standard_cifar10_lt(rho):
    assert long_tail_counts(5000, rho).tolist() == CIFAR10_LT[rho]


def split_json(capsys, *flags) -> dict:
    assert cli.main(["split", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_split_prints_what_the_trainer_trains_on(capsys, cifar_npz):
    flags = ["--subset", "per_class", "--per-class", "60", "--val-size", "100", "--imbalance", "long_tail",
             "--imbalance-params", "imbalance_ratio=10", "--label-budget", "50", "--seed", "3"]
    out = split_json(capsys, *flags, "--data", str(cifar_npz))
    assert list(out["labeled"]) == list(CLASSES)
    assert out["totals"] == {k: sum(out[k].values()) for k in ("labeled", "unlabeled", "validation")}
    assert out["totals"]["validation"] == 100 and set(out["validation"].values()) == {10}
    assert out["totals"]["labeled"] == 50 and set(out["labeled"].values()) == {5}
    assert out["imbalance_ratio"] == pytest.approx(10, rel=0.05)

    cfg = RunConfig.from_dict({"subset": "per_class", "per_class": 60, "val_size": 100, "imbalance": "long_tail",
                               "imbalance_params": {"imbalance_ratio": 10}, "label_budget": 50, "seed": 3,
                               "device": "cpu"})
    prepared = prepare(cfg, str(cifar_npz))
    trained = np.bincount(prepared.train_y.cpu().numpy(), minlength=10).tolist()
    assert trained == list(out["labeled"].values())
    assert len(prepared.unlabeled_x) == out["totals"]["unlabeled"]
    assert len(prepared.eval_y) == out["totals"]["validation"]


def test_split_of_the_report_profile_and_a_bad_flag(capsys, cifar_npz):
    out = split_json(capsys, "--imbalance", "report_random", "--data", str(cifar_npz))
    assert all(500 <= n <= 1000 for n in out["labeled"].values())
    assert out["totals"]["unlabeled"] == 0
    assert cli.main(["split", "--subset-size", "many", "--subset", "random", "--data", str(cifar_npz)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
