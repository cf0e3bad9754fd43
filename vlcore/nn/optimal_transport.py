"""Word–patch alignment (WPA) by optimal transport, as UNITER and ViLT compute it: the IPOT approximation.

For a pair (text tokens x_1..x_n, image patches y_1..y_m) the cost is C_ij = 1 − cos(x_i, y_j) and WPA wants
the Wasserstein distance D = min_T <C, T> over transport plans with uniform marginals (1/n, 1/m) over the valid
tokens / patches. Exact OT is a linear program; UNITER/ViLT use IPOT (Xie et al., 2019), a proximal-point
method: T ← argmin <C, T> + β·KL(T ‖ T_prev), solved approximately with ``inner`` Sinkhorn-style scaling
steps per outer iteration.

Approximations (the same as the papers' code): a finite number of iterations (ViLT: 50 outer, 1 inner,
β = 0.5), so the plan is only near-optimal and marginals hold approximately; the plan is computed without
gradient and D = <C, T.detach()>, so the gradient flows through the cost only (the envelope-theorem gradient
of the exact OT distance when T is optimal). Padding enters as zero-mass rows/columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def ipot_plan(cost: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor, *, beta: float = 0.5,
              iterations: int = 50, inner: int = 1) -> torch.Tensor:
    """Transport plan (B, n, m) for costs (B, n, m); x_valid (B, n), y_valid (B, m) bool mark real positions."""
    cost = cost.float()
    xv, yv = x_valid.float(), y_valid.float()
    nx = xv.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    ny = yv.sum(1, keepdim=True).clamp(min=1)
    pair = xv[:, :, None] * yv[:, None, :]
    a = torch.exp(-cost / beta) * pair  # kernel; zero at padding
    sigma = yv / ny  # (B, m)
    plan = pair.clone()
    for _ in range(iterations):
        q = a * plan
        for _ in range(inner):
            delta = xv / (nx * torch.einsum("bnm,bm->bn", q, sigma)).clamp(min=1e-30)
            sigma = yv / (ny * torch.einsum("bnm,bn->bm", q, delta)).clamp(min=1e-30)
        plan = delta[:, :, None] * q * sigma[:, None, :]
    return plan


def wpa_distance(text: torch.Tensor, patches: torch.Tensor, text_valid: torch.Tensor, patch_valid: torch.Tensor,
                 **ipot_kwargs) -> torch.Tensor:
    """Approximate Wasserstein distance (B,) between token features (B, n, D) and patch features (B, m, D)."""
    cost = 1 - torch.einsum("bnd,bmd->bnm", F.normalize(text.float(), dim=-1), F.normalize(patches.float(), dim=-1))
    pair = text_valid[:, :, None] & patch_valid[:, None, :]
    cost = cost.masked_fill(~pair, 0.0)
    plan = ipot_plan(cost.detach(), text_valid, patch_valid, **ipot_kwargs)
    return (cost * plan).sum(dim=(1, 2))


def wpa_loss(distance: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """ViLT's WPA loss: (Σ D over matched pairs − Σ D over mismatched pairs) / number of pairs."""
    sign = torch.where(matched.bool(), 1.0, -1.0).to(distance.dtype)
    return (sign * distance).sum() / max(distance.numel(), 1)
