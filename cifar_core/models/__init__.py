"""CIFAR-10 networks by name, timm-style: `create_model(name, params, num_classes)`.

registry: MODELS, create_model, check_model, count_params (below the model files) · cnn: ResNet,
LeNet, AlexNet-style, fastnet · transformers: ViT, CaiT, CCT. Importing the package registers all.
"""
from . import cnn, transformers  # noqa: F401  (each registers its models in MODELS)
from .cnn import AlexNet, BasicBlock, FastNet, LeNet, ResNet
from .registry import MODELS, check_model, classifier_head, count_params, create_model, penultimate_features
from .transformers import architecture_summary

__all__ = ["MODELS", "create_model", "check_model", "count_params", "classifier_head", "penultimate_features",
           "architecture_summary",
           "ResNet", "BasicBlock", "LeNet", "AlexNet", "FastNet"]
