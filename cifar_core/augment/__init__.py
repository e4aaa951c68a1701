"""Batched, seeded data augmentations on CPU or CUDA (see base.py for the op interface).

base: the registry, the op classes and the sampling helpers · ops: geometric, colour, blur, erasing,
mixing · normalize: per-image standardization and ZCA · policies: TrivialAugment, RandAugment,
random erasing · chain: spec validation and AugmentChain · preview: grids for the previewer.
Importing the package registers every op.
"""
from . import normalize, ops, policies  # noqa: F401  (each registers its ops in AUGMENTATIONS)
from .base import AUGMENTATIONS, TAGS, AugOp, RemapOp
from .chain import AugmentChain, validate_chain
from .normalize import ZCAOp

__all__ = ["AUGMENTATIONS", "TAGS", "AugOp", "RemapOp", "AugmentChain", "validate_chain", "ZCAOp"]
