r"""Triton contrastive losses (InfoNCE of CLIP/ALIGN, SigLIP's sigmoid loss) over tiles of local rows × gathered
columns, forward and backward, linear memory (in the spirit of Inf-CL: Cheng et al., 2024, arXiv:2410.17243;
FlashAttention's recomputation: Dao, 2023).

One op (see :mod:`vlcore.reference.contrastive`): rows x (b, D) against columns y (B, D), positive column of row i
at ``offset + i``; logits l_ij = s·x_i·y_j (+ bias), computed per (BLOCK_M × BLOCK_N) tile with fp32 accumulation
over D (masked tail, any D):

    InfoNCE:  r_i = lse_i − l_{i,offset+i},   lse_i by an online log-sum-exp over the column tiles
    SigLIP:   r_i = Σ_j softplus(−z_ij·l_ij)   (z = +1 on the positive, −1 elsewhere; log1p done exactly)

Backward, upstream drow (b,), recomputing the logits tile by tile (nothing of size b×B is ever stored):

    G_ij = drow_i·(exp(l_ij − lse_i) − [j = offset+i])          (InfoNCE)
    G_ij = −drow_i·z_ij·σ(−z_ij·l_ij)                           (SigLIP)
    dx = s·G·y   (one program per (row block, D chunk, column slice), loops over the slice's column tiles)
    dy = s·Gᵀ·x  (one program per (column block, D chunk), loops over row tiles) — every gathered column
    dscale = Σ G ⊙ (x·yᵀ),  dbias = Σ G   (per-row-block partial sums, reduced afterwards by torch)

Column slices (flash-decoding style): the forward and dx have only cdiv(b, 64) row-block programs — 4 to 16 on a
132-SM GPU for a local batch of 256–1024 against 32k gathered columns — so their column loop is split into slices
(:func:`column_splits`, about two programs per SM) whose partials merge in a fixed order: lse by log-sum-exp,
the positive logit, SigLIP sums, dx (fp32 partials) and dscale/dbias by plain sums.

Single-process InfoNCE (no ranks: the text→image logits are the transpose of the image→text ones) uses a pair
kernel: G_ij = d_i·(e^{l_ij − lse_i} − δ_ij) + d'_j·(e^{l_ij − lse'_j} − δ_ij) serves both directions from one
recomputed tile, so the backward is two launches (image rows, text rows) instead of four.

No float atomics and no autotuning: every launch uses the fixed config of :func:`_config` (a function of dtype,
D and the dot precision only), so the results are bitwise reproducible across processes and runs on the same GPU
model and software — the deterministic mode (:func:`vlcore.kernels._launch.deterministic`) changes nothing here. fp16/bf16 logits use the tensor cores with fp32
accumulation; fp32 inputs use IEEE fp32 products (as torch's default matmul; TF32 on torch's opt-in). The gradient matmuls take G in
fp32 (TF32 products for fp16/bf16 inputs: a 16-bit G would underflow — its entries are ~1/B — and lose precision).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from vlcore.kernels._launch import KernelVariant, checked_grid, fp32_dot_precision, launch_context
from vlcore.kernels._variants import make_variant

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dots_tile(x_ptr, y_ptr, rows, cols, n_rows, n_cols, dim, sx0, sx1, sy0, sy1,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x[rows]·y[cols]ᵀ as a (BLOCK_M, BLOCK_N) fp32 tile; rows/cols beyond the ends read zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * sx0 + ks[None, :] * sx1,
                     mask=(rows[:, None] < n_rows) & (ks[None, :] < dim), other=0.0)
        yt = tl.load(y_ptr + cols[None, :] * sy0 + ks[:, None] * sy1,
                     mask=(cols[None, :] < n_cols) & (ks[:, None] < dim), other=0.0)
        acc = tl.dot(xt, yt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _log1p_small(e):
    """log(1 + e) for e in [0, 1], exact to fp32 rounding (Goldberg's trick; 1 + e alone loses tiny e)."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _grad_tile(dots, s, bias, lse, drow, rows, cols, n_rows, n_cols, offset, SIGLIP: tl.constexpr):
    """G_ij (see the module docstring) for one tile, 0 outside the matrix."""
    logits = dots * s
    is_pos = cols[None, :] == (rows[:, None] + offset)
    if SIGLIP:
        zt = tl.where(is_pos, logits + bias, -(logits + bias))
        e = tl.exp(-tl.abs(zt))
        sig = tl.where(zt >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # σ(−z·l), stable on both sides
        g = tl.where(is_pos, -sig, sig)
    else:
        g = tl.exp(logits - lse[:, None]) - tl.where(is_pos, 1.0, 0.0)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.where(valid, g * drow[:, None], 0.0)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, rows_out_ptr, lse_out_ptr, n_rows, n_cols, dim, offset,
                sx0, sx1, sy0, sy1, cols_per_split, SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row block, column slice): the slice's partial results at [split, row] — InfoNCE: its lse and
    positive logit (0 when the positive lies elsewhere), SigLIP: its loss sum. Every slice holds >= 1 column."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if SIGLIP else 0.0
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        logits = _dots_tile(x_ptr, y_ptr, rows, cols, n_rows, col_hi, dim, sx0, sx1, sy0, sy1,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * s
        valid = cols[None, :] < col_hi
        is_pos = cols[None, :] == (rows[:, None] + offset)
        if SIGLIP:
            zt = tl.where(is_pos, logits + bias, -(logits + bias))
            term = tl.maximum(-zt, 0.0) + _log1p_small(tl.exp(-tl.abs(zt)))  # softplus(−z·l)
            total += tl.sum(tl.where(valid, term, 0.0), axis=1)
        else:
            masked = tl.where(valid, logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(masked, axis=1))
            denom = denom * tl.exp(m - m_new) + tl.sum(tl.exp(masked - m_new[:, None]), axis=1)
            m = m_new
            pos += tl.sum(tl.where(is_pos & valid, logits, 0.0), axis=1)
    in_range = rows < n_rows
    out = split.to(tl.int64) * n_rows + rows
    if SIGLIP:
        tl.store(rows_out_ptr + out, total, mask=in_range)
    else:
        tl.store(lse_out_ptr + out, m + tl.log(denom), mask=in_range)
        tl.store(rows_out_ptr + out, pos, mask=in_range)


@triton.jit
def _bwd_dx_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_ptr, drow_ptr, dx_ptr, partial_ptr, n_rows, n_cols,
                   dim, offset, sx0, sx1, sy0, sy1, sdx0, sdxs, n_row_blocks, cols_per_split, SIGLIP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """Program (row block, D chunk, column slice): the slice's share of dx at dx[split] (an fp32 partial when
    there are several slices, summed afterwards in a fixed order) and its dscale/dbias partials."""
    pid_m, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n_cols)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if SIGLIP else 0.0
    in_range = rows < n_rows
    drow = tl.load(drow_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
    lse = tl.zeros((BLOCK_M,), tl.float32) if SIGLIP else tl.load(lse_ptr + rows, mask=in_range, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    dbias = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dots = _dots_tile(x_ptr, y_ptr, rows, cols, n_rows, col_hi, dim, sx0, sx1, sy0, sy1,
                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        g = _grad_tile(dots, s, bias, lse, drow, rows, cols, n_rows, col_hi, offset, SIGLIP)
        yt = tl.load(y_ptr + cols[:, None] * sy0 + ds[None, :] * sy1,
                     mask=(cols[:, None] < col_hi) & (ds[None, :] < dim), other=0.0).to(tl.float32)
        acc = tl.dot(g, yt, acc, input_precision=GRAD_PRECISION)
        dscale += tl.sum(g * dots, axis=1)
        dbias += tl.sum(g, axis=1)
    tl.store(dx_ptr + split.to(tl.int64) * sdxs + rows[:, None] * sdx0 + ds[None, :],
             (acc * s).to(dx_ptr.dtype.element_ty), mask=in_range[:, None] & (ds[None, :] < dim))
    if pid_d == 0:  # one partial per (column slice, row block), summed in a fixed order afterwards
        base = partial_ptr + split * 2 * n_row_blocks
        tl.store(base + pid_m, tl.sum(dscale, axis=0))
        tl.store(base + n_row_blocks + pid_m, tl.sum(dbias, axis=0))


@triton.jit
def _bwd_dy_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_ptr, drow_ptr, dy_ptr, n_rows, n_cols, dim, offset,
                   sx0, sx1, sy0, sy1, sdy0, SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   GRAD_PRECISION: tl.constexpr):
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if SIGLIP else 0.0
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        in_range = rows < n_rows
        drow = tl.load(drow_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
        lse = tl.zeros((BLOCK_M,), tl.float32) if SIGLIP else tl.load(lse_ptr + rows, mask=in_range, other=0.0)
        dots = _dots_tile(x_ptr, y_ptr, rows, cols, n_rows, n_cols, dim, sx0, sx1, sy0, sy1,
                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        g = _grad_tile(dots, s, bias, lse, drow, rows, cols, n_rows, n_cols, offset, SIGLIP)
        xt = tl.load(x_ptr + rows[:, None] * sx0 + ds[None, :] * sx1,
                     mask=in_range[:, None] & (ds[None, :] < dim), other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(g), xt, acc, input_precision=GRAD_PRECISION)
    tl.store(dy_ptr + cols[:, None] * sdy0 + ds[None, :], (acc * s).to(dy_ptr.dtype.element_ty),
             mask=(cols[:, None] < n_cols) & (ds[None, :] < dim))


@triton.jit
def _bwd_pair_kernel(x_ptr, y_ptr, scale_ptr, lse_row_ptr, lse_col_ptr, drow_ptr, dcol_ptr, dx_ptr, partial_ptr,
                     n, dim, sx0, sx1, sy0, sy1, sdx0, sdxs, n_row_blocks, cols_per_split, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     GRAD_PRECISION: tl.constexpr):
    """Single-process InfoNCE, both directions from one logits tile: rows x (n, D) against columns y (n, D),
    G_ij = drow_i·(e^{l_ij − lse_row_i} − δ_ij) + dcol_j·(e^{l_ij − lse_col_j} − δ_ij)  (the second term is the
    transposed gradient of the y→x direction), dx = s·G·y, and the dscale partial of both directions. Program
    (row block, D chunk, column slice), as in _bwd_dx_kernel."""
    pid_m, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, n)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.load(scale_ptr).to(tl.float32)
    in_range = rows < n
    drow = tl.load(drow_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
    lse_row = tl.load(lse_row_ptr + rows, mask=in_range, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        dcol = tl.load(dcol_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        lse_col = tl.load(lse_col_ptr + cols, mask=col_ok, other=0.0)
        dots = _dots_tile(x_ptr, y_ptr, rows, cols, n, n, dim, sx0, sx1, sy0, sy1, BLOCK_M, BLOCK_N, BLOCK_K,
                          PRECISION)
        logits = dots * s
        pos = tl.where(cols[None, :] == rows[:, None], 1.0, 0.0)
        g = (drow[:, None] * (tl.exp(logits - lse_row[:, None]) - pos)
             + dcol[None, :] * (tl.exp(logits - lse_col[None, :]) - pos))
        g = tl.where(in_range[:, None] & col_ok[None, :], g, 0.0)
        yt = tl.load(y_ptr + cols[:, None] * sy0 + ds[None, :] * sy1,
                     mask=col_ok[:, None] & (ds[None, :] < dim), other=0.0).to(tl.float32)
        acc = tl.dot(g, yt, acc, input_precision=GRAD_PRECISION)
        dscale += tl.sum(g * dots, axis=1)
    tl.store(dx_ptr + split.to(tl.int64) * sdxs + rows[:, None] * sdx0 + ds[None, :],
             (acc * s).to(dx_ptr.dtype.element_ty), mask=in_range[:, None] & (ds[None, :] < dim))
    if pid_d == 0:
        tl.store(partial_ptr + split * n_row_blocks + pid_m, tl.sum(dscale, axis=0))


# ---- launchers -----------------------------------------------------------------------------------------

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(triton.next_power_of_2(max(n, 1)), hi))


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


def _config(dim: int, dtype: torch.dtype, precision: str, interpret: bool | None = None,
            capability: tuple[int, int] = (9, 0)) -> tuple[dict, dict]:
    """(forward, backward) tile sizes and launch options. The gradient accumulator holds BLOCK_D columns of D;
    larger D is split over programs that recompute the logits. GPU sizes were chosen from ptxas reports
    (sm_80 and sm_90, triton 3.9: no or negligible register spills); IEEE fp32 dots run on FMA units and need
    small tiles. Under the interpreter the cost is per program and op: large tiles, and BLOCK_D = 128 so that
    the tests cover the D split."""
    if _INTERPRET if interpret is None else interpret:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": _pow2(dim, 16, 64)}
        return dict(tiles, num_warps=4, num_stages=1), dict(tiles, BLOCK_D=_pow2(dim, 16, 128), num_warps=4,
                                                             num_stages=1)
    if dtype == torch.float32 and precision == "ieee":
        tiles = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": _pow2(dim, 16, 32)}
        return dict(tiles, num_warps=4, num_stages=2), dict(tiles, BLOCK_D=_pow2(dim, 16, 64), num_warps=4,
                                                             num_stages=2)
    if dtype == torch.float32:  # TF32
        tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": _pow2(dim, 16, 32)}
        return dict(tiles, num_warps=8, num_stages=3), dict(tiles, BLOCK_D=_pow2(dim, 16, 128), num_warps=8,
                                                             num_stages=2)
    tiles = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": _pow2(dim, 16, 64)}
    # the (64, BLOCK_D) fp32 gradient accumulator with its fp32 G and y operands: 256 columns fit without
    # spilling on sm_90 and sm_80 (the resource report, unit column strides as a contiguous launch has them)
    del capability  # keyed by it so that a per-architecture choice stays fixed; none is needed today
    block_d = _pow2(dim, 16, 256)
    return dict(tiles, num_warps=8, num_stages=3), dict(tiles, BLOCK_D=block_d, num_warps=8, num_stages=2)


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(logits, gradient) dot precisions. fp32 inputs follow torch's matmul setting: IEEE by default (as torch's
    fp32 matmul), TF32 after torch.set_float32_matmul_precision("high"/"medium") or allow_tf32 = True."""
    if dtype == torch.float32:
        mode = fp32_dot_precision(_INTERPRET)
        return mode, mode
    return "ieee", "tf32"  # 16-bit logits use the tensor cores whatever the flag says


def _bias_arg(scale: torch.Tensor, bias: torch.Tensor | None, siglip: bool) -> torch.Tensor:
    if bias is None:  # InfoNCE never reads it (any valid pointer); SigLIP without a bias means bias 0
        return torch.zeros((), dtype=torch.float32, device=scale.device) if siglip else scale
    return bias


def row_grid(n_rows: int, dim: int, cfg: dict, block: str = "BLOCK_M", splits: int | None = None) -> tuple:
    """(row or column blocks on axis 0 — CUDA allows 2^31 - 1 there —, D chunks on axis 1: a few for any real D
    [, column slices on axis 2: at most a few hundred, see :func:`column_splits`])."""
    grid = (triton.cdiv(n_rows, cfg[block]), triton.cdiv(dim, cfg.get("BLOCK_D", dim)))
    return grid if splits is None else (*grid, splits)


# Column slices hold at least this many columns: each program then runs >= 4 tiles of 64 columns, enough to hide
# its prologue and keep the partial results (splits × rows) small next to the inputs.
MIN_SPLIT_COLUMNS = 256


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def column_splits(programs: int, n_cols: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(slices, columns per slice) of the column loop (flash-decoding style, Dao et al. 2023): the row-block
    programs alone (``programs``: cdiv(b, BLOCK_M) · D chunks) are 4–16 on a 132-SM GPU for a local batch of
    256–1024 against 32k gathered columns; splitting the columns into slices whose partial results are merged in
    a fixed order gives about two programs per SM for any local batch. The slice count depends on the GPU's SM
    count only (results are bitwise reproducible on the same GPU model, as the fixed configs are). Slices are
    whole column tiles and never empty. Off a GPU (the interpreter): two slices once there are two column
    tiles, so that the tests run the merge."""
    if device.type == "cuda":
        wanted = triton.cdiv(2 * _sm_count(device.index if device.index is not None else
                                           torch.cuda.current_device()), programs)
        min_cols = MIN_SPLIT_COLUMNS
    else:
        wanted, min_cols = 2, block_n
    splits = max(1, min(wanted, n_cols // max(min_cols, block_n), 65_535))
    per = triton.cdiv(triton.cdiv(n_cols, splits), block_n) * block_n
    return triton.cdiv(n_cols, per), per


def contrastive_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, offset: int,
                    kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (b,) fp32, lse (b,) fp32 for infonce / (0,) for siglip). x: (b, D), y: (B, D), scale/bias 0-dim.

    The column slices' partials merge in a fixed order: lse = log Σ_s e^{lse_s} (torch.logsumexp), the positive
    logit and the SigLIP sums add (the positive lies in one slice; the others contribute 0)."""
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    siglip = kind == "siglip"
    precision, _ = _precisions(x.dtype)
    cfg, _ = _config(dim, x.dtype, precision, capability=_capability(x))
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    splits, per = column_splits(row_blocks, n_cols, cfg["BLOCK_N"], x.device)
    parts = torch.empty((splits, n_rows), dtype=torch.float32, device=x.device)
    lse_parts = torch.empty((0 if siglip else splits, n_rows), dtype=torch.float32, device=x.device)
    grid = checked_grid("contrastive.fwd", (row_blocks, splits), x.device)
    with launch_context("contrastive.fwd", x):
        _fwd_kernel[grid](x, y, scale, _bias_arg(scale, bias, siglip), parts, lse_parts if not siglip else parts,
                          n_rows, n_cols, dim, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1), per,
                          SIGLIP=siglip, PRECISION=precision, **cfg)
    if siglip:
        return (parts[0] if splits == 1 else parts.sum(0)), lse_parts.new_empty(0)
    lse = lse_parts[0] if splits == 1 else torch.logsumexp(lse_parts, dim=0)
    return lse - (parts[0] if splits == 1 else parts.sum(0)), lse


def _split_out(like: torch.Tensor, splits: int) -> torch.Tensor:
    """dx's output for the kernels: ``like``'s dtype for one slice, else fp32 partials (splits, b, D)."""
    if splits == 1:
        return torch.empty((1, *like.shape), dtype=like.dtype, device=like.device)
    return torch.empty((splits, *like.shape), dtype=torch.float32, device=like.device)


def _merge(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out[0] if out.shape[0] == 1 else out.sum(0).to(dtype)  # fixed-order sum over the slices


def contrastive_bwd(drow: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, lse: torch.Tensor, offset: int, kind: str):
    """(dx (b, D), dy (B, D), dscale 0-dim fp32, dbias 0-dim fp32 or None) for upstream drow (b,). dx's column
    loop is split as the forward's (:func:`column_splits`); dy has one program per column block already."""
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    siglip = kind == "siglip"
    drow = drow.contiguous()
    dy = torch.empty((n_cols, dim), dtype=y.dtype, device=y.device)
    precision, grad_precision = _precisions(x.dtype)
    _, cfg = _config(dim, x.dtype, precision, capability=_capability(x))
    row_blocks, d_chunks = row_grid(n_rows, dim, cfg)
    splits, per = column_splits(row_blocks * d_chunks, n_cols, cfg["BLOCK_N"], x.device)
    dx = _split_out(x, splits)
    dx_grid = checked_grid("contrastive.bwd_dx", row_grid(n_rows, dim, cfg, splits=splits), x.device)
    dy_grid = checked_grid("contrastive.bwd_dy", row_grid(n_cols, dim, cfg, "BLOCK_N"), x.device)
    partial = torch.empty((splits, 2, row_blocks), dtype=torch.float32, device=x.device)
    lse_arg = drow if siglip else lse
    common = dict(SIGLIP=siglip, PRECISION=precision, GRAD_PRECISION=grad_precision, **cfg)
    bias_arg = _bias_arg(scale, bias, siglip)
    with launch_context("contrastive.bwd", x):
        _bwd_dx_kernel[dx_grid](
            x, y, scale, bias_arg, lse_arg, drow, dx, partial, n_rows, n_cols, dim, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), dx.stride(1), dx.stride(0), row_blocks, per, **common)
        _bwd_dy_kernel[dy_grid](
            x, y, scale, bias_arg, lse_arg, drow, dy, n_rows, n_cols, dim, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), dy.stride(0), **common)
    sums = partial.sum(dim=(0, 2))
    return _merge(dx, x.dtype), dy, sums[0], (sums[1] if siglip and bias is not None else None)


def infonce_pair_bwd(d_img: torch.Tensor, d_txt: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
                     scale: torch.Tensor, lse_img: torch.Tensor, lse_txt: torch.Tensor):
    """Single-process InfoNCE backward of both directions at once: rows terms r_img (images vs texts, row lse
    ``lse_img``) and r_txt (texts vs images, ``lse_txt``) with upstreams d_img, d_txt (B,). Two launches of the
    pair kernel (image rows, then text rows) instead of four: each logits tile serves both directions; the
    column loop is split as in :func:`contrastive_bwd`. Returns (d image (B, D), d text (B, D), dscale 0-dim fp32)."""
    n, dim = img.shape
    d_img, d_txt = d_img.contiguous(), d_txt.contiguous()
    precision, grad_precision = _precisions(img.dtype)
    _, cfg = _config(dim, img.dtype, precision, capability=_capability(img))
    row_blocks, d_chunks = row_grid(n, dim, cfg)
    splits, per = column_splits(row_blocks * d_chunks, n, cfg["BLOCK_N"], img.device)
    grid = checked_grid("contrastive.bwd_pair", row_grid(n, dim, cfg, splits=splits), img.device)
    partial = torch.empty((2, splits, row_blocks), dtype=torch.float32, device=img.device)
    grads = []
    with launch_context("contrastive.bwd_pair", img):
        for i, (x, y, lse_r, lse_c, dr, dc) in enumerate(((img, txt, lse_img, lse_txt, d_img, d_txt),
                                                           (txt, img, lse_txt, lse_img, d_txt, d_img))):
            dx = _split_out(x, splits)
            _bwd_pair_kernel[grid](x, y, scale, lse_r, lse_c, dr, dc, dx, partial[i], n, dim,
                                   x.stride(0), x.stride(1), y.stride(0), y.stride(1), dx.stride(1), dx.stride(0),
                                   row_blocks, per, PRECISION=precision, GRAD_PRECISION=grad_precision, **cfg)
            grads.append(_merge(dx, x.dtype))
    # each launch sums dscale over the whole (B, B) tile grid; they differ only by rounding: keep the first
    return grads[0], grads[1], partial[0].sum()


# ---- every GPU config, for the static resource report (benchmarks/kernel_resources.py) -----------------------

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_SIZES = ("n_rows", "n_cols", "dim", "offset", "sx0", "sx1", "sy0", "sy1")
_UNIT = ("sx1", "sy1")  # column strides: 1 for contiguous embeddings (the launch Triton specialises)
# what a real launch sees as multiples of 16: the tensors' pointers, D and the row strides (for D % 16 == 0);
# not the batch sizes, the offset nor the unit column strides
_ALIGNED = ("x_ptr", "y_ptr", "dx_ptr", "dy_ptr", "lse_ptr", "lse_row_ptr", "lse_col_ptr", "drow_ptr", "dcol_ptr",
              "rows_out_ptr", "lse_out_ptr", "dim", "sx0", "sy0", "sdx0", "sdy0", "sdxs",
              "cols_per_split")


def static_variants(dims=(256, 512, 768, 1024)) -> list[KernelVariant]:
    """Every (kernel, dtype, D, flags) config a GPU launch uses — there is no autotuning, so each is also the
    deterministic default — with the signature a real launch has."""
    variants = []
    for dtype, precisions in ((torch.bfloat16, ("ieee",)), (torch.float16, ("ieee",)),
                              (torch.float32, ("ieee", "tf32"))):
        ptr = "*" + _TYPES[dtype]
        for precision in precisions:
            grad_precision = "tf32" if dtype != torch.float32 else precision
            for dim in dims:
                per_cc = {cc: _config(dim, dtype, precision, interpret=False, capability=(cc // 10, cc % 10))
                          for cc in (90, 80)}
                for kind in ("infonce", "siglip"):
                    flags = kind + (",tf32" if dtype == torch.float32 and precision == "tf32" else "")
                    common = {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32"}
                    # a launch on contiguous embeddings has unit column strides, which Triton specialises to the
                    # constant 1 (vectorised loads, cp.async); as i32 arguments they hide both from the report
                    sizes = {n: "i32" for n in _SIZES if n not in _UNIT}
                    kernels = [
                        ("contrastive.fwd", _fwd_kernel, 0,
                         {**common, "rows_out_ptr": "*fp32", "lse_out_ptr": "*fp32", **sizes,
                          "cols_per_split": "i32"}),
                        ("contrastive.bwd_dx", _bwd_dx_kernel, 1,
                         {**common, "lse_ptr": "*fp32", "drow_ptr": "*fp32", "dx_ptr": ptr, "partial_ptr": "*fp32",
                          **sizes, "sdx0": "i32", "sdxs": "i32", "n_row_blocks": "i32", "cols_per_split": "i32"}),
                        ("contrastive.bwd_dy", _bwd_dy_kernel, 1,
                         {**common, "lse_ptr": "*fp32", "drow_ptr": "*fp32", "dy_ptr": ptr, **sizes, "sdy0": "i32"}),
                    ]
                    consts = {"SIGLIP": kind == "siglip", "PRECISION": precision, "GRAD_PRECISION": grad_precision,
                              **dict.fromkeys(_UNIT, 1)}
                    if kind == "infonce":
                        kernels.append(("contrastive.bwd_pair", _bwd_pair_kernel, 1,
                                        {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "lse_row_ptr": "*fp32",
                                         "lse_col_ptr": "*fp32", "drow_ptr": "*fp32", "dcol_ptr": "*fp32",
                                         "dx_ptr": ptr, "partial_ptr": "*fp32", "n": "i32", "dim": "i32",
                                         "sx0": "i32", "sy0": "i32", "sdx0": "i32",
                                         "sdxs": "i32", "n_row_blocks": "i32", "cols_per_split": "i32"}))
                    for name, fn, which, signature in kernels:
                        cfgs = {cc: per_cc[cc][which] for cc in per_cc}
                        # one variant for both targets when their configs agree, else one per target
                        groups = [((90, 80), cfgs[90])] if cfgs[90] == cfgs[80] else [((cc,), c) for cc, c in cfgs.items()]
                        for targets, cfg in groups:
                            variants.append(make_variant(name, fn, cfg, signature, consts, dtype=_TYPES[dtype],
                                                         dim=dim, flags=flags, default=True, aligned=_ALIGNED,
                                                         targets=targets))
    return variants
