"""Vision Transformer: patch embedding + learned position embedding + pre-norm encoder stack."""

from __future__ import annotations

import torch
from torch import nn

from vlcore.nn.transformer import LN_EPS, encoder


class PatchEmbed(nn.Module):
    """``patch x patch`` patches -> (B, N, dim) tokens.

    ``stem="linear"``: ViT's linear projection of non-overlapping patches (a strided convolution).
    ``stem="conv"``: a convolutional stem of log2(patch) stride-2 3x3 convolutions (Xiao et al., 2021, "Early
    convolutions help transformers see better"): the same N tokens, far quicker to train from scratch on small
    data, at a few more parameters. Needs a power-of-two patch size. Its widths start at ``stem_width`` and
    double (capped at ``dim``); the last convolution projects to ``dim``. ``bias=False``: a linear stem without
    bias (CLIP's).
    """

    def __init__(self, image_size: int, patch_size: int, dim: int, in_chans: int = 3, stem: str = "linear",
                 stem_width: int = 32, bias: bool = True):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEmbed: image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.grid = (image_size // patch_size, image_size // patch_size)
        if stem == "linear":
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=bias)
        elif stem == "conv":
            n = patch_size.bit_length() - 1
            if patch_size < 2 or 1 << n != patch_size:
                raise ValueError(f"PatchEmbed: stem='conv' needs a power-of-two patch_size >= 2; got {patch_size}")
            widths = [in_chans] + [min(dim, stem_width << i) for i in range(n - 1)] + [dim]
            layers: list[nn.Module] = []
            for i in range(n):
                layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1))
                if i < n - 1:
                    layers.append(nn.GELU())
            self.proj = nn.Sequential(*layers)
        else:
            raise ValueError(f"PatchEmbed: stem must be 'linear' or 'conv'; got {stem!r}")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_image("PatchEmbed", image, self.in_chans, self.image_size)
        return self.proj(image).flatten(2).transpose(1, 2)


def check_image(owner: str, image: torch.Tensor, channels: int, size: int) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != channels \
            or tuple(image.shape[2:]) != (size, size):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{owner}: `image` must be (B, {channels}, {size}, {size}); got {got}")


class ViT(nn.Module):
    """forward(image (B, 3, S, S)) -> (B, [1 +] N, dim) normalised tokens (a leading class token if ``cls_token``)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 *, cls_token: bool = False, checkpoint: bool = False, backend: str | None = None,
                 stem: str = "linear", stem_width: int = 32, pre_norm: bool = False, final_norm: bool = True,
                 eps: float = LN_EPS, act: str = "gelu", patch_bias: bool = True):
        """``pre_norm`` adds a LayerNorm before the blocks and ``final_norm=False`` drops the one after them
        (CLIP / open_clip towers, whose pooler normalises); ``eps``: the LayerNorms' epsilon; ``act``: the MLP
        activation; ``patch_bias=False``: CLIP's bias-free patch projection."""
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, dim, stem=stem, stem_width=stem_width, bias=patch_bias)
        n = self.patch_embed.num_patches + int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = encoder(dim, depth, heads, mlp_ratio, checkpoint=checkpoint, backend=backend,
                              final_norm=final_norm, eps=eps, act=act)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks(self.norm_pre(x + self.pos_embed))
