"""Output heads: MLP head, masked-language-model head with tied weights, box head."""

from __future__ import annotations

import torch
from torch import nn

from vlcore.nn.transformer import LN_EPS


class MLPHead(nn.Module):
    """Linear -> GELU -> [LayerNorm] -> Linear (ITM, VQA-answer and similar classifiers)."""

    def __init__(self, dim: int, out_dim: int, hidden: int | None = None, norm: bool = False):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(),
                                 nn.LayerNorm(hidden, eps=LN_EPS) if norm else nn.Identity(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLMHead(nn.Module):
    """BERT's prediction head: Linear -> GELU -> LayerNorm -> logits with the (tied) token-embedding matrix + bias.

    ``embedding`` is the nn.Embedding whose weight the decoder shares (no copy; its gradient gets both uses).
    """

    def __init__(self, dim: int, embedding: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=LN_EPS))
        self.embedding = [embedding]  # a list: not registered twice as a submodule
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.transform(x), self.embedding[0].weight, self.bias)


class BoxHead(nn.Module):
    """X-VLM's box prediction: sigmoid(MLP(x)) -> normalised (cx, cy, w, h)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.mlp = MLPHead(dim, 4, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).sigmoid()
