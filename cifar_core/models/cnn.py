"""Convolutional networks for 32x32 inputs: ResNet-18/34, LeNet, AlexNet-style, fastnet."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..params import ConfigError, Param
from .registry import MODELS, dropout_layer


# ---------------------------------------------------------------------------------------------------
# ResNet (BasicBlock) for CIFAR
# ---------------------------------------------------------------------------------------------------

class _ZeroPadShortcut(nn.Module):
    """'Option A' shortcut of He et al. (2016): subsample spatially by `stride` and zero-pad the extra
    channels (split between front and back). Parameter-free."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_ch - in_ch
        if extra < 0:
            raise ValueError("zero-pad shortcut cannot reduce channels")
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        # F.pad pads the last dims first: (W left, W right, H top, H bottom, C front, C back)
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int, make_norm, bias: bool, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.bn2 = make_norm(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "projection":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), make_norm(out_ch))
        else:
            self.shortcut = _ZeroPadShortcut(in_ch, out_ch, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks, widths 64-128-256-512 (× `width`: 0.25 gives 16-32-64-128, ~16× fewer
    weights and multiply-adds, for CPU-sized studies).

    stem "cifar": 3x3 conv stride 1, no max-pool (32x32 feature maps in layer 1);
    stem "imagenet": 7x7 conv stride 2 + 3x3 max-pool stride 2 (8x8 in layer 1).
    Then 4 stages (the first stride 1, the others stride 2), global average pool, dropout, linear.
    """

    widths = (64, 128, 256, 512)

    def __init__(self, layers, num_classes: int = 10, norm: str = "batch", groups: int = 32,
                 dropout: float = 0.0, shortcut: str = "projection", stem: str = "cifar",
                 width: float = 1.0, name: str = "resnet"):
        super().__init__()
        self.widths = tuple(max(4, int(round(c * width))) for c in ResNet.widths)
        if norm == "group":
            bad = [c for c in self.widths if c % groups]
            if bad:
                chans = ", ".join(map(str, self.widths))
                raise ConfigError(f"{name}: GroupNorm groups={groups} must divide every layer's "
                                  f"channel count ({chans})")

        def make_norm(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(groups, c)
            return nn.Identity()

        bias = norm == "none"
        w0 = self.widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, w0, 3, stride=1, padding=1, bias=bias), make_norm(w0), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, w0, 7, stride=2, padding=3, bias=bias), make_norm(w0), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1))
        stages = []
        in_ch = w0
        for i, (width, n_blocks) in enumerate(zip(self.widths, layers)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, make_norm, bias, shortcut))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = dropout_layer(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights(norm, sum(layers))

    def _init_weights(self, norm: str, n_blocks: int):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if norm == "none":
            # Without normalization the residual sum grows with depth; shrink each residual branch's
            # last conv (Fixup-style 1/sqrt(#blocks)) so activations stay bounded at initialization.
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, BasicBlock):
                        m.conv2.weight.mul_(n_blocks ** -0.5)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


_RESNET_PARAMS = (
    Param("norm", "choice", "batch", choices=("batch", "group", "none"),
          help="Normalization layer after each conv: BatchNorm, GroupNorm or none (convs then get a bias)."),
    Param("groups", "int", 32, low=1, high=512,
          help="GroupNorm groups (only used with norm=group); must divide every stage's channel count "
               "(64, 128, 256, 512 × width)."),
    Param("dropout", "float", 0.0, low=0.0, high=0.9, help="Dropout before the final linear layer."),
    Param("shortcut", "choice", "projection", choices=("projection", "zero_pad"),
          help="Shortcut when the shape changes: 1x1 conv stride 2 + norm (projection) or "
               "stride-2 subsample + zero-padded channels (zero_pad, 'option A', parameter-free)."),
    Param("stem", "choice", "cifar", choices=("cifar", "imagenet"),
          help="cifar: 3x3 conv stride 1, no max-pool; imagenet: 7x7 conv stride 2 + 3x3 max-pool stride 2."),
    Param("width", "float", 1.0, low=0.125, high=2.0,
          help="Width multiplier of the four stages (1 = 64, 128, 256, 512 channels)."),
)


@MODELS.register("resnet18", _RESNET_PARAMS, tags=("cnn", "resnet"),
                 description="ResNet-18 (BasicBlock [2,2,2,2], 64-512 wide), ~11.2 M parameters.")
def resnet18(num_classes: int = 10, **params) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes=num_classes, name="resnet18", **params)


@MODELS.register("resnet34", _RESNET_PARAMS, tags=("cnn", "resnet"),
                 description="ResNet-34 (BasicBlock [3,4,6,3], 64-512 wide), ~21.3 M parameters.")
def resnet34(num_classes: int = 10, **params) -> nn.Module:
    return ResNet([3, 4, 6, 3], num_classes=num_classes, name="resnet34", **params)


# ---------------------------------------------------------------------------------------------------
# LeNet-5 and AlexNet baselines
# ---------------------------------------------------------------------------------------------------

class LeNet(nn.Module):
    """LeNet-5 style: conv5-6, max-pool 2, conv5-16, max-pool 2, fc120, fc84, fc(num_classes).
    32 -> 28 -> 14 -> 10 -> 5, so the flattened features are 16*5*5 = 400."""

    def __init__(self, num_classes: int = 10, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        act = nn.ReLU if activation == "relu" else nn.Tanh
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), act(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(16 * 5 * 5, 120), act(), dropout_layer(dropout),
            nn.Linear(120, 84), act(), dropout_layer(dropout),
            nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("lenet", (
    Param("activation", "choice", "relu", choices=("relu", "tanh"), help="Activation after each layer."),
    Param("dropout", "float", 0.0, low=0.0, high=0.9, help="Dropout after each hidden fully connected layer."),
), tags=("cnn", "baseline"), description="LeNet-5 style baseline (2 convs, 3 FC layers), ~62 K parameters.")
def lenet(num_classes: int = 10, activation: str = "relu", dropout: float = 0.0) -> nn.Module:
    return LeNet(num_classes, activation, dropout)


class AlexNet(nn.Module):
    """AlexNet-style net scaled for 32x32 inputs: five 3x3 convs (64, 192, 384, 256, 256 channels x width)
    with ReLU and three 2x2 max-pools (32 -> 16 -> 8 -> 4), then three FC layers (1024, 1024 x width,
    num_classes) with dropout before the first two."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, int(round(c * width))) for c in (64, 192, 384, 256, 256))
        hidden = max(64, int(round(1024 * width)))
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            dropout_layer(dropout), nn.Linear(c5 * 4 * 4, hidden), nn.ReLU(inplace=True),
            dropout_layer(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("alexnet", (
    Param("dropout", "float", 0.5, low=0.0, high=0.9, help="Dropout before the first two FC layers."),
    Param("width", "float", 1.0, low=0.25, high=4.0,
          help="Width multiplier for every conv and hidden FC layer."),
), tags=("cnn", "baseline"), description="AlexNet-style baseline for 32x32 (5 convs, 3 FC), ~7.5 M parameters.")
def alexnet(num_classes: int = 10, dropout: float = 0.5, width: float = 1.0) -> nn.Module:
    return AlexNet(num_classes, dropout, width)


# ---------------------------------------------------------------------------------------------------
# FastNet (airbench94-style)
# ---------------------------------------------------------------------------------------------------

class _FastConv(nn.Conv2d):
    """3x3 'same' conv without bias; the first in_channels filters start as identity (Dirac) kernels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1, bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        n = min(self.in_channels, self.out_channels)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:n])


class _FastBN(nn.BatchNorm2d):
    """BatchNorm whose scale stays fixed at 1 (not trained); only the bias (shift) is trained."""

    def __init__(self, c: int):
        super().__init__(c, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = _FastConv(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _FastBN(out_ch)
        self.conv2 = _FastConv(out_ch, out_ch)
        self.norm2 = _FastBN(out_ch)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))

    @torch.no_grad()
    def fold_norm1(self) -> bool:
        """Inference only: fold norm1 into conv1 across the max-pool. Exact, because an eval-mode BN
        whose per-channel scale is positive is increasing in each channel and so commutes with
        max-pooling. Afterwards conv1 → pool → GELU has no separate BN, which exporters can no longer
        fuse on their own (the pool sits between them). Returns False (and changes nothing) in train
        mode or when a scale is not positive."""
        norm, conv = self.norm1, self.conv1
        if self.training or not isinstance(norm, nn.BatchNorm2d) or norm.running_var is None:
            return False
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        if not bool((scale > 0).all()):
            return False
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                          bias=True).to(conv.weight.device, conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(norm.bias - norm.running_mean * scale)
        self.conv1, self.norm1 = fused.eval(), nn.Identity()
        return True


class FastNet(nn.Module):
    """A compact, fast CIFAR-10 net in the spirit of airbench94 (Keller Jordan's fast CIFAR-10 trainer).

    Architecture (widths at width=1.0; spatial sizes for 32x32 input):

    * ``whiten``: 2x2 conv, 3 -> 24 channels, no padding (32 -> 31), with bias. After
      ``init_from_data(x)`` its 24 filters are the 12 eigenvectors of the training set's 2x2-patch
      covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives (+/- pairs), with the bias set so
      that outputs on the data have zero mean; the layer is then frozen (requires_grad False). Until then
      (or with whiten=False) it is an ordinary, trainable, randomly initialised conv.
    * GELU.
    * 3 conv groups, each ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU``, widths
      ``channels`` (64, 256, 256 as airbench94; 128, 384, 384 as airbench95) x width: 31 -> 15 -> 7 -> 3.
      Convs have no bias and start with Dirac (identity) kernels in their first in_channels filters;
      BN scales are fixed at 1 and only BN biases are trained (eps 1e-12, momentum 0.4 in PyTorch's
      convention).
    * global max-pool (3x3 -> 1x1), flatten, dropout (if > 0), bias-free linear layer, output x 1/9.

    About 1.97 M parameters at width 1.0 (all but ~1.5 K trainable: BN scales and, after
    init_from_data, the whitening conv are frozen).
    """

    scale = 1.0 / 9.0

    def __init__(self, num_classes: int = 10, width: float = 1.0, whiten: bool = True,
                 dropout: float = 0.0, eps: float = 5e-4, whiten_bias_epochs: float = 0.0,
                 channels: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        w1, w2, w3 = (max(8, int(round(c * width))) for c in channels)
        self.use_whitening = bool(whiten)
        self.whiten_bias_epochs = float(whiten_bias_epochs)
        self.eps = eps
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.act = nn.GELU()
        self.block1 = _ConvGroup(24, w1)
        self.block2 = _ConvGroup(w1, w2)
        self.block3 = _ConvGroup(w2, w3)
        self.dropout = dropout_layer(dropout)
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.whitened = False

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, max_images: int = 5000, eps: float | None = None) -> bool:
        """Set the first conv to a patch-whitening layer computed from normalized training images
        x (N, 3, 32, 32) and freeze it. Uses at most `max_images` images (evenly spaced through x).
        Returns True if applied, False when the model was built with whiten=False (no-op)."""
        if not self.use_whitening:
            return False
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"fastnet.init_from_data: expected images (N, 3, H, W), got {tuple(x.shape)}")
        eps = self.eps if eps is None else eps
        n = x.shape[0]
        if n > max_images:
            x = x[torch.linspace(0, n - 1, max_images, device=x.device).long()]
        k = self.whiten.kernel_size
        d = 3 * k[0] * k[1]
        # Accumulate first and second moments of all 2x2 patches, in float64 on the CPU (works for any
        # device, including ones without float64 support). Patch layout (c, kh, kw) = conv weight layout.
        total = torch.zeros(d, dtype=torch.float64)
        outer = torch.zeros(d, d, dtype=torch.float64)
        count = 0
        kh, kw = k
        for chunk in x.split(500):
            chunk = chunk.detach().to("cpu", torch.float32)
            h, w = chunk.shape[2] - kh + 1, chunk.shape[3] - kw + 1
            # (B, C, kh*kw, h, w) by slicing (much faster than F.unfold on CPU), then (d, B*h*w)
            patches = torch.stack([chunk[:, :, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], 2)
            patches = patches.reshape(chunk.shape[0], d, h * w).transpose(0, 1).reshape(d, -1).double()
            total += patches.sum(1)
            outer += patches @ patches.T
            count += patches.shape[1]
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]  # (d, d)
        weight = torch.cat([filters, -filters]).reshape(2 * d, 3, k[0], k[1])
        bias = -(weight.reshape(2 * d, d) @ mean)
        w = self.whiten.weight
        w.copy_(weight.to(w.device, w.dtype))
        self.whiten.bias.copy_(bias.to(w.device, w.dtype))
        self.whiten.weight.requires_grad_(False)
        self.whiten.bias.requires_grad_(self.whiten_bias_epochs > 0)  # then trained for a while: temporary_params
        self.whitened = True
        return True

    def temporary_params(self) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters that train only for the first epochs: [(params, epochs)]. The whitening bias, when
        whiten_bias_epochs > 0 (airbench94 trains it for 3 epochs); the optimizer then gives it LR 0, so
        it stays fixed while its gradient still flows (DistributedDataParallel expects every gradient)."""
        if self.whitened and self.whiten_bias_epochs > 0:
            return [([self.whiten.bias], self.whiten_bias_epochs)]
        return []

    def fold_for_inference(self) -> str | None:
        """Fold each group's pooled BN into its conv (see `_ConvGroup.fold_norm1`); for export only.
        Returns what was done, or None if nothing could be folded."""
        folded = sum(block.fold_norm1() for block in (self.block1, self.block2, self.block3))
        return (f"BatchNorm folded into the preceding conv across the max-pool in {folded} of 3 conv groups "
                "(exact: BN scales are positive)") if folded else None

    def forward(self, x):
        x = self.act(self.whiten(x))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.amax(x, dim=(2, 3))
        return self.head(self.dropout(x)) * self.scale


@MODELS.register("fastnet", (
    Param("width", "float", 1.0, low=0.25, high=4.0, help="Width multiplier for the three conv groups."),
    Param("channels1", "int", 64, low=8, high=1024, help="The first conv group's channels (before width)."),
    Param("channels2", "int", 256, low=8, high=1024,
          help="The second conv group's channels (before width); airbench95 widens the groups to 128, 384, 384."),
    Param("channels3", "int", 256, low=8, high=1024, help="The third conv group's channels (before width)."),
    Param("whiten", "bool", True,
          help="Initialise the first 2x2 conv from the data's patch whitening (init_from_data) and freeze it."),
    Param("dropout", "float", 0.0, low=0.0, high=0.9, help="Dropout before the final linear layer."),
    Param("whiten_bias_epochs", "float", 0.0, low=0.0, high=100.0,
          help="With whiten: the whitening conv's bias (set from the data) keeps training for this many epochs, "
               "at the bias LR, then stays fixed (airbench94: 3). 0: frozen from the start."),
), tags=("cnn", "fast"),
    description="airbench94-style fast net: frozen 2x2 patch-whitening conv + 3 conv groups, ~2.0 M parameters.")
def fastnet(num_classes: int = 10, width: float = 1.0, channels1: int = 64, channels2: int = 256,
            channels3: int = 256, whiten: bool = True, dropout: float = 0.0, whiten_bias_epochs: float = 0.0) -> nn.Module:
    return FastNet(num_classes, width=width, whiten=whiten, dropout=dropout, whiten_bias_epochs=whiten_bias_epochs,
                   channels=(channels1, channels2, channels3))
