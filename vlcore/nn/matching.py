"""Bipartite matching for set prediction: the Hungarian algorithm and DETR's matching cost and set loss.

``linear_sum_assignment(cost)`` solves min Σ cost[i, σ(i)] over one-to-one assignments of a rectangular
(n, m) cost matrix (min(n, m) pairs), as ``scipy.optimize.linear_sum_assignment`` does. It is the
shortest-augmenting-path Hungarian method with row/column potentials (Kuhn–Munkres, in the O(n²m) form of
Jonker–Volgenant): each row is added by a Dijkstra-like search over reduced costs; the column loop runs
vectorised in numpy, so a 100 x 100 matrix takes a few milliseconds.

DETR (Carion et al., 2020) matches the N predicted boxes of an image to its M ≤ N targets by
cost = w_class·(−p̂(class)) + w_L1·‖b̂ − b‖₁ + w_GIoU·(−GIoU(b̂, b)) and trains on the matched pairs
(cross-entropy with a down-weighted "no object" class for the unmatched queries, L1 + GIoU on matched boxes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlcore.nn.objectives import box_cxcywh_to_xyxy, box_losses, generalized_box_iou


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """(row_ind, col_ind) of a minimum-cost assignment of a 2-D cost matrix (rows sorted ascending).

    ``cost``: array-like or tensor (n, m) of finite numbers. Returns min(n, m) pairs, like scipy.
    """
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().cpu().double().numpy()
    a = np.asarray(cost, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"linear_sum_assignment: `cost` must be 2-D; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("linear_sum_assignment: `cost` must be finite (found NaN or inf)")
    transposed = a.shape[0] > a.shape[1]
    if transposed:  # the search adds rows one by one and needs n <= m
        a = a.T
    n, m = a.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # 1-based arrays; column 0 is the virtual start of every augmenting path.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: row matched to column j (0 = free)
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = a[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            # potentials: visited columns (and their rows) move by delta, the others' slack shrinks by delta
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


@torch.no_grad()
def detr_match(logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor, target_boxes: torch.Tensor,
               *, class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's N predictions (logits (N, C+1), boxes (N, 4) cxcywh) to its M targets.

    Returns (query indices, target indices), long tensors of length min(N, M) on ``logits.device``.
    """
    prob = logits.float().softmax(-1)[:, target_labels]  # (N, M)
    l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes.float())[:, None], box_cxcywh_to_xyxy(target_boxes.float())[None])
    cost = -class_weight * prob + l1_weight * l1 - giou_weight * giou
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)


def detr_loss(logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor, target_boxes: torch.Tensor,
              target_valid: torch.Tensor, *, no_object_weight: float = 0.1, class_weight: float = 1.0,
              l1_weight: float = 5.0, giou_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """DETR's set loss over a batch.

    logits (B, N, C+1) with class C = "no object"; boxes (B, N, 4) normalised cxcywh (after sigmoid);
    target_labels (B, M) long in [0, C); target_boxes (B, M, 4); target_valid (B, M) bool.
    Returns ``det_class`` (weighted CE over all queries), ``det_l1`` and ``det_giou`` (means over the targets of
    the batch), each unweighted; the caller combines them (DETR: 1, 5, 2).
    """
    b, n, c1 = logits.shape
    no_object = c1 - 1
    target_classes = torch.full((b, n), no_object, dtype=torch.long, device=logits.device)
    pred_matched, tgt_matched = [], []
    for i in range(b):
        valid = target_valid[i].bool()
        labels, tboxes = target_labels[i][valid], target_boxes[i][valid]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= no_object):
            raise ValueError(f"detr_loss: target labels must lie in [0, {no_object}); got {labels.tolist()}")
        q, t = detr_match(logits[i], boxes[i], labels, tboxes, class_weight=class_weight, l1_weight=l1_weight,
                          giou_weight=giou_weight)
        target_classes[i, q] = labels[t]
        pred_matched.append(boxes[i, q])
        tgt_matched.append(tboxes[t])
    weight = torch.ones(c1, device=logits.device)
    weight[no_object] = no_object_weight
    cls = F.cross_entropy(logits.reshape(b * n, c1).float(), target_classes.reshape(-1), weight=weight)
    l1, giou = box_losses(torch.cat(pred_matched).float(), torch.cat(tgt_matched).float())
    return {"det_class": cls, "det_l1": l1, "det_giou": giou}
