"""Swin Transformer encoder (Liu et al., 2021) with window attention on :func:`vlcore.attention`.

Windows are folded into the batch and the 2-D relative-position bias is the op's ``rel_pos_table`` (one
table per layer, Swin/timm layout, so timm weights load unchanged).

Shifted windows without a mask. Swin rolls the map by ``-shift`` and masks, inside the windows that wrap
around, the pairs of tokens from different regions (an additive -100 bias). Here every such window is split
into its regions instead: a region is a rectangle of h x w tokens whose relative offsets are those of the
window, so attention inside it is exactly window attention restricted to the region, and its bias table is
the centre ((2h-1)(2w-1), H) slice of the layer's table. Regions of equal shape are folded into the batch
together: a shifted layer makes one call per region shape — 4 when the window is even (shift = ws / 2:
(ws, ws), (ws, s), (s, ws), (s, s)), at most 9 otherwise — exact (no -100 approximation), no N x N bias. The roll itself is folded into the token permutation that
gathers the regions, so no ``torch.roll`` runs either. A map that the window does not divide gets partial
windows at its border (Swin pads the map with zero tokens instead); Swin-B's 56/28/14/7 maps never need it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import vlcore
from vlcore.nn.transformer import MLP
from vlcore.nn.vit import PatchEmbed

# LayerNorm eps of timm's and the original Swin (nn.LayerNorm's default), not the 1e-6 of vlcore's ViT-style
# blocks: with timm weights loaded, 1e-6 moves outputs by per cents on small-variance tokens.
SWIN_LN_EPS = 1e-5


@functools.lru_cache(maxsize=64)
def window_plan(height: int, width: int, window: int, shift: int) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]:
    """Token order and groups for (shifted) window attention on a ``height x width`` map.

    Returns ``(perm, groups)``: ``perm`` lists original row-major token indices region after region (row-major
    inside a region); ``groups`` is ``((h, w, count), ...)``: ``count`` consecutive regions of shape h x w.
    """
    def intervals(size: int) -> list[tuple[int, int]]:
        cuts = {0, size}
        cuts.update(range(window, size, window))
        if shift:
            cuts.update((size - window, size - shift))  # Swin's region slices of the rolled map
        cuts = sorted(cuts)
        return list(zip(cuts[:-1], cuts[1:]))

    by_shape: dict[tuple[int, int], list[list[int]]] = {}
    for y0, y1 in intervals(height):
        for x0, x1 in intervals(width):
            tokens = [((y + shift) % height) * width + (x + shift) % width for y in range(y0, y1) for x in range(x0, x1)]
            by_shape.setdefault((y1 - y0, x1 - x0), []).append(tokens)
    perm, groups = [], []
    for (h, w), regions in by_shape.items():
        groups.append((h, w, len(regions)))
        for tokens in regions:
            perm.extend(tokens)
    return tuple(perm), tuple(groups)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows / shifted-window regions, with one relative-position table.

    forward(x (B, L, C) in the order of ``window_plan``'s perm, groups) -> (B, L, C)
    """

    def __init__(self, dim: int, heads: int, window: int, backend: str | None = None):
        super().__init__()
        self.dim, self.heads, self.window, self.backend = dim, heads, window, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_pos_table, std=0.02)

    def table_for(self, h: int, w: int) -> torch.Tensor:
        """The ((2h-1)(2w-1), H) slice of the table holding offsets |dy| < h, |dx| < w (same entries)."""
        ws = self.window
        if (h, w) == (ws, ws):
            return self.rel_pos_table
        full = self.rel_pos_table.view(2 * ws - 1, 2 * ws - 1, self.heads)
        return full[ws - h:ws + h - 1, ws - w:ws + w - 1].reshape(-1, self.heads)

    def forward(self, x: torch.Tensor, groups: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        b = x.shape[0]
        hd, d = self.heads, self.dim // self.heads
        outs, offset = [], 0
        for h, w, count in groups:
            n = h * w
            part = x[:, offset:offset + count * n]
            offset += count * n
            qkv = self.qkv(part).view(b * count, n, 3, hd, d)  # regions folded into the batch, no copy
            out = vlcore.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], rel_pos_table=self.table_for(h, w),
                                   rel_pos_grid=(h, w), backend=self.backend)
            outs.append(out.reshape(b, count * n, self.dim))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP on a ``resolution`` map; x (B, H*W, C) row-major."""

    def __init__(self, dim: int, heads: int, resolution: tuple[int, int], window: int, shift: int,
                 mlp_ratio: float = 4.0, backend: str | None = None):
        super().__init__()
        if min(resolution) <= window:  # Swin's rule: one window covers the map, nothing to shift
            window, shift = min(resolution), 0
        self.resolution, self.window, self.shift = resolution, window, shift
        perm, self.groups = window_plan(resolution[0], resolution[1], window, shift)
        perm = torch.tensor(perm, dtype=torch.long)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", torch.argsort(perm), persistent=False)
        self.norm1 = nn.LayerNorm(dim, eps=SWIN_LN_EPS)
        self.attn = WindowAttention(dim, heads, window, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=SWIN_LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x[:, self.perm]), self.groups)[:, self.inverse]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated -> LayerNorm(4C) -> Linear(4C, 2C): halves the resolution."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=SWIN_LN_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        h, w = self.resolution
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinEncoder(nn.Module):
    """Patch embedding + stages of Swin blocks (alternately plain and shifted windows) with patch merging.

    forward(image (B, 3, S, S)) -> (B, gh * gw, out_dim) normalised final tokens, row-major over ``grid``.
    """

    def __init__(self, image_size: int, patch_size: int = 4, embed_dim: int = 128,
                 depths: tuple[int, ...] = (2, 2, 18, 2), heads: tuple[int, ...] = (4, 8, 16, 32), window: int = 7,
                 mlp_ratio: float = 4.0, *, checkpoint: bool = False, backend: str | None = None):
        super().__init__()
        if len(depths) != len(heads):
            raise ValueError(f"SwinEncoder: depths {depths} and heads {heads} must have the same length")
        self.patch_embed = PatchEmbed(image_size, patch_size, embed_dim)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=SWIN_LN_EPS)
        res, dim = self.patch_embed.grid, embed_dim
        self.blocks = nn.ModuleList()
        for i, (depth, h) in enumerate(zip(depths, heads)):
            if i:
                if res[0] % 2 or res[1] % 2:
                    raise ValueError(f"SwinEncoder: stage {i} input resolution {res} must be even to merge patches")
                self.blocks.append(PatchMerging(dim, res))
                res, dim = (res[0] // 2, res[1] // 2), dim * 2
            for j in range(depth):
                self.blocks.append(SwinBlock(dim, h, res, window, (window // 2) * (j % 2), mlp_ratio, backend))
        self.norm = nn.LayerNorm(dim, eps=SWIN_LN_EPS)
        self.grid, self.out_dim, self.checkpoint = res, dim, checkpoint

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(image))
        use_ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return self.norm(x)
