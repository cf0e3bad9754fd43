"""Loss utilities shared by the models: MLM masking, token cross-entropy, box losses (L1 + GIoU), ITM negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcore import tokens as T

IGNORE = -100


def mask_tokens(text: torch.Tensor, text_mask: torch.Tensor, vocab_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None, word_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each ordinary token (id >= NUM_SPECIAL, inside ``text_mask``) is chosen with ``prob``;
    a chosen token becomes [MASK] 80 %, a random ordinary token 10 %, stays unchanged 10 %.

    With ``word_ids`` (B, T) (tokens of one word share an id) whole words are chosen together (BERT-wwm).
    Every row with an ordinary token gets at least one chosen token (short captions would otherwise often have
    none). Returns (masked text, labels) with labels = the original id where chosen, ``IGNORE`` elsewhere.
    """
    candidates = text_mask.bool() & (text >= T.NUM_SPECIAL)
    b, t = text.shape
    if word_ids is None:
        ids = torch.arange(t, device=text.device).expand(b, t)
        u = torch.rand(text.shape, device=text.device, generator=generator)
    else:
        ids = word_ids.clamp(min=0)
        n_words = int(ids.max()) + 1 if ids.numel() else 1
        u = torch.rand(b, n_words, device=text.device, generator=generator).gather(1, ids)  # one draw per word
    chosen = candidates & (u < prob)
    # rows with candidates but nothing chosen: choose the candidate (word) with the smallest draw
    none = candidates.any(1) & ~chosen.any(1)
    first = u.masked_fill(~candidates, 2.0).argmin(1, keepdim=True)
    chosen = chosen | ((ids == ids.gather(1, first)) & candidates & none[:, None])
    action = torch.rand(text.shape, device=text.device, generator=generator)
    random_ids = torch.randint(T.NUM_SPECIAL, vocab_size, text.shape, device=text.device, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(text, T.MASK), text)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(chosen, text, torch.full_like(text, IGNORE))
    return masked, labels


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose label is not ``IGNORE`` ('mean' over them, 0 when there are none)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (labels != IGNORE).sum().clamp(min=1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _iou_union(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return inter / (union + eps), union


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Paired IoU of (..., 4) xyxy boxes (broadcasting)."""
    return _iou_union(a, b, eps)[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Paired GIoU of (..., 4) xyxy boxes (Rezatofighi et al., 2019): IoU - |C \\ (A u B)| / |C|, C the hull."""
    iou, union = _iou_union(a, b, eps)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / (hull + eps)


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, GIoU loss) for (N, 4) normalised (cx, cy, w, h) boxes, each the mean over boxes (0 when N = 0)."""
    n = max(pred.shape[0], 1)
    l1 = (pred - target).abs().sum() / n
    giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))).sum() / n
    return l1, giou


def sample_negatives(batch: int, device: torch.device | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """For each i a uniformly drawn j != i (long (batch,)): the partner of a random mismatched pair."""
    if batch < 2:
        raise ValueError(f"sample_negatives: ITM negatives need a batch of at least 2; got {batch}")
    shift = torch.randint(1, batch, (batch,), device=device, generator=generator)
    return (torch.arange(batch, device=device) + shift) % batch


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """ALBEF/X-VLM hard negatives: row i draws column j != positives[i] with probability softmax(sim[i])_j.

    similarity: (b, N) scores (no gradient needed); positives: (b,) column of each row's own pair.
    Returns long (b,) column indices.
    """
    if similarity.shape[1] < 2:
        raise ValueError(f"sample_hard_negatives: need at least 2 candidates; got {tuple(similarity.shape)}")
    weights = torch.softmax(similarity.detach().float(), dim=1)
    weights = weights.scatter(1, positives.view(-1, 1), 0.0)
    underflow = weights.sum(1, keepdim=True) <= 0  # all mass on the positive: uniform over the others instead
    weights = torch.where(underflow, torch.ones_like(weights), weights).scatter(1, positives.view(-1, 1), 0.0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)
