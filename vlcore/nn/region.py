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
    """Feature regression: loss(h (..., D), target (..., F), mask=None) -> mean squared error (over regions and
    feature elements, as UNITER's MRFR)."""

    def __init__(self, dim: int, feature_dim: int):
        super().__init__()
        self.head = MLPHead(dim, feature_dim, norm=True)

    def loss(self, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = _select(h, mask)
        y = target.reshape(-1, target.shape[-1]) if mask is None else target[mask.bool()]
        if x.shape[0] == 0:
            return h.sum() * 0.0
        return F.mse_loss(self.head(x).float(), y.float())


def roi_align(fmap: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear RoI sampling: (B, C, H, W) map, (B, R, 4) normalised cxcywh boxes -> (B, R, C, size, size).

    Samples the ``size`` x ``size`` cell centres of each box (RoIAlign with one sample per bin); differentiable
    in the feature map.
    """
    b, c = fmap.shape[:2]
    r = boxes.shape[1]
    base = (torch.arange(size, device=fmap.device, dtype=fmap.dtype) + 0.5) / size - 0.5  # in [-0.5, 0.5]
    cx, cy, w, h = boxes.to(fmap.dtype).unbind(-1)
    xs = (cx[..., None] + base * w[..., None]) * 2 - 1  # (B, R, size) in grid_sample's [-1, 1]
    ys = (cy[..., None] + base * h[..., None]) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)  # (B, R, s, s, 2)
    out = F.grid_sample(fmap, grid.reshape(b, r * size, size, 2), align_corners=False)  # (B, C, R*s, s)
    return out.view(b, c, r, size, size).permute(0, 2, 1, 3, 4)


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 6) (x1, y1, x2, y2, w, h): the box part of OSCAR/VinVL region features."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w, h], dim=-1)


def cells_in_boxes(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, R, gh*gw) bool: grid cells (row-major) whose centre lies inside each normalised cxcywh box; a box that
    contains no centre gets the cell under its own centre, so every box owns at least one cell."""
    gh, gw = grid
    ys = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) / gh
    xs = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) / gw
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    x1, y1, x2, y2 = box_geometry(boxes)[..., :4].unbind(-1)
    inside = (cx >= x1[..., None]) & (cx <= x2[..., None]) & (cy >= y1[..., None]) & (cy <= y2[..., None])
    col = (boxes[..., 0] * gw).long().clamp(0, gw - 1)
    row = (boxes[..., 1] * gh).long().clamp(0, gh - 1)
    centre = F.one_hot(row * gw + col, gh * gw).bool()
    return inside | (centre & ~inside.any(-1, keepdim=True))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, D) over the True positions of mask (B, ..., N) -> (B, ..., D) (0 where none)."""
    w = mask.to(x.dtype)
    return torch.einsum("b...n,bnd->b...d", w, x) / w.sum(-1, keepdim=True).clamp(min=1)
