r"""Reference visual dictionary (SOHO, Huang et al. CVPR 2021): nearest entry, statistics, momentum update.

Nearest entry (the op ``vlcore.vq_nearest``)::

    h_i = argmin_j ||x_i - e_j||^2          (ties -> lowest j, like torch.argmin)
    d_i = ||x_i - e_{h_i}||^2

* The codebook is first represented in x's dtype (``codebook.to(x.dtype)``): the distance is to the vector the
  straight-through output actually holds. Everything is then computed in fp32 (fp64 for fp64 x), so fp16/bf16
  products are exact and only the fp32 summation order can differ between backends.
* ``distance="cosine"``: x and e are L2-normalised (``F.normalize``, eps 1e-12) and d is the squared L2 distance
  between the normalised vectors (= 2 - 2 cos for non-zero vectors).
* Computed as ||x||^2 - 2 x.e + ||e||^2 in row chunks (bounded memory); d is clamped at 0.
* Ties: equal computed scores go to the lowest j (torch.argmin). Duplicate entries always go to the lowest
  index, whatever the rounding: a BLAS (or the Triton interpreter's numpy matmul) may round the same dot product
  differently in different columns, so after the argmin every index is mapped to the first entry identical to it
  (:func:`first_identical`) — on every backend. Equidistant distinct entries tie exactly whenever the dot
  products are exact (e.g. small-integer data as in the tests).
* NaN (torch.argmin's semantics, on every backend): a NaN score is below every number. A row of x holding a NaN
  gets distance NaN and index 0 (all its scores are NaN); a codebook entry holding a NaN takes every row (the
  first such entry), with distance NaN. The clamp at 0 keeps NaN.

Statistics: counts_j = #{i : h_i = j}, sums_j = sum_{i : h_i = j} x_i, both fp32, by scatter-add (no N x K
one-hot as in SOHO's release).

Momentum update, exactly SOHO's released ``SOHO_Pre_VD`` step (gamma = current momentum, eps = 1e-5)::

    n_j <- gamma n_j + (1 - gamma) counts_j              (EMA counts)
    m_j <- gamma m_j + (1 - gamma) sums_j                (EMA sums)
    n~_j = (n_j + eps) / (sum_k n_k + K eps) * sum_k n_k (Laplace smoothing)
    e_j  = m_j / n~_j

The only addition: when every count is 0 (no feature was ever seen) the codebook is left unchanged instead of
becoming 0/0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "cosine")
NORMALIZE_EPS = 1e-12  # F.normalize's default; the kernels use the same
_CHUNK_ELEMENTS = 1 << 22  # rows per chunk * K: bounds the (rows, K) score block of this reference


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepared_codebook(codebook: torch.Tensor, x_dtype: torch.dtype, distance: str) -> torch.Tensor:
    """The codebook as the distance sees it: in x's dtype, then in the compute dtype, normalised for cosine."""
    e = codebook.detach().to(x_dtype).to(compute_dtype(x_dtype))
    return F.normalize(e, dim=1, eps=NORMALIZE_EPS) if distance == "cosine" else e


@torch.no_grad()
def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, distance: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), codebook (K, D) -> (indices int64 [N], squared distances [N] fp32 (fp64 for fp64 x))."""
    cdt = compute_dtype(x.dtype)
    e = prepared_codebook(codebook, x.dtype, distance)
    e_sq = (e * e).sum(1)
    n = x.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=cdt, device=x.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, codebook.shape[0]))
    with torch.autocast(x.device.type, enabled=False):  # the products stay in the compute dtype
        _nearest_chunks(x, e, e_sq, distance, rows, indices, dist)
    return indices, dist


def _nearest_chunks(x, e, e_sq, distance, rows, indices, dist):
    cdt = e.dtype
    first = first_identical(e)
    for start in range(0, x.shape[0], rows):
        xc = x[start:start + rows].detach().to(cdt)
        if distance == "cosine":
            xc = F.normalize(xc, dim=1, eps=NORMALIZE_EPS)
        scores = e_sq[None, :] - 2.0 * (xc @ e.T)  # ||x - e||^2 - ||x||^2
        idx = scores.argmin(dim=1)  # the first minimum on ties, the first NaN before any number
        best = scores.gather(1, idx.unsqueeze(1)).squeeze(1)
        indices[start:start + rows] = first[idx]
        dist[start:start + rows] = (best + (xc * xc).sum(1)).clamp_min(0)  # clamp_min keeps NaN


@torch.no_grad()
def vq_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), indices [N] -> (counts [K], sums [K, D]) in fp32 (fp64 for fp64 x), by scatter-add."""
    cdt = compute_dtype(x.dtype)
    idx = indices.reshape(-1).long()
    counts = torch.bincount(idx, minlength=num_codes).to(cdt)
    sums = torch.zeros(num_codes, x.shape[-1], dtype=cdt, device=x.device)
    sums.index_add_(0, idx, x.detach().reshape(-1, x.shape[-1]).to(cdt))
    return counts, sums


def smoothed_counts(ema_counts: torch.Tensor, eps: float) -> torch.Tensor:
    """SOHO's Laplace smoothing: (n_j + eps) / (sum n + K eps) * sum n."""
    total = ema_counts.sum()
    return (ema_counts + eps) / (total + ema_counts.shape[0] * eps) * total


def ema_counts_step(ema_counts: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The counts half of the momentum step, in place; returns sum(n) as a 1-element tensor (no host sync)."""
    ema_counts.mul_(gamma).add_(torch.mul(counts, 1.0 - gamma))
    return ema_counts.sum().reshape(1)


@torch.no_grad()
def ema_update(codebook: torch.Tensor, ema_counts: torch.Tensor, ema_sums: torch.Tensor, counts: torch.Tensor,
               sums: torch.Tensor, gamma: float, eps: float = 1e-5) -> None:
    """One momentum step of SOHO's dictionary, in place on the fp32 state (see the module docstring)."""
    ema_counts_step(ema_counts, counts, gamma)
    ema_sums.mul_(gamma).add_(torch.mul(sums, 1.0 - gamma))
    smoothed = smoothed_counts(ema_counts, eps)
    updated = ema_sums / smoothed.unsqueeze(1)
    codebook.copy_(torch.where(smoothed.unsqueeze(1) > 0, updated, codebook))


def momentum_at(step: int, momentum: float, warmup_steps: float) -> float:
    """gamma_t = min(momentum, momentum * t / warmup_steps) for the t-th update (t = 1, 2, ...).

    warmup_steps = momentum / 0.4 (2.475 for 0.99) gives SOHO's intended min(0.4 t, 0.99); 0 disables warm-up.
    """
    if warmup_steps <= 0:
        return float(momentum)
    return float(min(momentum, momentum * step / warmup_steps))


# ---- inputs of the compiled backends (pure torch, O(K D + N) work) -------------------------------------

def dot_operands(codebook: torch.Tensor, x_dtype: torch.dtype, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook operand of the fused dot, ||e||^2 fp32), once per call.

    l2 with fp16/bf16 x: the codebook in x's dtype (products exact in fp32, tensor cores); fp32 x and cosine:
    fp32 (normalised for cosine, as :func:`prepared_codebook`)."""
    if distance == "cosine" or x_dtype == torch.float32:
        e = prepared_codebook(codebook, x_dtype, distance).float().contiguous()
        return e, (e * e).sum(1)
    e = codebook.detach().to(x_dtype).contiguous()
    return e, e.float().pow(2).sum(1)


def first_identical(e: torch.Tensor) -> torch.Tensor:
    """int64 [K]: for every entry j the lowest index j' whose row equals row j (j itself when unique).

    Applied to the argmin so that duplicate entries go to the lowest index however the backend rounds each
    column. O(K D) work and a sort of K hashes, fixed sizes: no host sync. Rows holding a NaN are never equal
    (NaN != NaN) and map to themselves; -0.0 and +0.0 are equal. A 64-bit hash collision between different rows
    only means that their duplicates are not merged (the plain argmin then decides)."""
    k = e.shape[0]
    if k == 1:
        return torch.zeros(1, dtype=torch.int64, device=e.device)
    rows = e.detach() + 0.0  # -0.0 -> +0.0: equal values, equal bits
    bits = rows.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()])
    # per-column odd multipliers (golden-ratio sequence, wrapping int64 arithmetic): a position-dependent hash
    weights = torch.arange(1, e.shape[1] + 1, dtype=torch.int64, device=e.device) * -7046029254386353131 | 1
    order = torch.sort((bits.long() * weights).sum(1), stable=True).indices
    ordered = rows[order]
    starts = torch.ones(k, dtype=torch.bool, device=e.device)
    starts[1:] = ~(ordered[1:] == ordered[:-1]).all(1)
    group = torch.cumsum(starts, 0) - 1
    lowest = torch.full((k,), k, dtype=torch.int64, device=e.device).scatter_reduce(0, group, order, "amin")
    first = torch.empty(k, dtype=torch.int64, device=e.device)
    first[order] = lowest[group]
    return first


def sorted_segments(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted entry ids, rows in that order (stable), offsets [K + 1]): entry j owns rows
    order[offsets[j]:offsets[j+1]]. O(N + K) memory; what makes the compiled statistics deterministic."""
    idx = indices.reshape(-1).long()
    sorted_idx, order = torch.sort(idx, stable=True)
    offsets = torch.zeros(num_codes + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(idx, minlength=num_codes), 0, out=offsets[1:])
    return sorted_idx, order, offsets
