r"""CPU visual-dictionary backend: nearest entry by addmm tiles and a running argmin, packed statistics.

Semantics are those of :mod:`vlcore.reference.vq` (codebook represented in x's dtype, fp32 compute — fp64 for
fp64 x —, cosine = squared L2 of normalised vectors, distance clamped at 0). The nearest search walks
(row chunk × codebook chunk) tiles of at most ``_TILE_ELEMENTS`` scores, each one ``addmm``
(s = ||e||² − 2 x·e in one BLAS call, no separate scale and add passes over the tile) and one argmin. Across codebook chunks a running (best, index) is replaced only when the new chunk's
minimum is strictly smaller, or is NaN where the best is not, which reproduces ``torch.argmin`` over the whole
row: ties go to the lowest index and the first NaN wins.

Statistics and the momentum update are the reference's computations, written straight into / read from the
packed (K, D + 1) buffer ([:, :D] sums, [:, D] counts) the op family exchanges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcore.reference import vq as ref

# Scores per tile (16 MiB in fp32). Tiles must stay large: a GEMM of a few dozen rows runs at a fraction of the
# BLAS rate (measured 9 vs 58 GFLOP/s on 2 cores for 64 vs 4096 rows), far more than cache residency saves.
_TILE_ELEMENTS = 1 << 22
_CODEBOOK_CHUNK = 4096  # entries per codebook chunk (the tile's width): bounds memory for huge codebooks


def _nearest_tile(xc, e, e_sq, start, stop):
    """(min score, its index) over entries [start, stop) for the rows xc: argmin of ||e||² − 2 x·e."""
    scores = torch.addmm(e_sq[start:stop], xc, e[start:stop].t(), alpha=-2.0)
    idx = scores.argmin(dim=1)  # the first minimum; NaN counts as the minimum (faster than min(dim) here)
    return scores.gather(1, idx[:, None]).squeeze(1), idx + start


class CpuVQ:
    """The ``nearest`` / ``statistics`` / ``ema_update`` protocol of the vq op family."""

    @staticmethod
    @torch.no_grad()
    def nearest(x, codebook, distance):
        cdt = ref.compute_dtype(x.dtype)
        e = ref.prepared_codebook(codebook, x.dtype, distance).contiguous()
        e_sq = (e * e).sum(1)
        n, k = x.shape[0], e.shape[0]
        width = min(k, _CODEBOOK_CHUNK)
        rows = max(1, _TILE_ELEMENTS // width)
        indices = torch.empty(n, dtype=torch.int64, device=x.device)
        dist = torch.empty(n, dtype=cdt, device=x.device)
        for r0 in range(0, n, rows):
            xc = x[r0:r0 + rows].detach().to(cdt)
            if distance == "cosine":
                xc = F.normalize(xc, dim=1, eps=ref.NORMALIZE_EPS)
            best, arg = _nearest_tile(xc, e, e_sq, 0, width)
            for c0 in range(width, k, width):
                b, i = _nearest_tile(xc, e, e_sq, c0, min(k, c0 + width))
                better = (b < best) | (b.isnan() & ~best.isnan())
                best, arg = torch.where(better, b, best), torch.where(better, i, arg)
            indices[r0:r0 + rows] = arg
            dist[r0:r0 + rows] = (best + (xc * xc).sum(1)).clamp_min(0)
        # addmm can round identical entries' scores apart: duplicates go to their first copy, as on every backend
        return ref.first_identical(e)[indices], dist

    @staticmethod
    @torch.no_grad()
    def statistics(x, indices, num_codes):
        cdt = ref.compute_dtype(x.dtype)
        dim = x.shape[-1]
        idx = indices.reshape(-1).long()
        packed = torch.zeros(num_codes, dim + 1, dtype=cdt, device=x.device)
        packed[:, :dim].index_add_(0, idx, x.detach().reshape(-1, dim).to(cdt))
        packed[:, dim] = torch.bincount(idx, minlength=num_codes).to(cdt)
        return packed

    @staticmethod
    def ema_update(codebook, ema_counts, ema_sums, packed, gamma, eps):
        ref.ema_update(codebook, ema_counts, ema_sums, packed[:, -1], packed[:, :-1], gamma, eps)
