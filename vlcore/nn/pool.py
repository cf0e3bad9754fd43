"""Attentional pooling (CoCa): learnable queries attend to an encoder's output through ``vlcore.attention``.

The queries are one set shared by the whole batch, so they go to the op with batch size 1 (batch-shared
queries: no (B, n_query, dim) copy, and the query gradient is reduced inside the op).
"""

from __future__ import annotations

import torch
from torch import nn

import vlcore
from vlcore.nn.transformer import MLP


class MultiAttentionPool(nn.Module):
    """Several attentional poolers over one context in one attention call.

    CoCa uses two: ``n_queries=(256, 1)`` — 256 tokens for the captioning decoder and 1 for the contrastive
    embedding. The context LayerNorm and the K/V projection are computed once and shared by the poolers
    (that is what lets them run as one launch); each pooler has its own queries and output projection.

    forward(context (B, N, context_dim)) -> tuple of (B, n_queries[p], dim)
    """

    def __init__(self, dim: int, n_queries: tuple[int, ...], heads: int, context_dim: int | None = None,
                 eps: float = 1e-5, backend: str | None = None, norm: bool = True):
        """``norm=False`` drops the query and context LayerNorms (SigLIP's MAP head attends to its raw probe
        and the already normalised tokens)."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiAttentionPool: dim ({dim}) must be divisible by heads ({heads})")
        context_dim = context_dim or dim
        self.dim, self.heads, self.n_queries, self.backend = dim, heads, tuple(n_queries), backend
        self.queries = nn.ParameterList([nn.Parameter(torch.randn(n, dim) * dim ** -0.5) for n in self.n_queries])
        self.norm_q = nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()
        self.norm_context = nn.LayerNorm(context_dim, eps=eps) if norm else nn.Identity()
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(context_dim, 2 * dim)  # fused: one matmul, k and v are strided views
        self.out_proj = nn.ModuleList([nn.Linear(dim, dim) for _ in self.n_queries])

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if context.dim() != 3:
            raise ValueError(f"MultiAttentionPool: `context` must be (B, N, context_dim); got shape {tuple(context.shape)}")
        b, n, _ = context.shape
        h, d = self.heads, self.dim // self.heads
        kv = self.kv_proj(self.norm_context(context)).view(b, n, 2, h, d)
        queries = torch.cat(list(self.queries), dim=0)
        q = self.q_proj(self.norm_q(queries)).view(1, -1, h, d).to(kv.dtype)
        out = vlcore.attention(q, kv[:, :, 0], kv[:, :, 1], backend=self.backend)  # (B, sum n, H, D)
        out = out.reshape(b, -1, self.dim)
        return tuple(proj(part) for proj, part in zip(self.out_proj, out.split(self.n_queries, dim=1)))


class AttentionPool(MultiAttentionPool):
    """One attentional pooler: ``forward(context (B, N, context_dim)) -> (B, n_queries, dim)``."""

    def __init__(self, dim: int, n_queries: int, heads: int, context_dim: int | None = None, eps: float = 1e-5,
                 backend: str | None = None, norm: bool = True):
        super().__init__(dim, (n_queries,), heads, context_dim, eps, backend, norm)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return super().forward(context)[0]


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP's image embedding; Zhai et al., 2023, after Lee et al., 2019's PMA):
    one learnable probe attends to the tokens, then a residual MLP: y = a + MLP(LN(a)), a = Attn(probe, x).

    forward(tokens (B, N, dim)) -> (B, dim)
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, act: str = "gelu_tanh",
                 backend: str | None = None):
        super().__init__()
        self.pool = AttentionPool(dim, 1, heads, backend=backend, norm=False)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act=act)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        a = self.pool(tokens)[:, 0]
        return a + self.mlp(self.norm(a))
