"""Class-imbalance strategies: resampling plans, the weighted sampler and class-weighted losses."""
from .strategies import BALANCING, BalancePlan, build_balance_plan

__all__ = ["BALANCING", "BalancePlan", "build_balance_plan"]
