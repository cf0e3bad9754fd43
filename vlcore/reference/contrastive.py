r"""Reference contrastive losses (InfoNCE of CLIP/ALIGN, sigmoid loss of SigLIP): exact in fp32 (fp64 for fp64).

Everything is built from one op over *local rows × gathered columns*: rows x (b, D) against columns y (B, D),
the positive column of row i being ``offset + i`` (``offset`` = where this rank's rows start in the gathered
batch). With logits l_ij = s·x_i·y_j (+ bias) the per-row terms are

    InfoNCE:  r_i = logsumexp_j(l_ij) − l_{i, offset+i}
    SigLIP:   r_i = Σ_j −log σ(z_ij·l_ij) = Σ_j softplus(−z_ij·l_ij),   z_ij = +1 if j = offset+i else −1

and the global-batch losses (B rows in all, docs/design.md §3) are

    InfoNCE = ( Σ_i r_i(images vs all texts) + Σ_i r_i(texts vs all images) ) / (2B)
    SigLIP  =   Σ_i r_i(images vs all texts) / B

so a rank holding rows [offset, offset + b) computes its share with its local rows only; the shares sum to the
loss (CLIP: Radford et al., 2021; SigLIP: Zhai et al., 2023). This path materialises the (b, B) logits: it is
the ground truth of the tests and the CPU execution path, not the fast path.
"""

from __future__ import annotations

import torch

KINDS = ("infonce", "siglip")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x, y, scale, bias):
    acc = compute_dtype(x.dtype)
    dots = x.to(acc) @ y.to(acc).t()
    logits = dots * (scale.to(acc) if isinstance(scale, torch.Tensor) else scale)
    if bias is not None:
        logits = logits + (bias.to(acc) if isinstance(bias, torch.Tensor) else bias)
    return dots, logits


def _positive_mask(b: int, big_b: int, offset: int, device) -> torch.Tensor:
    return torch.arange(big_b, device=device)[None, :] == (offset + torch.arange(b, device=device))[:, None]


def _softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t), exact everywhere (F.softplus turns linear past t = 20) with the exact gradient σ(t), also
    at t = 0; the clamps keep the branch not taken finite (no inf·0 in the backward)."""
    return torch.where(t > 0, t + torch.log1p(torch.exp(-t.clamp(min=0))), torch.log1p(torch.exp(t.clamp(max=0))))


def row_losses(x: torch.Tensor, y: torch.Tensor, scale, bias=None, *, offset: int = 0,
               kind: str = "infonce") -> tuple[torch.Tensor, torch.Tensor]:
    """(r (b,), lse) in the compute dtype, differentiable by autograd.

    ``lse`` is the row log-sum-exp (b,) for InfoNCE (what a fused backward needs) and an empty tensor for SigLIP.
    ``scale`` and ``bias`` are 0-dim tensors or floats; ``bias`` is ignored by InfoNCE (it cancels).
    """
    if kind == "infonce":
        _, logits = _logits(x, y, scale, None)
        lse = torch.logsumexp(logits, dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        return lse - logits[rows, offset + rows], lse
    if kind == "siglip":
        _, logits = _logits(x, y, scale, bias)
        z = torch.where(_positive_mask(x.shape[0], y.shape[0], offset, x.device), 1.0, -1.0).to(logits.dtype)
        return _softplus(-z * logits).sum(dim=1), logits.new_empty(0)
    raise ValueError(f"unknown contrastive kind {kind!r}; expected one of {KINDS}")


def row_losses_backward(drow: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale, bias=None, *,
                        offset: int = 0, kind: str = "infonce"):
    """Explicit gradients (dx, dy, dscale, dbias) of Σ_i drow_i·r_i — the formulas the fused backward implements.

    With G_ij = drow_i · ∂r_i/∂l_ij:

        InfoNCE:  G_ij = drow_i · (softmax_j(l_i·)_j − [j = offset+i])
        SigLIP:   G_ij = −drow_i · z_ij · σ(−z_ij·l_ij)

        dx = s·G·y,   dy = s·Gᵀ·x  (all B columns),   dscale = Σ_ij G_ij·(x_i·y_j),   dbias = Σ_ij G_ij

    dscale/dbias are 0-dim in the compute dtype (dbias is None for InfoNCE or when ``bias`` is None).
    """
    acc = compute_dtype(x.dtype)
    dots, logits = _logits(x, y, scale, bias if kind == "siglip" else None)
    pos = _positive_mask(x.shape[0], y.shape[0], offset, x.device)
    d = drow.to(acc)[:, None]
    if kind == "infonce":
        g = d * (torch.softmax(logits, dim=1) - pos.to(acc))
    elif kind == "siglip":
        z = torch.where(pos, 1.0, -1.0).to(acc)
        g = -d * z * torch.sigmoid(-z * logits)
    else:
        raise ValueError(f"unknown contrastive kind {kind!r}; expected one of {KINDS}")
    s = scale.to(acc) if isinstance(scale, torch.Tensor) else float(scale)
    dx = (g @ y.to(acc)) * s
    dy = (g.t() @ x.to(acc)) * s
    dscale = (g * dots).sum()
    dbias = g.sum() if (kind == "siglip" and bias is not None) else None
    return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, *, kind: str = "infonce",
                     logit_bias=None) -> torch.Tensor:
    """Single-process loss over the batch given (B = image_emb.shape[0]), by the row decomposition above."""
    big_b = image_emb.shape[0]
    if kind == "infonce":
        r_img, _ = row_losses(image_emb, text_emb, logit_scale, kind=kind)
        r_txt, _ = row_losses(text_emb, image_emb, logit_scale, kind=kind)
        return (r_img.sum() + r_txt.sum()) / (2 * big_b)
    r_img, _ = row_losses(image_emb, text_emb, logit_scale, logit_bias, kind=kind)
    return r_img.sum() / big_b


@torch.no_grad()
def retrieval_hits(x: torch.Tensor, y: torch.Tensor, *, offset: int = 0, chunk: int = 1024) -> torch.Tensor:
    """How many rows i have their top-1 column (over all of y) at ``offset + i`` — int64 0-dim tensor.

    Scans the columns in chunks (b × chunk scores at a time, never b × B for B > chunk); ties go to the
    lowest column, as ``argmax`` does. A row with a NaN score never counts as a hit.
    """
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    best = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)
    arg = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    for start in range(0, y.shape[0], chunk):
        top, idx = (xf @ y[start:start + chunk].to(acc).t()).max(dim=1)
        better = top > best
        best = torch.where(better, top, best)
        arg = torch.where(better, idx + start, arg)
    return (arg == offset + torch.arange(x.shape[0], device=x.device)).sum()
