"""The training engine: prepare (data on the device, epoch order) · loop (Trainer, train_run) ·
objectives (the loss of a step: supervised, distill) · tricks (hooks: alternating flips, EMA,
lookahead; precision, clipping) · evaluation (TTA views, predict, report) · distill (teachers) · rng."""
from .evaluation import classification_report, evaluate, predict_logits, tta_views
from .loop import StopTraining, Trainer, build_model, build_optimizer, train_run
from .objectives import (OBJECTIVES, LabeledBatch, Objective, RunContext, StepContext, StepResult, draw_unlabeled,
                         objective_class, objective_for, objective_name, supervised_loss)
from .prepare import Prepared, epoch_order, eval_transform, model_input, normalize, prepare
from .rng import seeded_generator
from .tricks import (EMA, AlternatingFlips, Lookahead, Trick, Tricks, alternating_flips, autocast_context,
                     build_tricks, clip_gradients, effective_precision)

__all__ = ["classification_report", "evaluate", "predict_logits", "tta_views", "StopTraining", "Trainer",
           "build_model", "build_optimizer", "train_run",
           "OBJECTIVES", "LabeledBatch", "Objective", "RunContext", "StepContext", "StepResult", "draw_unlabeled",
           "objective_class", "objective_for", "objective_name", "supervised_loss",
           "Prepared", "epoch_order", "eval_transform", "model_input", "normalize", "prepare",
           "seeded_generator", "EMA", "AlternatingFlips", "Lookahead", "Trick", "Tricks", "alternating_flips",
           "autocast_context", "build_tricks", "clip_gradients", "effective_precision"]
