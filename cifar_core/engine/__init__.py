"""The training engine: prepare (data on the device) · loop (Trainer, train_run) · tricks (precision,
alternating flips, lookahead) · evaluation (TTA views, predict, report) · distill (teachers) · rng."""
from .evaluation import classification_report, evaluate, predict_logits, tta_views
from .loop import StopTraining, Trainer, build_optimizer, train_run
from .prepare import Prepared, eval_transform, normalize, prepare
from .rng import seeded_generator
from .tricks import Lookahead, alternating_flips, autocast_context, effective_precision

__all__ = ["classification_report", "evaluate", "predict_logits", "tta_views", "StopTraining", "Trainer",
           "build_optimizer", "train_run", "Prepared", "eval_transform", "normalize", "prepare",
           "seeded_generator", "Lookahead", "alternating_flips", "autocast_context", "effective_precision"]
