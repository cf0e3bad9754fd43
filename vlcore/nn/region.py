"""Masked-region heads of region-based VLP (UNITER, LXMERT; the survey's MRC and MRC-KL).

* MRC — masked region classification: predict the detector's label of each masked region (cross-entropy).
* MRC-KL — match the detector's class *distribution* instead: KL(p_detector ‖ softmax(head(h))).
* Feature regression (MRFR / KD-VLP's OMVM feature target): L2 between a projection of h and the region feature.
Each head is an MLP on the fused output of the masked positions; pass only those rows (or a mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.nn.heads import MLPHead
from vlcore.nn.objectives import IGNORE


def _select(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1]) if mask is None else h[mask.bool()]


class MaskedRegionClassification(nn.Module):
    """MRC: loss(h (..., D), labels (...) long, IGNORE = skip, mask=None) -> mean cross-entropy."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = MLPHead(dim, num_classes, norm=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def loss(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, y = _select(h, mask), (labels.reshape(-1) if mask is None else labels[mask.bool()])
        keep = y != IGNORE
        if not bool(keep.any()):
            return h.sum() * 0.0
        return F.cross_entropy(self.head(x[keep]).float(), y[keep])


class MaskedRegionKL(nn.Module):
    """MRC-KL: loss(h (..., D), target_probs (..., C), mask=None) -> mean over regions of KL(target ‖ pred)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = MLPHead(dim, num_classes, norm=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def loss(self, h: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = _select(h, mask)
        p = target_probs.reshape(-1, target_probs.shape[-1]) if mask is None else target_probs[mask.bool()]
        if x.shape[0] == 0:
            return h.sum() * 0.0
        logq = F.log_softmax(self.head(x).float(), dim=-1)
        return F.kl_div(logq, p.float(), reduction="batchmean")


class MaskedRegionRegression(nn.Module):
    """Feature regression: loss(h (..., D), target (..., F), mask=None) -> mean squared error per region."""

    def __init__(self, dim: int, feature_dim: int):
        super().__init__()
        self.head = MLPHead(dim, feature_dim, norm=True)

    def loss(self, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = _select(h, mask)
        y = target.reshape(-1, target.shape[-1]) if mask is None else target[mask.bool()]
        if x.shape[0] == 0:
            return h.sum() * 0.0
        return (self.head(x).float() - y.float()).pow(2).sum(-1).mean()
