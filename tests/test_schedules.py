import math

import numpy as np
import pytest

from cifar_core.imbalance import build_balance_plan
from cifar_core.params import ConfigError
from cifar_core.schedules import SCHEDULES, build_schedule


def test_inverse_time_matches_report_formula():
    spe = 10
    f = build_schedule("inverse_time", {"decay_rate": 0.5}, total_steps=100, steps_per_epoch=spe)
    for epoch in range(10):
        assert f(epoch * spe) == pytest.approx(1 / (1 + 0.5 * epoch))
        assert f(epoch * spe + 9) == pytest.approx(1 / (1 + 0.5 * epoch))  # whole epochs
    g = build_schedule("inverse_time", {"decay_rate": 0.5, "per_step": True}, 100, spe)
    assert g(15) == pytest.approx(1 / (1 + 0.5 * 1.5))


def test_step_cosine_onecycle_values():
    step = build_schedule("step", {"step_epochs": 2, "gamma": 0.1}, 100, 10)
    assert [step(s) for s in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = build_schedule("cosine", {"warmup_epochs": 1}, 110, 10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    one = build_schedule("onecycle", {"warmup_fraction": 0.5, "start_factor": 0.0, "final_factor": 0.0}, 100, 10)
    assert one(0) == 0 and one(50) == pytest.approx(1) and one(25) == pytest.approx(0.5)
    assert one(100) == pytest.approx(0)
    assert build_schedule("none", {}, 100, 10)(57) == 1.0


def test_every_schedule_declares_valid_defaults():
    for name in SCHEDULES.names():
        f = build_schedule(name, {}, 100, 10)
        values = [f(s) for s in range(101)]
        assert all(math.isfinite(v) and v >= 0 for v in values)


def test_schedule_param_validation():
    with pytest.raises(ConfigError, match="gamma"):
        build_schedule("step", {"gamma": 2}, 100, 10)


def test_balance_plans():
    y = np.array([0] * 100 + [1] * 10 + [2] * 40)
    over = build_balance_plan("random_oversample", {}, y, seed=0, num_classes=3)
    assert np.bincount(y[over.indices]).tolist() == [100, 100, 100]
    under = build_balance_plan("random_undersample", {}, y, seed=0, num_classes=3)
    assert np.bincount(y[under.indices]).tolist() == [10, 10, 10]
    ws = build_balance_plan("weighted_sampler", {}, y, seed=0, num_classes=3)
    per_class_mass = [ws.sample_weights[y == c].sum() for c in range(3)]
    assert np.allclose(per_class_mass, per_class_mass[0])
    cw = build_balance_plan("class_weighted_loss", {}, y, seed=0, num_classes=3)
    assert cw.class_weights[1] > cw.class_weights[2] > cw.class_weights[0]
    assert build_balance_plan("none", {}, y, seed=0, num_classes=3).indices.tolist() == list(range(150))
