"""Independent dense float64 oracles for the property tests, written from the ops' documented semantics.

Nothing here imports vlcore: the oracles are a second, deliberately naive implementation (explicit masks,
per-token grid coordinates, full logits matrices, per-row loops) so that a shared mistake in vlcore.reference and
a kernel cannot make both agree. Gradients come from float64 autograd through these functions.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


# ---- attention -----------------------------------------------------------------------------------------

def attention_visible(batch: int, nq: int, nk: int, *, causal: bool, prefix_lens, kv_lens) -> torch.Tensor:
    """Boolean (B, Nq, Nk): may query i of sample b attend to key j (causal is bottom-right aligned)."""
    vis = torch.ones(batch, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for i in range(nq):
            for j in range(nk):
                diagonal_ok = j <= i + (nk - nq)
                ok = True
                if causal or prefix_lens is not None:
                    ok = diagonal_ok or (prefix_lens is not None and j < int(prefix_lens[b]))
                if kv_lens is not None:
                    ok = ok and j < int(kv_lens[b])
                vis[b, i, j] = ok
    return vis


def rel_pos_bias(table: torch.Tensor, grid, start: int, nq: int, nk: int) -> torch.Tensor:
    """(H, Nq, Nk) bias: Swin's table entry for both tokens inside the grid [start, start + gh*gw), else 0."""
    gh, gw = grid
    heads = table.shape[1]
    rows, cols, entries = [], [], []
    for i in range(nq):
        for j in range(nk):
            ti, tj = i - start, j - start
            if 0 <= ti < gh * gw and 0 <= tj < gh * gw:
                (yi, xi), (yj, xj) = divmod(ti, gw), divmod(tj, gw)
                rows.append(i)
                cols.append(j)
                entries.append((yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1))
    bias = torch.zeros(heads, nq, nk, dtype=table.dtype)
    if entries:  # index_put keeps the table differentiable
        bias = bias.index_put((torch.arange(heads)[:, None], torch.tensor(rows)[None], torch.tensor(cols)[None]),
                              table[torch.tensor(entries)].t())
    return bias


def attention(q, k, v, *, causal=False, prefix_lens=None, kv_lens=None, table=None, grid=None, start=0,
              scale=None) -> torch.Tensor:
    """(B, Nq, H, D) float64 with the visibility rules of docs/design.md §1; q of batch 1 is shared by every
    sample; a row with no visible key outputs 0."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    batch, nk, heads, dim = k.shape
    nq = q.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q = q.expand(batch, -1, -1, -1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if table is not None:
        scores = scores + rel_pos_bias(table.to(F64), grid, start, nq, nk)[None]
    vis = attention_visible(batch, nq, nk, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens)[:, None]
    # softmax over the visible keys only; exp(-huge) = 0 exactly, and an all-masked row gets weights 0
    masked = torch.where(vis, scores, torch.full_like(scores, -1e300))
    row_max = masked.amax(-1, keepdim=True).detach()
    w = torch.exp(masked - row_max) * vis
    denom = w.sum(-1, keepdim=True)
    p = w / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhij,bjhd->bihd", p, v)


# ---- contrastive losses --------------------------------------------------------------------------------

def _log_sigmoid(t: torch.Tensor) -> torch.Tensor:
    return -torch.logaddexp(torch.zeros_like(t), -t)


def contrastive_logits(image, text, scale, bias=None) -> torch.Tensor:
    """float64 (b, B) logits; ``scale`` / ``bias`` may be floats or (differentiable) tensors."""
    logits = (image.to(F64) @ text.to(F64).t()) * torch.as_tensor(scale, dtype=F64)
    return logits if bias is None else logits + torch.as_tensor(bias, dtype=F64)


def infonce_rows(x, y, scale, offset: int) -> torch.Tensor:
    """r_i = -log softmax_j(s x_i·y_j)[offset + i] for local rows x (b, D) against all columns y (B, D)."""
    logits = contrastive_logits(x, y, scale)
    out = []
    for i in range(x.shape[0]):
        row = logits[i]
        out.append(torch.logsumexp(row, 0) - row[offset + i])
    return torch.stack(out) if out else logits.new_zeros(0)


def siglip_rows(x, y, scale, bias, offset: int) -> torch.Tensor:
    """r_i = -Σ_j log σ(z_ij (s x_i·y_j + bias)), z = +1 on the positive column offset + i, else -1."""
    logits = contrastive_logits(x, y, scale, bias)
    out = []
    for i in range(x.shape[0]):
        z = -torch.ones(y.shape[0], dtype=F64)
        z[offset + i] = 1.0
        out.append(-_log_sigmoid(z * logits[i]).sum())
    return torch.stack(out) if out else logits.new_zeros(0)


def contrastive_loss(image, text, scale, kind: str, bias=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (mean of both cross-entropies) or SigLIP's sigmoid loss summed over pairs / B."""
    big_b = image.shape[0]
    if kind == "infonce":
        return (infonce_rows(image, text, scale, 0).sum() + infonce_rows(text, image, scale, 0).sum()) / (2 * big_b)
    return siglip_rows(image, text, scale, bias, 0).sum() / big_b


# ---- visual dictionary ---------------------------------------------------------------------------------

def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def vq_nearest(x, codebook, distance: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) per row of x (N, D), by brute force over the codebook as x's dtype holds it.

    torch.argmin's rule: the first NaN distance wins (a NaN row goes to entry 0 with distance NaN, a NaN entry
    takes every row), otherwise the lowest index among the equal minima.
    """
    xs, es = x.to(F64), codebook.to(x.dtype).to(F64)
    if distance == "cosine":
        xs, es = _normalise(xs), _normalise(es)
    idx = torch.empty(xs.shape[0], dtype=torch.int64)
    dist = torch.empty(xs.shape[0], dtype=F64)
    for n in range(xs.shape[0]):
        d = [float(((xs[n] - es[j]) ** 2).sum()) for j in range(es.shape[0])]
        nan = [j for j, dj in enumerate(d) if math.isnan(dj)]
        best = nan[0] if nan else min(range(len(d)), key=lambda j: (d[j], j))
        idx[n], dist[n] = best, d[best]
    return idx, dist


def vq_statistics(x, indices, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [K], sums [K, D]) float64, one row at a time."""
    counts = torch.zeros(num_codes, dtype=F64)
    sums = torch.zeros(num_codes, x.shape[-1], dtype=F64)
    for row, j in zip(x.to(F64).reshape(-1, x.shape[-1]), indices.reshape(-1).tolist()):
        counts[j] += 1
        sums[j] += row
    return counts, sums


def ema_step(codebook, ema_counts, ema_sums, counts, sums, gamma: float, eps: float):
    """SOHO's momentum step with Laplace smoothing, float64; the codebook stays as it is when every count is 0.

    Returns (codebook, ema_counts, ema_sums) as new tensors."""
    n = gamma * ema_counts.to(F64) + (1 - gamma) * counts.to(F64)
    m = gamma * ema_sums.to(F64) + (1 - gamma) * sums.to(F64)
    total, k = float(n.sum()), n.shape[0]
    new = codebook.to(F64).clone()
    for j in range(k):
        smoothed = (float(n[j]) + eps) / (total + k * eps) * total
        if smoothed > 0:
            new[j] = m[j] / smoothed
    return new, n, m


# ---- comparison ----------------------------------------------------------------------------------------

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2}


def assert_close_to_oracle(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                           conditioning: float = 1.0) -> None:
    """|got - want| <= tol * conditioning * (1 + |want|) for the input dtype's tolerance; NaN where and only where
    want is NaN. ``conditioning`` >= 1 widens the bound for ill-conditioned problems (see the callers)."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)}, oracle {tuple(want.shape)}"
    g, w = got.detach().to(F64).cpu(), want.detach().to(F64).cpu()
    assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN at {g.isnan().nonzero().tolist()[:5]}, " \
                                              f"oracle NaN at {w.isnan().nonzero().tolist()[:5]}"
    err = (g - w).abs().nan_to_num(0.0)
    allowed = TOLERANCE[dtype] * max(1.0, conditioning) * (1 + w.abs().nan_to_num(0.0))
    if bool((err > allowed).any()):
        at = int((err - allowed).argmax())
        raise AssertionError(f"{name}: {int((err > allowed).sum())} of {err.numel()} values differ from the oracle; "
                             f"worst flat index {at}: got {g.flatten()[at].item():.6g}, oracle "
                             f"{w.flatten()[at].item():.6g}")
