"""Vision transformers for 32x32 inputs: ViT and CaiT, with a linear or a small convolutional tokenizer.

Registered in `cifar_core.models.MODELS` (importing cifar_core.models imports this module):

* ``vit``: patch tokens (+ a class token when pool=cls) -> pre-norm transformer blocks -> pooled token
  (class token, global average, or CCT's sequence pooling) -> linear head.
* ``cait``: the two changes of "Going deeper with Image Transformers" (Touvron et al., 2021):
  LayerScale (a learnable per-channel scale, initialised small, on every residual branch) and
  class-attention layers at the end: the self-attention blocks see the patch tokens only; the class
  token is inserted after them and, in the last ``class_depth`` layers, attends to the (frozen)
  patch tokens, updating only itself.
* ``tokenizer=conv`` (both models): the linear patch embedding is replaced by a small convolutional
  tokenizer as in compact convolutional transformers (Hassani et al., 2021): log2(patch_size) times
  conv3x3 -> ReLU -> max-pool 3x3 stride 2, so the token grid is the same as with linear patches of
  that size and the two tokenizers cost the same attention. It is a parameter rather than a separate
  model so that "linear vs conv tokenizer" is a one-field change at equal depth/width (studies,
  comparisons) and works for CaiT too; the checkpoint's model_params name it (`architecture_summary`).

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Forward code never turns
a size into a Python int (``x.shape[0]`` / -1, ``unflatten``/``flatten``, ``expand(-1)``), so the
models export to ONNX with a dynamic batch dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from ..params import ConfigError, Param
from .registry import MODELS, dropout_layer

__all__ = ["ViT", "CaiT", "Attention", "ClassAttention", "Block", "ClassAttentionBlock", "LayerScale",
           "architecture_summary"]

IMAGE_SIZE = 32
CONV_TOKENIZER_WIDTH = 64  # channels of the conv tokenizer's intermediate layers (CCT uses 64)


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------

def _drop_path(p: float) -> nn.Module:
    """Stochastic depth on a residual branch (whole samples dropped), Identity when p == 0."""
    return StochasticDepth(p, "row") if p > 0 else nn.Identity()


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch, initialised to `init` (CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


def _layer_scale(dim: int, init: float | None) -> nn.Module:
    return nn.Identity() if init is None else LayerScale(dim, init)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), dropout_layer(dropout),
                         nn.Linear(hidden, dim), dropout_layer(dropout))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d) without reading B or N."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    return x.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = dropout_layer(dropout)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(_merge_heads(out)))


class ClassAttention(nn.Module):
    """CaiT's class attention: only the class token (first token) queries; keys and values come from
    the class token and all patch tokens. Returns the class token's update, (B, 1, D)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = dropout_layer(dropout)

    def forward(self, x):
        q = _split_heads(self.q(x[:, :1]), self.heads)
        k, v = self.kv(x).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(_merge_heads(out)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); each residual branch
    optionally scaled by LayerScale and dropped by stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float, drop_path: float,
                 layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ls1 = _layer_scale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, dropout)
        self.ls2 = _layer_scale(dim, layer_scale)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention layer: ``forward(patches, cls) -> cls``; the patch tokens are read,
    never updated."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float, drop_path: float,
                 layer_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, heads, dropout)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, dropout)
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = _drop_path(drop_path)

    def forward(self, patches, cls):
        tokens = torch.cat((cls, patches), dim=1)
        cls = cls + self.drop_path(self.ls1(self.attn(self.norm1(tokens))))
        return cls + self.drop_path(self.ls2(self.mlp(self.norm2(cls))))


class PatchTokenizer(nn.Module):
    """Linear patch embedding: non-overlapping p x p patches -> tokens (a conv with stride p)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvTokenizer(nn.Module):
    """CCT-style tokenizer: n = log2(patch_size) stages of conv3x3 -> ReLU -> max-pool 3 stride 2
    (channels 64, ..., dim), giving the same (32 / patch_size)^2 token grid as linear patches."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        n_stages = int(math.log2(patch_size))
        widths = [3] + [CONV_TOKENIZER_WIDTH] * (n_stages - 1) + [dim]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                       nn.MaxPool2d(3, stride=2, padding=1)]
        self.stages = nn.Sequential(*layers)

    def forward(self, x):
        return self.stages(x).flatten(2).transpose(1, 2)


class SeqPool(nn.Module):
    """CCT's sequence pooling: a softmax over tokens of a learned score, then the weighted mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x):
        weights = self.score(x).softmax(dim=1)  # (B, N, 1)
        return (weights * x).sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def _check_shapes(name: str, patch_size: int, embed_dim: int, heads: int, mlp_ratio: float) -> int:
    """Raise ConfigError for combinations that cannot build; return the MLP hidden width."""
    if IMAGE_SIZE % patch_size:
        valid = ", ".join(str(p) for p in range(2, 17) if IMAGE_SIZE % p == 0)
        raise ConfigError(f"{name}: patch_size {patch_size} must divide the image size {IMAGE_SIZE} "
                          f"(choose {valid})")
    if embed_dim % heads:
        raise ConfigError(f"{name}: embed_dim {embed_dim} is not divisible by heads {heads} "
                          f"(each head gets embed_dim / heads channels)")
    hidden = int(round(embed_dim * mlp_ratio))
    if hidden < 1:
        raise ConfigError(f"{name}: mlp_ratio {mlp_ratio} gives an MLP with no hidden units")
    return hidden


def _tokenizer(kind: str, patch_size: int, dim: int) -> nn.Module:
    return ConvTokenizer(patch_size, dim) if kind == "conv" else PatchTokenizer(patch_size, dim)


def _drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate rising linearly from 0 (first block) to drop_path (last block)."""
    return [drop_path * i / max(1, depth - 1) for i in range(depth)]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Vision transformer for 32x32 images (see the module docstring).

    pool: "cls" (a learned class token is prepended and its final state classifies), "gap" (mean of
    the patch tokens, no class token) or "seq" (CCT's attention-weighted mean, no class token).
    """

    def __init__(self, num_classes: int = 10, patch_size: int = 4, embed_dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 2.0, dropout: float = 0.0, drop_path: float = 0.1,
                 pool: str = "cls", tokenizer: str = "linear"):
        super().__init__()
        mlp_hidden = _check_shapes("vit", patch_size, embed_dim, heads, mlp_ratio)
        self.pool = pool
        n_tokens = (IMAGE_SIZE // patch_size) ** 2 + (pool == "cls")
        self.tokenizer = _tokenizer(tokenizer, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = dropout_layer(dropout)
        self.blocks = nn.Sequential(*[Block(embed_dim, heads, mlp_hidden, dropout, rate)
                                      for rate in _drop_path_rates(drop_path, depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.seq_pool = SeqPool(embed_dim) if pool == "seq" else None
        self.head = nn.Linear(embed_dim, num_classes)
        _init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, x):
        """The pooled representation (B, embed_dim) that the head classifies."""
        x = self.tokenizer(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "seq":
            return self.seq_pool(x)
        return x.mean(dim=1)

    def forward(self, x):
        return self.head(self.features(x))


class CaiT(nn.Module):
    """CaiT for 32x32 images: `depth` self-attention blocks over the patch tokens only, then
    `class_depth` class-attention blocks that update a class token inserted there. Every residual
    branch has LayerScale initialised to `layer_scale_init`."""

    def __init__(self, num_classes: int = 10, patch_size: int = 4, embed_dim: int = 192, depth: int = 6,
                 class_depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 drop_path: float = 0.1, layer_scale_init: float = 0.1, tokenizer: str = "linear"):
        super().__init__()
        mlp_hidden = _check_shapes("cait", patch_size, embed_dim, heads, mlp_ratio)
        self.tokenizer = _tokenizer(tokenizer, patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE_SIZE // patch_size) ** 2, embed_dim))
        self.pos_drop = dropout_layer(dropout)
        self.blocks = nn.Sequential(*[Block(embed_dim, heads, mlp_hidden, dropout, rate, layer_scale_init)
                                      for rate in _drop_path_rates(drop_path, depth)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # CaiT uses no stochastic depth in the class-attention stage
        self.class_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, heads, mlp_hidden, dropout, 0.0, layer_scale_init)
            for _ in range(class_depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        _init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, x):
        patches = self.blocks(self.pos_drop(self.tokenizer(x) + self.pos_embed))
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        for block in self.class_blocks:
            cls = block(patches, cls)
        return self.norm(cls)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------------

def _common_params(heads: int) -> tuple[Param, ...]:
    return (
        Param("patch_size", "int", 4, 2, 16,
              help="Side of a patch (token) in pixels; must divide 32: 2 (256 tokens), 4 (64), 8 (16), 16 (4)."),
        Param("embed_dim", "int", 192, 16, 1024, help="Token width; must be divisible by heads."),
        Param("depth", "int", 6, 1, 24, help="Number of self-attention blocks."),
        Param("heads", "int", heads, 1, 16, help="Attention heads per block."),
        Param("mlp_ratio", "float", 2.0, 0.5, 8.0, help="MLP hidden width as a multiple of embed_dim."),
        Param("dropout", "float", 0.0, 0.0, 0.9,
              help="Dropout after the position embedding, in the MLPs and after attention projections."),
        Param("drop_path", "float", 0.1, 0.0, 0.5,
              help="Stochastic depth: chance to skip a block's residual branch, rising linearly to "
                   "this value at the last block."),
    )


_TOKENIZER = Param("tokenizer", "choice", "linear", choices=("linear", "conv"),
                   help="linear: non-overlapping patches, one linear map each (ViT); conv: a small "
                        "conv3x3-ReLU-maxpool stack with the same token grid (compact convolutional "
                        "transformer), much faster to train on small data.")


@MODELS.register("vit", _common_params(heads=3) + (
    Param("pool", "choice", "cls", choices=("cls", "gap", "seq"),
          help="cls: a class token classifies; gap: mean of the tokens; seq: CCT's learned "
               "attention-weighted mean."),
    _TOKENIZER,
), tags=("transformer", "vit"),
    description="Vision transformer for 32x32 (patch 2/4/8/16, linear or CCT conv tokenizer); "
                "defaults ~1.8 M parameters.")
def vit(num_classes: int = 10, **params) -> nn.Module:
    return ViT(num_classes, **params)


@MODELS.register("cait", _common_params(heads=4) + (
    Param("class_depth", "int", 2, 1, 4, help="Class-attention layers at the end (the class token joins here)."),
    Param("layer_scale_init", "float", 0.1, 1e-6, 1.0, log=True,
          help="Initial value of every LayerScale channel (CaiT: 0.1 up to depth 18, 1e-5 at 24, "
               "1e-6 deeper)."),
    _TOKENIZER,
), tags=("transformer", "cait"),
    description="CaiT for 32x32: LayerScale on every residual branch and class-attention layers at "
                "the end; defaults ~2.4 M parameters.")
def cait(num_classes: int = 10, **params) -> nn.Module:
    return CaiT(num_classes, **params)


def architecture_summary(name: str, params: dict) -> str:
    """One line for a model card, e.g. 'ViT, conv tokenizer (CCT-style), patch 4 (64 tokens),
    6 blocks x 192 dim, 3 heads, cls pooling'. Plain CNN names are returned as they are."""
    if name not in ("vit", "cait"):
        return name
    tokens = (IMAGE_SIZE // params["patch_size"]) ** 2
    tokenizer = ("conv tokenizer (CCT-style)" if params["tokenizer"] == "conv"
                 else "linear patch embedding")
    line = (f"{'ViT' if name == 'vit' else 'CaiT'}, {tokenizer}, patch {params['patch_size']} "
            f"({tokens} tokens), {params['depth']} blocks x {params['embed_dim']} dim, "
            f"{params['heads']} heads")
    if name == "vit":
        return line + f", {params['pool']} pooling"
    return line + f", {params['class_depth']} class-attention layers, LayerScale {params['layer_scale_init']:g}"
