"""Single-stream fusion (ViLT, OSCAR/VinVL, E2E-VLP, KD-VLP): one bidirectional encoder over the concatenation
of several token sequences (text, tags, regions, patches), each with its own padding.

:func:`vlcore.attention` masks padding by per-sample key lengths only, so the valid tokens of all parts are
first *packed* to the front of the sequence (a stable gather), the encoder runs with ``kv_lens`` = the number of
valid tokens, and the outputs are scattered back to each part's layout. No mask tensor is ever built.
"""

from __future__ import annotations

import torch
from torch import nn

from vlcore.nn.transformer import encoder


def pack_valid(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed (B, N, D) with each row's valid tokens first in their order, lengths int32 (B,), order (B, N))."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    packed = x.gather(1, order[:, :, None].expand(-1, -1, x.shape[-1]))
    return packed, valid.sum(1, dtype=torch.int32), order


def unpack(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_valid`'s gather (padding positions receive whatever the encoder wrote there)."""
    return torch.empty_like(y).scatter(1, order[:, :, None].expand(-1, -1, y.shape[-1]), y)


class SingleStreamEncoder(nn.Module):
    """forward(parts: list of (x (B, N_i, dim), valid (B, N_i) bool or None)) -> (outputs per part, pooled (B, dim)).

    ``pooled`` = tanh(Linear(first token of the first part)) — BERT's pooler on [CLS] (ViLT, OSCAR).
    Pre-norm encoder stack with a final LayerNorm (``vlcore.nn.transformer.encoder``).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, *, checkpoint: bool = False,
                 pooler: bool = True, backend: str | None = None):
        super().__init__()
        self.blocks = encoder(dim, depth, heads, mlp_ratio, checkpoint=checkpoint, backend=backend)
        self.pooler = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) if pooler else None

    def forward(self, parts: list[tuple[torch.Tensor, torch.Tensor | None]]):
        xs = [x for x, _ in parts]
        valids = [torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if v is None else v.bool()
                  for x, v in parts]
        x, valid = torch.cat(xs, 1), torch.cat(valids, 1)
        if bool(valid.all()):
            y = self.blocks(x)
        else:
            packed, lens, order = pack_valid(x, valid)
            y = unpack(self.blocks(packed, kv_lens=lens), order)
        outs = list(torch.split(y, [t.shape[1] for t in xs], dim=1))
        pooled = self.pooler(outs[0][:, 0]) if self.pooler is not None else None
        return outs, pooled
