"""Multi-head self/cross attention on :func:`vlcore.attention`, with masks as parameters and a KV cache.

Self-attention projects q, k and v with one fused matmul; q, k and v are strided views of its output
(B, N, 3, H, D) and go to the op without a copy. Masks are never built: ``causal``, ``prefix_lens`` and
``kv_lens`` are passed through, and a layer built with ``rel_pos_grid=(gh, gw)`` owns one learnable 2-D
relative-position table for the grid of tokens that starts at ``rel_pos_start``.

Decoding keeps a :class:`KVCache` per attention: self-attention appends the new keys/values to a preallocated
buffer (the op's bottom-right-aligned causal mask then lets the new queries see the whole history);
cross-attention projects its context once and reuses it.
"""

from __future__ import annotations

import torch
from torch import nn

import vlcore


class KVCache:
    """Keys and values of one attention layer during decoding.

    ``append`` writes new (B, n, H, D) keys/values into a buffer of ``max_len`` positions allocated on first
    use and returns views of everything cached so far; ``set`` stores a fixed context (cross-attention).
    ``reorder(index)`` selects / repeats batch rows (beam search).
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        if self.k is None:
            size = max(self.max_len or 0, n)
            self.k = k.new_empty(k.shape[0], size, *k.shape[2:])
            self.v = v.new_empty(v.shape[0], size, *v.shape[2:])
        if self.length + n > self.k.shape[1]:  # grow (only when max_len was too small or not given)
            extra = max(self.length + n - self.k.shape[1], self.k.shape[1])
            self.k = torch.cat([self.k, self.k.new_empty(self.k.shape[0], extra, *self.k.shape[2:])], 1)
            self.v = torch.cat([self.v, self.v.new_empty(self.v.shape[0], extra, *self.v.shape[2:])], 1)
        self.k[:, self.length:self.length + n] = k
        self.v[:, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :self.length], self.v[:, :self.length]

    def set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length = k, v, k.shape[1]

    @property
    def empty(self) -> bool:
        return self.k is None

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class MultiheadAttention(nn.Module):
    """Pre-projection multi-head attention: self-attention (fused QKV) or cross-attention (``cross=True``).

    forward(x (B, N, dim), context (B, M, context_dim) for cross-attention, *, causal, prefix_lens, kv_lens,
    rel_pos_start, cache) -> (B, N, dim)
    """

    def __init__(self, dim: int, heads: int, *, cross: bool = False, context_dim: int | None = None,
                 bias: bool = True, rel_pos_grid: tuple[int, int] | None = None, backend: str | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiheadAttention: dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.cross, self.backend = dim, heads, cross, backend
        if cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)  # fused: k and v are strided views
        else:
            if context_dim is not None:
                raise ValueError("MultiheadAttention: context_dim is only for cross-attention (cross=True)")
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.rel_pos_grid = None if rel_pos_grid is None else (int(rel_pos_grid[0]), int(rel_pos_grid[1]))
        if self.rel_pos_grid is not None:
            gh, gw = self.rel_pos_grid
            self.rel_pos_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), heads))
            nn.init.trunc_normal_(self.rel_pos_table, std=0.02)
        else:
            self.register_parameter("rel_pos_table", None)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = False,
                prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                rel_pos_start: int = 0, use_rel_pos: bool = True, cache: KVCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim // self.heads
        if self.cross:
            q = self.q(x).view(b, n, h, d)
            if cache is not None and not cache.empty:
                k, v = cache.k, cache.v
            else:
                if context is None:
                    raise ValueError("MultiheadAttention(cross=True): `context` is required (or a filled cache)")
                kv = self.kv(context).view(context.shape[0], context.shape[1], 2, h, d)
                k, v = kv[:, :, 0], kv[:, :, 1]
                if cache is not None:
                    cache.set(k, v)
        else:
            qkv = self.qkv(x).view(b, n, 3, h, d)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if cache is not None:
                k, v = cache.append(k, v)
        table = self.rel_pos_table if use_rel_pos else None
        out = vlcore.attention(q, k, v, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens,
                               rel_pos_table=table, rel_pos_grid=self.rel_pos_grid if table is not None else None,
                               rel_pos_start=rel_pos_start, backend=self.backend)
        return self.proj(out.reshape(b, n, self.dim))
