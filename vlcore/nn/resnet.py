"""ResNet bottleneck stages (He et al., 2016): SimVLM's convolutional stem (the first three stages) and
SOHO's visual backbone. Returns the feature map; the model decides how to turn it into tokens."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from vlcore.nn.vit import check_image


def norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # batch-size independent (no cross-rank statistics needed)
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"ResNet: norm must be 'batch' or 'group'; got {kind!r}")


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), plus a projected shortcut when the shape changes."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.norm1 = norm2d(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm2d(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.norm3 = norm2d(norm, out_ch)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm2d(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem (7x7/2 conv + 3x3/2 max-pool) and ``len(layers)`` bottleneck stages (stage i: width base*2^i,
    stride 1 for the first stage and 2 after). ``layers=(3, 4, 6)`` = the first three stages of ResNet-50
    (stride 16, 1024 channels); ``(3, 4, 23, 3)`` = ResNet-101 (stride 32, 2048 channels).

    forward(image (B, 3, S, S)) -> (B, out_channels, S / stride, S / stride)
    """

    def __init__(self, layers: tuple[int, ...], image_size: int, *, base_width: int = 64, in_chans: int = 3,
                 norm: str = "batch", checkpoint: bool = False):
        super().__init__()
        self.image_size, self.in_chans, self.checkpoint = image_size, in_chans, checkpoint
        self.stem = nn.Sequential(nn.Conv2d(in_chans, base_width, 7, stride=2, padding=3, bias=False),
                                  norm2d(norm, base_width), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        stages, ch = [], base_width
        for i, n in enumerate(layers):
            width = base_width * 2 ** i
            blocks = [Bottleneck(ch, width, 1 if i == 0 else 2, norm)]
            ch = width * Bottleneck.expansion
            blocks += [Bottleneck(ch, width, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = ch
        self.stride = 4 * 2 ** (len(layers) - 1)
        if image_size % self.stride:
            raise ValueError(f"ResNet: image_size {image_size} must be a multiple of the stride {self.stride}")
        self.grid = (image_size // self.stride, image_size // self.stride)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_image("ResNet", image, self.in_chans, self.image_size)
        x = self.stem(image)
        use_ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False) if use_ckpt else stage(x)
        return x
