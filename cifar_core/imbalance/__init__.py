"""Class-imbalance strategies: resampling plans, the weighted sampler and class-weighted losses; the
imbalance-aware metrics and post-hoc threshold moving."""
from .metrics import class_groups, expected_calibration_error, imbalance_report, reliability_bins
from .posthoc import POSTHOC, adjust_logits, before_after, tune_biases
from .strategies import BALANCING, BalancePlan, build_balance_plan

__all__ = ["BALANCING", "BalancePlan", "build_balance_plan", "class_groups", "expected_calibration_error",
           "imbalance_report", "reliability_bins", "POSTHOC", "adjust_logits", "before_after", "tune_biases"]
