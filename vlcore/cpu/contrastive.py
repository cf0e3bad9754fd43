r"""CPU contrastive-loss backend: column chunks with an online log-sum-exp, exact chunked backward.

Semantics and formulas are those of :mod:`vlcore.reference.contrastive` (rows x (b, D) against gathered columns
y (B, D), positive column ``offset + i``). The (b, B) logits are never materialised: the columns are visited in
chunks of at most ``_CHUNK_ELEMENTS / b`` (at least ``_MIN_COLUMNS``), so the memory is linear in the batch.

* InfoNCE forward: lse_i = logaddexp over chunks of logsumexp_j∈chunk(l_ij) (the online log-sum-exp); the
  positive logit is a row-wise dot. Backward: G_ij = drow_i·(exp(l_ij − lse_i) − [j = offset+i]) per chunk.
* SigLIP: r_i = Σ_chunks Σ_j softplus(−z_ij·l_ij); backward G_ij = −drow_i·z_ij·σ(−z_ij·l_ij).
* Per chunk: dx += s·G·y_c, dy_c = s·Gᵀ·x, dscale += Σ G ⊙ (x·y_cᵀ), dbias += Σ G.
* Single-process InfoNCE (both directions): text→image logits are the transpose of image→text, so
  :meth:`CpuContrastive.pair_backward` recomputes each logits chunk once and serves both directions from it.

Everything is computed in fp32 (fp64 for fp64 inputs), as the reference. The op layer
(:mod:`vlcore.ops.contrastive`) registers the autograd of these forward/backward pairs and handles the
all-gather across ranks, so the distributed semantics are the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcore.reference import contrastive as ref

_CHUNK_ELEMENTS = 1 << 21  # logits per chunk: b x columns (8 MiB in fp32)
_MIN_COLUMNS = 64  # below this a chunk's matmul is too thin to be efficient
# softplus(t) = t beyond this: log1p(e^-40) ~ 4e-18 is below half an ulp of 40 in fp64 (and fp32), so the
# single fused F.softplus kernel is as exact as the reference's two-branch formula (its default threshold, 20,
# would be off by 2e-9 in fp64).
_SOFTPLUS_LINEAR = 40.0


def _column_chunks(rows: int, columns: int):
    width = max(_MIN_COLUMNS, _CHUNK_ELEMENTS // max(1, rows))
    for start in range(0, columns, width):
        yield start, min(columns, start + width)


def _positives(chunk: torch.Tensor, start: int, offset: int) -> tuple[torch.Tensor, slice]:
    """The positive entries of a (rows, columns) chunk starting at column ``start`` — row i's positive column is
    offset + i — as a writable diagonal view, and the rows it covers."""
    diag = chunk.diagonal(offset - start)
    first = max(0, start - offset)
    return diag, slice(first, first + diag.shape[0])


def _logits(xs: torch.Tensor, y_chunk: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """s·x·yᵀ (+ bias) of one chunk, with xs = s·x scaled once per call."""
    return xs @ y_chunk.t() if bias is None else torch.addmm(bias, xs, y_chunk.t())


class CpuContrastive:
    """The ``forward`` / ``backward`` / ``pair_backward`` protocol of the contrastive op family."""

    @staticmethod
    def forward(x, y, scale, bias, offset, kind):
        acc = ref.compute_dtype(x.dtype)
        xf, yf = x.to(acc), y.to(acc)
        xs = xf * scale.to(acc)
        rows = x.shape[0]
        if kind == "infonce":
            lse = torch.full((rows,), float("-inf"), dtype=acc, device=x.device)
            for start, stop in _column_chunks(rows, y.shape[0]):
                lse = torch.logaddexp(lse, torch.logsumexp(_logits(xs, yf[start:stop], None), dim=1))
            return lse - (xs * yf[offset:offset + rows]).sum(1), lse
        total = torch.zeros(rows, dtype=acc, device=x.device)
        for start, stop in _column_chunks(rows, y.shape[0]):
            t = _logits(xs, yf[start:stop], bias.to(acc))  # softplus(-z·l): l for negatives, -l for positives
            _positives(t, start, offset)[0].neg_()
            total += F.softplus(t, threshold=_SOFTPLUS_LINEAR).sum(1)
        return total, total.new_empty(0)

    @staticmethod
    def backward(drow, x, y, scale, bias, lse, offset, kind):
        acc = ref.compute_dtype(x.dtype)
        xf, yf, s, d = x.to(acc), y.to(acc), scale.to(acc), drow.to(acc)
        xs = xf * s
        rows = x.shape[0]
        gy = torch.zeros_like(xf)  # G·y over all chunks
        dy = torch.empty_like(yf)
        dbias = torch.zeros((), dtype=acc, device=x.device)
        for start, stop in _column_chunks(rows, y.shape[0]):
            if kind == "infonce":  # G = d·(softmax - [positive])
                g = _logits(xs, yf[start:stop], None).sub_(lse.to(acc)[:, None]).exp_().mul_(d[:, None])
                diag, covered = _positives(g, start, offset)
                diag.sub_(d[covered])
            else:  # G = d·σ(l) for negatives, -d·σ(-l) for positives
                g = _logits(xs, yf[start:stop], bias.to(acc))
                diag, covered = _positives(g, start, offset)
                diag.neg_()
                g.sigmoid_().mul_(d[:, None])
                diag.neg_()
                dbias += g.sum()
            gy += g @ yf[start:stop]
            dy[start:stop] = (g.t() @ xf) * s
        dscale = (gy * xf).sum()  # Σ_ij G_ij·(x_i·y_j) without another pass over the chunks
        has_bias = kind == "siglip" and bias is not None
        return (gy * s).to(x.dtype), dy.to(y.dtype), dscale, (dbias if has_bias else None)

    @staticmethod
    def pair_backward(d_img, d_txt, img, txt, scale, lse_img, lse_txt):
        """Both InfoNCE directions of one process (columns = the other modality's rows, offset 0) from one logits
        chunk: image row i and text column j share l_ij, so G_ij = G^img_ij + G^txt_ji."""
        acc = ref.compute_dtype(img.dtype)
        xf, yf, s = img.to(acc), txt.to(acc), scale.to(acc)
        xs = xf * s
        rows = img.shape[0]
        di, dt = d_img.to(acc), d_txt.to(acc)
        li, lt = lse_img.to(acc), lse_txt.to(acc)
        gy = torch.zeros_like(xf)
        g_txt = torch.empty_like(yf)
        for start, stop in _column_chunks(rows, rows):
            logits = _logits(xs, yf[start:stop], None)
            g = (logits - li[:, None]).exp_().mul_(di[:, None])
            g += (logits - lt[None, start:stop]).exp_().mul_(dt[None, start:stop])
            diag, covered = _positives(g, start, 0)
            diag.sub_(di[covered] + dt[covered])
            gy += g @ yf[start:stop]
            g_txt[start:stop] = (g.t() @ xf) * s
        dscale = (gy * xf).sum()
        return (gy * s).to(img.dtype), g_txt.to(txt.dtype), dscale
