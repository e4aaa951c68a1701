"""Normalizing steps: per-image standardization and ZCA whitening."""
from __future__ import annotations

import math

import torch

from ..params import Param
from .base import (AUGMENTATIONS, AugOp, as_nchw, image_op)


# ----------------------------------------------------------------------------------------------
# Normalizers
# ----------------------------------------------------------------------------------------------

@AUGMENTATIONS.register(
    "per_image_standardization", params=(),
    description="Subtract each image's mean and divide by max(std, 1/sqrt(#values)), as TensorFlow does.",
    tags=("normalize",))
def per_image_standardization() -> AugOp:
    def fn(x, gen):
        # Hand-written: a two-line reduction; neither kornia nor torchvision has TF's per-image rule.
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(1)
        std = flat.std(1, correction=0).clamp_min(1.0 / math.sqrt(flat.shape[1]))
        out = (x - mean[:, None, None, None]) / std[:, None, None, None]
        return out, {"mean": mean, "std": std}  # statistics stay on x.device (no sync)
    return image_op("per_image_standardization", {}, fn, stochastic=False, normalizes=True)


def whitening_matrix(u: torch.Tensor, s: torch.Tensor, epsilon: float, d: int) -> torch.Tensor:
    """U diag(1/sqrt(S + epsilon)) U^T for the covariance's eigenpairs. When U holds only the r < d
    directions with non-zero variance (a fit on fewer images than values), every other direction has
    eigenvalue 0: the matrix is 1/sqrt(epsilon) I + U diag(1/sqrt(S + epsilon) - 1/sqrt(epsilon)) U^T."""
    if u.shape[1] == d:
        return (u * (s + epsilon).rsqrt()) @ u.T
    rest = epsilon ** -0.5
    w = (u * ((s + epsilon).rsqrt() - rest)) @ u.T
    w.diagonal().add_(rest)
    return w


class ZCAOp(AugOp):
    """ZCA whitening: x -> (x - mean) @ U diag(1/sqrt(S + epsilon)) U^T, fitted on training images.

    Hand-written with torch.linalg.eigh instead of kornia.enhance.ZCAWhitening: kornia takes an SVD
    of the 3072x3072 covariance and materialises the whole float dataset; here the covariance is
    accumulated in chunks (uint8 input is converted chunk by chunk) over a seeded subset of at most
    `fit_images` images, and the eigendecomposition is symmetric (eigh).
    """

    needs_fit = True

    def __init__(self, epsilon: float, fit_images: int):
        super().__init__("zca", {"epsilon": epsilon, "fit_images": fit_images}, None,
                         stochastic=False, normalizes=True)
        self.epsilon = epsilon
        self.fit_images = fit_images
        self.mean: torch.Tensor | None = None    # (1, D) float32, CPU
        self.matrix: torch.Tensor | None = None  # (D, D) float32, CPU
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None  # kept only with fit(keep_eigenvectors=True)
        self.fit_count = 0  # images the fit used
        self.shape: tuple | None = None
        self._cache: dict = {}

    @property
    def fitted(self) -> bool:
        return self.matrix is not None

    @torch.no_grad()
    def fit(self, x, chunk: int = 4096, keep_eigenvectors: bool = False) -> "ZCAOp":
        """keep_eigenvectors: keep U (D x D, 37 MB for 3x32x32) so that `with_epsilon` can change
        epsilon without a new eigendecomposition (the augmentation previewer does)."""
        x = as_nchw(x)
        n = x.shape[0]
        if n < 2:
            raise ValueError("zca.fit needs at least two images")
        if n > self.fit_images:  # a fixed-seed subset keeps the fit deterministic
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:self.fit_images]
            idx = idx.sort().values
        else:
            idx = torch.arange(n)
        idx = idx.to(x.device)
        dev = x.device
        d = x[0].numel()
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0

        def rows(i):
            return x.index_select(0, idx[i:i + chunk]).reshape(-1, d).float().mul_(scale)

        total = torch.zeros(d, dtype=torch.float64, device=dev)
        for i in range(0, len(idx), chunk):
            total += rows(i).sum(0, dtype=torch.float64)
        mean = (total / len(idx)).float()
        # float64 eigh is ~10x slower on CPU for D=3072; float32 is accurate to ~1e-7*max eigenvalue
        eig_dtype = torch.float64 if dev.type == "cuda" else torch.float32
        if len(idx) <= d:
            s, u = self._eig_from_gram(torch.cat([rows(i).sub_(mean) for i in range(0, len(idx), chunk)]),
                                       eig_dtype)
        else:
            cov = torch.zeros(d, d, device=dev)
            for i in range(0, len(idx), chunk):
                r = rows(i).sub_(mean)
                cov.addmm_(r.T, r)
            cov /= len(idx) - 1
            s, u = torch.linalg.eigh(cov.to(eig_dtype))
            s = s.clamp_min(0)
        w = whitening_matrix(u, s, self.epsilon, d)
        self.mean = mean[None].cpu()
        self.matrix = w.float().cpu()
        self.eigenvalues = s.float().cpu()
        self.eigenvectors = u.float().cpu() if keep_eigenvectors else None
        self.fit_count = len(idx)
        self.shape = tuple(x.shape[1:])
        self._cache = {}
        return self

    def state_dict(self) -> dict:
        """The fit as plain tensors and numbers (saved in checkpoints so evaluation needs no data)."""
        if not self.fitted:
            raise RuntimeError("zca is not fitted: nothing to save")
        return {"mean": self.mean, "matrix": self.matrix, "fit_count": self.fit_count,
                "shape": list(self.shape)}

    def load_state_dict(self, state: dict) -> "ZCAOp":
        self.mean = state["mean"].float().cpu()
        self.matrix = state["matrix"].float().cpu()
        self.fit_count = int(state["fit_count"])
        self.shape = tuple(int(s) for s in state["shape"])
        self.eigenvalues = self.eigenvectors = None
        self._cache = {}
        return self

    def with_epsilon(self, epsilon: float) -> "ZCAOp":
        """A new op with the same fit and another epsilon (no new eigendecomposition; on the CPU the
        matrix is the one a fresh fit with that epsilon gives). Needs fit(keep_eigenvectors=True)."""
        if self.eigenvectors is None or self.eigenvalues is None:
            raise RuntimeError("zca.with_epsilon needs a fit with keep_eigenvectors=True")
        op = ZCAOp(epsilon, self.fit_images)
        u, s = self.eigenvectors, self.eigenvalues
        op.mean, op.eigenvalues, op.eigenvectors = self.mean, s, u
        op.fit_count, op.shape = self.fit_count, self.shape
        op.matrix = whitening_matrix(u, s, epsilon, u.shape[0]).float()
        return op

    @staticmethod
    def _eig_from_gram(xc: torch.Tensor, eig_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues, eigenvectors as columns) of the covariance of the k centred rows xc (k x D,
        k <= D) with a non-zero eigenvalue, from the k x k Gram matrix: the covariance has rank < k,
        and this costs O(k^2 D) + a k x k eigh instead of O(k D^2) + a D x D eigh (2,000 images of
        3x32x32 on one core of a loaded 2-core machine: 13 s instead of 31 s; 1,000: 2.9 s instead
        of 22 s)."""
        k = xc.shape[0]
        gram = (xc @ xc.T).div_(k - 1)
        s, v = torch.linalg.eigh(gram.to(eig_dtype))
        # directions at float32 noise level carry no variance: they get 1/sqrt(epsilon), like the
        # covariance's null space (see whitening_matrix)
        keep = s > s.max().clamp_min(0) * 1e-6
        s, v = s[keep].to(xc.dtype), v[:, keep].to(xc.dtype)
        u = (xc.T @ v).div_(((k - 1) * s).sqrt())  # cov (X^T v) = s (X^T v), |X^T v|^2 = (k-1) s
        return s, u

    def _on_device(self, device):
        key = str(device)
        if key not in self._cache:
            matrix = self.matrix.to(device)
            self._cache[key] = (-self.mean.to(device) @ matrix, matrix)
        return self._cache[key]

    def __call__(self, x, y, gen):
        if not self.fitted:
            raise RuntimeError("zca is not fitted: call fit(training_images) (AugmentChain.fit) "
                               "before applying it")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"zca was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")
        bias, matrix = self._on_device(x.device)
        out = torch.addmm(bias, x.reshape(x.shape[0], -1), matrix)  # (x - mean) W, W symmetric
        return out.view_as(x), y, {}


@AUGMENTATIONS.register(
    "zca",
    params=(Param("epsilon", "float", 1e-2, 1e-5, 1.0, log=True,
                  help="added to covariance eigenvalues; larger keeps more of the image's look"),
            Param("fit_images", "int", 20000, 100, 60000,
                  help="training images (seeded random subset) used to fit the whitening matrix")),
    description="ZCA whitening fitted on the training images (decorrelates pixels, boosts edges).",
    tags=("normalize",))
def zca(epsilon: float = 1e-2, fit_images: int = 20000) -> ZCAOp:
    return ZCAOp(epsilon, fit_images)


