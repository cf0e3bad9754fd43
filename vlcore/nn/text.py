"""BERT-style text embeddings (token + segment + position) and a text encoder."""

from __future__ import annotations

import torch
from torch import nn

from vlcore.nn.transformer import LN_EPS, encoder


def check_text(owner: str, text: torch.Tensor, mask: torch.Tensor | None = None, name: str = "text") -> None:
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.dtype != torch.long:
        got = f"shape {tuple(text.shape)}, dtype {text.dtype}" if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"{owner}: `{name}` must be a long tensor (B, T); got {got}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != text.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{owner}: `{name}_mask` must have the shape of `{name}` {tuple(text.shape)}; got {got}")


def lengths(mask: torch.Tensor) -> torch.Tensor:
    """Valid lengths (B,) int32 of right-padded sequences (mask True at positions 0..len-1)."""
    return mask.sum(dim=1, dtype=torch.int32)


class TextEmbeddings(nn.Module):
    """token + position [+ segment] embeddings [-> LayerNorm].

    forward(tokens (B, T), segments (B, T) or int or None, positions (B, T) / (T,) or None) -> (B, T, dim)
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, *, segments: int = 2, norm: bool = True,
                 eps: float = LN_EPS):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.segments = nn.Embedding(segments, dim) if segments else None
        self.norm = nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor | int | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"TextEmbeddings: text length {tokens.shape[1]} exceeds max_len {self.max_len}")
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        if self.segments is not None:
            if isinstance(segments, int) or segments is None:
                x = x + self.segments.weight[segments or 0]
            else:
                x = x + self.segments(segments)
        return self.norm(x)


class TextEncoder(nn.Module):
    """Bidirectional text encoder: embeddings + pre-norm encoder stack; padding handled by ``kv_lens``.

    ``post_norm=True`` (no final LayerNorm then) and ``eps=1e-12`` give BERT's own post-norm layers, to run
    BERT checkpoints (``vlcore.integrations.transformers``) unchanged. ``segments=0, embed_norm=False`` with
    ``causal=True`` (``act="quick_gelu"``) is CLIP's text tower, with ``causal=False`` SigLIP's.

    forward(text (B, T), text_mask (B, T)) -> (B, T, dim)
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int, mlp_ratio: float = 4.0,
                 *, checkpoint: bool = False, backend: str | None = None, post_norm: bool = False,
                 eps: float = LN_EPS, segments: int = 2, embed_norm: bool = True, causal: bool = False,
                 act: str = "gelu"):
        super().__init__()
        self.embeddings = TextEmbeddings(vocab_size, dim, max_len, segments=segments, eps=eps, norm=embed_norm)
        self.blocks = encoder(dim, depth, heads, mlp_ratio, checkpoint=checkpoint, backend=backend,
                              post_norm=post_norm, eps=eps, final_norm=not post_norm, act=act, causal=causal)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        check_text("TextEncoder", text, text_mask)
        return self.blocks(self.embeddings(text), kv_lens=lengths(text_mask))
