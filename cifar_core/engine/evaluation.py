"""Evaluation: test-time views, batched prediction, accuracy and the final report (accuracy, balanced
accuracy, macro-F1, per-class recall, many / medium / few-shot groups, calibration)."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from ..imbalance.metrics import imbalance_report, prediction_metrics
from .prepare import Prepared, eval_transform
from .tricks import autocast_context

EVAL_BATCH = 1000


def tta_views(x: torch.Tensor, flip: bool, translate: bool) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits are averaged at test time."""
    views = [(1.0, x)]
    if translate:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        views = [(0.5, x), (0.25, padded[..., :h, :w]), (0.25, padded[..., 2:, 2:])]
    if flip:
        views = [(wt * 0.5, v) for wt, v in views] + [(wt * 0.5, v.flip(-1)) for wt, v in views]
    return views


def views_where_unsure(model, x: torch.Tensor, flip: bool, translate: bool, confident: float) -> torch.Tensor:
    """The plain view's logits where its top probability reaches `confident`, the weighted views' average
    elsewhere (the plain view, always first in tta_views, is computed once). The model is in eval mode, so
    an image's logits do not depend on the others in its batch."""
    plain = model(x).float()
    unsure = (plain.softmax(1).amax(1) < confident).nonzero().squeeze(1)
    if unsure.numel() == 0:
        return plain
    picked = x[unsure]
    if x.is_contiguous(memory_format=torch.channels_last):
        picked = picked.contiguous(memory_format=torch.channels_last)
    (first_weight, _), *others = tta_views(picked, flip, translate)
    logits = plain.clone()
    logits[unsure] = first_weight * plain[unsure] + sum(wt * model(view).float() for wt, view in others)
    return logits


@torch.no_grad()
def predict_logits(model, prep: Prepared, x_uint8: torch.Tensor, tta_flip: bool,
                   tta_translate: bool = False) -> torch.Tensor:
    model.eval()
    confident = prep.cfg.tta_confident if (tta_flip or tta_translate) else 0.0
    outs = []
    for start in range(0, x_uint8.shape[0], EVAL_BATCH):
        x = eval_transform(prep, x_uint8[start:start + EVAL_BATCH])
        if prep.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(prep.cfg, prep.device):
            if confident > 0:
                logits = views_where_unsure(model, x, tta_flip, tta_translate, confident)
            else:
                logits = sum(wt * model(view).float() for wt, view in tta_views(x, tta_flip, tta_translate))
        outs.append(logits)
    return torch.cat(outs)


def evaluate(model, prep: Prepared, x: torch.Tensor, y: torch.Tensor, tta_flip: bool,
             tta_translate: bool = False) -> dict:
    logits = predict_logits(model, prep, x, tta_flip, tta_translate)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return {"loss": loss, "acc": acc, "logits": logits}


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class recall and the confusion matrix of predictions."""
    return prediction_metrics(y_true, y_pred, classes)


def logits_report(logits: torch.Tensor, y_true: torch.Tensor, train_counts: np.ndarray, classes: list[str]) -> dict:
    """The final test report of `logits` (metrics.imbalance_report: the classification report, ECE and
    its reliability bins, the many / medium / few-shot groups of `train_counts`) and the test loss."""
    report = imbalance_report(logits.float().cpu().numpy(), y_true.cpu().numpy(), train_counts, classes)
    report["test_loss"] = F.cross_entropy(logits.float(), y_true).item()
    return report
