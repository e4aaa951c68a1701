"""Model registry: build a CIFAR-10 network by name, timm-style.

Every entry of `MODELS` is a function ``fn(num_classes=10, **declared_params) -> nn.Module`` whose
parameters are declared with `Param`, so the CLI, the app's forms and config validation come from the
declarations. Use `create_model(name, params, num_classes)` to build and `check_model(name, params)` to
validate a configuration cheaply (it builds once on the meta device and runs a meta forward pass, so no
memory is allocated and no arithmetic is done).

All models take float input (B, 3, 32, 32) and return logits (B, num_classes). They work with
``channels_last`` memory format and under ``torch.autocast``, and their forward passes contain no
data-dependent Python control flow, so they can be exported to ONNX.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..params import ConfigError, Registry

__all__ = ["MODELS", "create_model", "check_model", "count_params", "dropout_layer", "classifier_head",
           "penultimate_features"]

MODELS = Registry("model")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, frozen ones included, unless trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dropout_layer(p: float) -> nn.Module:
    """A Dropout layer when p > 0, otherwise Identity (so 'dropout present iff p > 0')."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
    return num_classes


def create_model(name: str, params: dict | None = None, num_classes: int = 10) -> nn.Module:
    """Validate `params` against the entry's declarations and build the model.
    Raises ConfigError for unknown names, bad values or invalid combinations."""
    return MODELS.build(name, params, num_classes=check_num_classes(num_classes))


def check_model(name: str, params: dict | None = None, num_classes: int = 10) -> dict:
    """Return the validated params (defaults filled in) after building the model once on the meta device
    and running a meta forward pass on a (2, 3, 32, 32) input: invalid combinations are found without
    allocating memory or doing arithmetic. Raises ConfigError."""
    values = MODELS.validate(name, params)
    check_num_classes(num_classes)
    with torch.device("meta"):
        model = MODELS.get(name).fn(num_classes=num_classes, **values)
        model.eval()
        try:
            out = model(torch.empty(2, 3, 32, 32))
        except RuntimeError as e:  # shape mismatches etc.
            raise ConfigError(f"{name}: this configuration does not build: {e}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{name}: expected output shape (2, {num_classes}), got {tuple(out.shape)}")
    return values


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer that maps a model's features to its logits (`head` of fastnet, ViT and
    CaiT, `fc` of the ResNets, the last layer of LeNet's and AlexNet's `classifier`). Decoupled
    training (cRT) re-initialises and retrains it; feature extraction reads its input."""
    for name in ("head", "fc"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        return classifier[-1]
    raise ConfigError(f"{type(model).__name__} has no recognised classifier head (head, fc or classifier[-1])")


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the classifier head sees for input `x` (B, D), read with a forward hook on the
    head so that every model's own forward (whitening, pooling, dropout in eval mode) is used as is."""
    captured = []
    hook = classifier_head(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return captured[0].float()
