"""Referring expression comprehension (RefCOCO-style): find the box a phrase refers to.

* :class:`BoxRegressionHead` — regress the box from the joint [CLS] vector: sigmoid(MLP) -> (cx, cy, w, h),
  trained with L1 + GIoU (the X-VLM / TransVG recipe; ``vlcore.nn.heads.BoxHead`` + ``box_losses``).
* :class:`RegionScoringHead` — score each candidate region's feature against the query (MLP on [r, q, r·q]),
  cross-entropy over the valid regions (UNITER / VinVL recipe with detector proposals).
* :func:`box_accuracy` — the standard metric: fraction of predictions with IoU ≥ 0.5 to the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.nn import objectives
from vlcore.nn.heads import BoxHead, MLPHead
from vlcore.nn.objectives import box_cxcywh_to_xyxy, box_losses


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Paired IoU of (..., 4) cxcywh boxes."""
    return objectives.box_iou(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b))


def box_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return (box_iou(pred, target) >= threshold).float().mean()


class BoxRegressionHead(nn.Module):
    """forward(joint (B, D)) -> boxes (B, 4); loss(pred, target) -> l1_weight·L1 + giou_weight·GIoU loss."""

    def __init__(self, dim: int, l1_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__()
        self.box = BoxHead(dim)
        self.l1_weight, self.giou_weight = l1_weight, giou_weight

    def forward(self, joint: torch.Tensor) -> torch.Tensor:
        return self.box(joint)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1, giou = box_losses(pred.float(), target.float())
        return self.l1_weight * l1 + self.giou_weight * giou


class RegionScoringHead(nn.Module):
    """forward(regions (B, R, D), query (B, D), valid (B, R) or None) -> scores (B, R) (-inf at invalid);
    loss(scores, target index (B,)) -> cross-entropy over regions."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = MLPHead(3 * dim, 1, dim, norm=True)

    def forward(self, regions: torch.Tensor, query: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q = query[:, None].expand_as(regions)
        scores = self.mlp(torch.cat([regions, q, regions * q], -1)).squeeze(-1).float()
        return scores if valid is None else scores.masked_fill(~valid.bool(), float("-inf"))

    def loss(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, target)
