"""EfficientNet (Tan & Le, 2019): the image tower of ALIGN and MURAL.

B0 layout (expansion, kernel, stride, channels, repeats) scaled by a width multiplier (channels, rounded to
multiples of 8) and a depth multiplier (repeats, rounded up): B7 = (2.0, 3.1), L2 = (4.3, 5.3). Each MBConv
block: 1x1 expand -> depthwise kxk (stride) -> squeeze-and-excitation (ratio 0.25 of the block input) -> 1x1
project, BatchNorm (PyTorch momentum 0.1, so short runs evaluate well) + SiLU, identity shortcut with stochastic depth when the shape is kept. The 1x1 head conv
maps to ``out_dim`` channels (ALIGN: global average pooling of this map is the image embedding).

forward(image (B, 3, S, S)) -> (B, out_dim, S/32, S/32) feature map (any S; "same"-style padding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
             (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    c = channels * width
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * c else out)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-3)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(cin * 0.25)))
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:  # stochastic depth: drop the whole branch per sample
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return x + y


class EfficientNet(nn.Module):
    """EfficientNet with width/depth multipliers; ``out_dim`` channels from the head conv (default 1280·width)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, out_dim: int | None = None, drop_path: float = 0.2,
                 in_chans: int = 3):
        super().__init__()
        stem = round_filters(32, width)
        self.stem = _conv_bn(in_chans, stem, 3, 2)
        repeats = [int(math.ceil(depth * r)) for *_, r in B0_STAGES]
        total, idx, cin, blocks = sum(repeats), 0, stem, []
        for (e, k, s, c, _), n in zip(B0_STAGES, repeats):
            cout = round_filters(c, width)
            for i in range(n):
                blocks.append(MBConv(cin, cout, e, k, s if i == 0 else 1, drop_path * idx / total))
                cin, idx = cout, idx + 1
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = out_dim or round_filters(1280, width)
        self.head = _conv_bn(cin, self.out_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"EfficientNet: `image` must be (B, {self.stem[0].in_channels}, H, W); "
                             f"got {tuple(image.shape)}")
        return self.head(self.blocks(self.stem(image)))
