"""vlcore's attention patched into timm's own modules (``vlcore.integrations.timm.apply``).

The patched modules keep their class's parameters and state-dict keys: only ``__class__`` is swapped for a
subclass whose ``forward`` calls :func:`vlcore.attention` on strided views of the fused qkv projection.
Inputs vlcore's op cannot express fall back to timm's own forward, per call: an explicit ``attn_mask``
(ViT), the shifted-window mask (Swin's -100 bias between regions of a wrapped window; vlcore's own
SwinEncoder splits those windows into regions instead), and attention dropout while training.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

import vlcore
from vlcore.integrations._report import PatchReport


def _dropout_active(module: nn.Module) -> bool:
    return module.training and module.attn_drop.p > 0


class VlcoreAttention(Attention):
    """timm's ViT ``Attention`` with vlcore's fused attention (q/k norm, scale norm and gate kept)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or _dropout_active(self):
            return super().forward(x, attn_mask, is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k = self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1])  # per-head norms act on the last dim
        out = vlcore.attention(q, k, qkv[:, :, 2], causal=is_causal).reshape(b, n, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class VlcoreWindowAttention(WindowAttention):
    """timm's Swin ``WindowAttention`` with vlcore's fused attention; the relative-position table goes to the
    op's ``rel_pos_table`` argument (timm's layout), never expanded into a dense (H, N, N) bias."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None or _dropout_active(self):
            return super().forward(x, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, -1)
        out = vlcore.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], rel_pos_table=self.relative_position_bias_table,
                               rel_pos_grid=tuple(self.window_size))
        return self.proj_drop(self.proj(out.reshape(b, n, -1)))


_PATCHES = {Attention: VlcoreAttention, WindowAttention: VlcoreWindowAttention}


def apply(model: nn.Module) -> PatchReport:
    """Patch every timm ViT ``Attention`` and Swin ``WindowAttention`` of ``model`` in place (exact classes
    only: timm's other attention variants are left alone and listed in ``skipped``)."""
    report = PatchReport()
    for name, module in model.named_modules():
        patched = _PATCHES.get(type(module))
        if patched is None:
            if isinstance(module, tuple(_PATCHES)) and type(module) not in _PATCHES.values():
                report.skipped[name] = f"{type(module).__name__} is a subclass vlcore does not know"
            continue
        module.__class__ = patched
        report.replaced.setdefault(type(module).__mro__[1].__name__, []).append(name)
    return report
