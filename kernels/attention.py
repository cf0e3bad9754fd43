r"""Triton fused attention with PrefixLM / causal / padding masks, batch-shared queries and a 2-D relative
position table — forward and backward (FlashAttention-2: Dao, 2023, arXiv:2307.08691).

Forward, per (batch b, head h, block of query rows), online softmax in fp32 with base-2 exponentials:

    s_ij = scale·q_i·k_j + bias_h(i, j)            (visible pairs only)
    m_i ← max(m_i, max_j s_ij),   l_i ← l_i·e^{m_old − m_i} + Σ_j e^{s_ij − m_i},   o_i ← o_i·e^{m_old − m_i} + Σ_j e^{s_ij − m_i}·v_j
    out_i = o_i / l_i,   lse_i = m_i + log l_i      (rows with no visible key: out 0, lse −inf)

Backward recomputes P = exp(S − lse) tile by tile (never Nq×Nk in memory), with Δ_i = rowsum(dO_i ⊙ O_i):

    dV = Pᵀ·dO,   dS = P ⊙ (dO·Vᵀ − Δ),   dK = scale·dSᵀ·Q   (one program per key block, loops over query blocks)
    dQ = scale·dS·K                                          (one program per query block, loops over key blocks
                                                              and, for batch-shared queries, over the batch)
    dtable[r, h] = Σ_b Σ_{index(i,j)=r} dS_bhij             (per key-block partial sums, reduced in a fixed order)

No float atomics anywhere: the backward is bitwise deterministic.

Masks are *parameters*: key j is visible to query i iff j < kv_lens[b] and, with causal/PrefixLM,
(j < prefix_lens[b] or j <= i + Nk − Nq). From them each program computes the key (or query) range that can be
visible and loops only over it, in two loops: tiles visible to every row of the block run without any mask
arithmetic (for PrefixLM the whole prefix block is dense), boundary tiles run with the mask.

Relative position bias (SimVLM; Swin/timm table layout, Liu et al., 2021, arXiv:2103.14030): tokens
t in [s, s + gh·gw) sit at (y, x) = divmod(t − s, gw); a pair gets table[(y_q − y_k + gh − 1)(2gw − 1) + x_q − x_k +
gw − 1, h]. The kernels gather it from a per-call head-major (H, R) copy of the table (small, L2-resident;
contiguous along a row's keys, see _rel_bias). For dtable, a key-block program skews
each dS tile so that its diagonals become rows (tl.gather): all pairs on one diagonal i − j = d with the same
sign of x_q − x_k share one table entry, so a tile reduces to 2·(BLOCK_M + BLOCK_N) sums with distinct table
rows. They accumulate in a register window that slides with the query loop; each diagonal is stored once when it
leaves the window (no read-modify-write, no barrier in the loop, which therefore keeps its cp.async pipelining),
and each program writes one row of a (programs, table) fp32 buffer, summed afterwards by torch in a fixed order.
With a table a dK/dV program handles a chunk of samples in turn, so that the buffer holds at most
max(B, key blocks)·H rows.

The dK/dV kernel works on transposed tiles (Sᵀ = K·Qᵀ, keys × queries) so that Pᵀ and dSᵀ are MMA operands as
computed, and runs one loop body for dense, boundary and tail tiles (a per-tile mask flag).

Grids put blocks × batch·heads on axis 0 (blocks fastest): CUDA caps axes 1 and 2 at 65 535. Every launch runs
inside the tensors' device guard. Deterministic mode (kernels/_launch.py) launches one fixed config per (dtype,
head dim, capability) instead of autotuning; fp32 dots use TF32 only on torch's opt-in.

Few queries (attention pooling, CoCa: 1 and 256 learnable queries shared by the batch): the forward splits the
keys over several programs when n_query <= 16 would leave the GPU idle (split-K, partial results merged by their
lse), and the dQ kernel splits the batch into chunks whose fp32 partial sums are added in a fixed order.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from vlcore.kernels._launch import (
    KernelVariant,
    checked_grid,
    deterministic,
    fp32_dot_precision,
    launch_context,
)
from vlcore.kernels.attention_limits import SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _seq_bucket(n: int) -> int:
    """Autotune key: sequence lengths in power-of-two buckets from 64 to 8192. The buckets (N_BUCKET, Q_BUCKET)
    are plain int arguments the kernels ignore, so a new bucket re-tunes without a new specialisation."""
    return min(max(triton.next_power_of_2(max(n, 1)), 64), 8192)


# ---- tile configs --------------------------------------------------------------------------------------
# Under the interpreter autotuning is far too slow: one small config (a single config is never benchmarked).
# Without autotuning (deterministic mode, VLCORE_ATTENTION_AUTOTUNE=0) every kernel uses the one config
# _fixed_shape gives for its (dtype, head dim, device capability).

def _config(bm, bn, warps, stages, skew=False):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if skew:  # width of the dtable skew: the tile's BLOCK_M + BLOCK_N − 1 diagonals, rounded up
        kw["SKEW_W"] = triton.next_power_of_2(bm + bn - 1)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _configs(shapes, large_d_shapes, skew=False):
    """Autotune list: the configs for head dims <= 128 and those for larger ones (the pruner keeps one set)."""
    if _INTERPRET:
        return [_config(*_INTERPRET_BLOCKS, 4, 1, skew)]
    unique = list(dict.fromkeys(list(shapes) + list(large_d_shapes)))
    return [_config(*shape, skew) for shape in unique]


# (BLOCK_M, BLOCK_N, warps, stages): H100/H200 favour 128×64/128 tiles with 8 warps and 3–4 stages at D=128;
# A100 and small head dims favour 128×32/64 with 4 warps; short sequences favour 64-row blocks (more programs).
# Few queries (attention pooling: n_query = 1 .. 32) get 16/32-row blocks: the work is reading K and V.
_FWD_SHAPES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3),
               (64, 128, 8, 3), (64, 32, 4, 4), (128, 64, 8, 4),
               (16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3)]
# dK/dV: BLOCK_N keys per program, loops over BLOCK_M query rows.
# The transposed loop body keeps dK and dV (BLOCK_N × D fp32) plus K and V in registers: 8 warps for 64 keys at
# D = 128 fit without spilling on sm_90 and sm_80 (the resource report); 4 warps fit at D <= 64.
_DKDV_SHAPES = [(32, 64, 8, 2), (32, 64, 8, 3), (32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2),
                (32, 32, 4, 2), (16, 64, 4, 2), (16, 128, 4, 2)]
# dQ: BLOCK_M rows per program, loops over BLOCK_N keys.
# dQ keeps Q, dO and the dQ accumulator (BLOCK_M × D) in registers: 8 warps for 64 rows at D = 128.
_DQ_SHAPES = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3),
              (32, 32, 4, 2), (16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 4, 2)]
# Head dims 136..256 (padded to 256): every (rows, 256) fp32 accumulator costs rows·256/threads registers and
# every K/V stage rows·256·bytes of shared memory, so fewer rows and keys per tile, 8 warps, 1–2 stages.
_FWD_SHAPES_LARGE_D = [(64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2), (16, 64, 4, 2),
                       (32, 32, 4, 2)]
_DKDV_SHAPES_LARGE_D = [(16, 32, 8, 2), (32, 32, 8, 1), (32, 64, 8, 1), (16, 32, 8, 1), (16, 64, 8, 1)]
_DQ_SHAPES_LARGE_D = [(32, 32, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2), (64, 32, 8, 1)]
# fp32 without TF32 (IEEE, torch's default): tl.dot runs on the FMA units, and each thread holds its rows (or
# columns) of both operands over the whole reduction dimension in registers, so the 16-bit tiles spill 0.2–10 KB
# per thread. Few keys per tile (the K of P·V) and 8 warps keep every fp32 config free of spills (the resource
# report), at two stages (cp.async kept). Per kernel: (D <= 64, D <= 128, D <= 256).
_FP32_FIXED = {"fwd": [(32, 16, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
               "dkdv": [(16, 16, 8, 2), (16, 16, 8, 2), (16, 16, 8, 2)],
               "dq": [(32, 16, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)]}
# ptxas's FMA schedules spill 8–24 B in a few (kernel, padded head dim, table, causal) cases of the table above,
# each fixed by a neighbouring tile (measured on sm_90 and sm_80): -> shape
_FP32_EXCEPTIONS = {("dq", 128, False, True): (16, 16, 8, 2), ("dkdv", 128, True, True): (16, 32, 8, 2),
                    ("dkdv", 64, True, False): (32, 16, 8, 2)}

_KEY = ["HEAD_DIM", "N_BUCKET", "Q_BUCKET", "CAUSAL", "HAS_PREFIX", "HAS_KVLEN", "HAS_BIAS"]
_INTERPRET_BLOCKS = (32, 32)


# ---- shared device helpers -----------------------------------------------------------------------------

@triton.jit
def _block_and_head(n, BLOCK: tl.constexpr):
    """(block index, batch·heads index) of this program. Grid axis 0 holds blocks × batch·heads, blocks
    fastest (programs of one (b, h) run together and share K/V in L2): CUDA caps axes 1 and 2 at 65 535, which
    batch·heads passes for Swin (windows folded into the batch) or embedding extraction at B = 4096."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    return pid % blocks, pid // blocks


@triton.jit
def _load2d(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROW_MASK: tl.constexpr):
    """Load a (rows, D_PAD) tile; masks only what may be out of bounds (padded head dim, tail rows)."""
    if ROW_MASK:
        if D_PAD == HEAD_DIM:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if D_PAD == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _lens(b, NK, PrefixLens, KvLens, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """(kv_len, prefix) of sample b: keys < kv_len exist; keys < prefix are visible to every row."""
    kv_len = NK
    if HAS_KVLEN:
        kv_len = tl.load(KvLens + b)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLens + b)
    return kv_len, prefix


@triton.jit
def _key_range(start_m, NQ, NK, kv_len, prefix, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys a query block [start_m, start_m + BLOCK_M) may see: tiles below `dense_end` are visible to every
    row (no mask arithmetic), tiles in [dense_end, hi) are boundary tiles, keys >= hi are never loaded."""
    hi = kv_len
    dense = kv_len
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, NQ) - 1
        hi = tl.minimum(hi, tl.maximum(last_row + NK - NQ + 1, prefix))
        dense = tl.minimum(dense, tl.maximum(start_m + NK - NQ + 1, prefix))
    hi = tl.maximum(hi, 0)
    dense = tl.maximum(tl.minimum(dense, hi), 0)
    return (dense // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _visible(offs_m, offs_n, NQ, NK, kv_len, prefix, CAUSAL: tl.constexpr):
    vis = (offs_n < kv_len)[None, :]
    if CAUSAL:
        vis = vis & ((offs_n[None, :] <= offs_m[:, None] + (NK - NQ)) | (offs_n < prefix)[None, :])
    return vis


@triton.jit
def _rel_bias(Table, stride_th, h, offs_m, offs_n, GH, GW, REL_START, KEYS_FIRST: tl.constexpr):
    """Bias tile in fp32 read from the table (0 outside the grid), Swin/timm index: (BLOCK_M, BLOCK_N), or
    (BLOCK_N, BLOCK_M) with KEYS_FIRST (the dK/dV kernel's transposed scores).

    ``Table`` is the launcher's per-call head-major copy (H, R) of the (R, H) parameter, row stride
    ``stride_th``: neighbouring keys (x_k, x_k + 1) of a row read neighbouring entries (index − 1), so a warp's
    gather touches a few 32-byte sectors. Read from the (R, H) layout, each lane's entry lay H elements from its
    neighbour's: one sector per lane (~8K sectors per 128×64 tile, about twice the tile's MMA time)."""
    tq = offs_m - REL_START
    tk = offs_n - REL_START
    in_q = (tq >= 0) & (tq < GH * GW)
    in_k = (tk >= 0) & (tk < GH * GW)
    tq = tl.where(in_q, tq, 0)
    tk = tl.where(in_k, tk, 0)
    if KEYS_FIRST:
        yq, xq, yk, xk = (tq // GW)[None, :], (tq % GW)[None, :], (tk // GW)[:, None], (tk % GW)[:, None]
        mask = in_k[:, None] & in_q[None, :]
    else:
        yq, xq, yk, xk = (tq // GW)[:, None], (tq % GW)[:, None], (tk // GW)[None, :], (tk % GW)[None, :]
        mask = in_q[:, None] & in_k[None, :]
    idx = (yq - yk + (GH - 1)) * (2 * GW - 1) + xq - xk + (GW - 1)
    return tl.load(Table + h * stride_th + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _touches_grid(start_m, start_n, GH, GW, REL_START, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Does the tile (rows from start_m, keys from start_n) hold a pair with both tokens in the grid? Tiles that
    do not (text tokens) skip the bias gather and the dtable reduction."""
    end = REL_START + GH * GW
    return (start_m < end) & (start_m + BLOCK_M > REL_START) & (start_n < end) & (start_n + BLOCK_N > REL_START)


@triton.jit
def _scores(a, b, start_m, start_n, offs_m, offs_n, qk_scale, Table, stride_th, h, GH, GW, REL_START,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
            KEYS_FIRST: tl.constexpr):
    """log2-domain scores scale·a·bᵀ (+ the table's bias where the tile meets the grid), shared by the forward and
    both backward kernels so they recompute the same values: (a, b) = (q, k) gives the (BLOCK_M, BLOCK_N) tile,
    (k, q) with KEYS_FIRST its transpose Sᵀ (the dK/dV kernel, whose P and dS then feed the MMAs untransposed)."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        if _touches_grid(start_m, start_n, GH, GW, REL_START, BLOCK_M, BLOCK_N):
            bias = _rel_bias(Table, stride_th, h, offs_m, offs_n, GH, GW, REL_START, KEYS_FIRST)
            s += bias * 1.4426950408889634
    return s


# ---- forward -------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(q, m_i, l_i, acc, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, NQ, NK,
              kv_len, prefix, hi, qk_scale, Table, stride_th, h, GH, GW, REL_START,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, hi, offs_d, HEAD_DIM, D_PAD, MASKED)
    v = _load2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, hi, offs_d, HEAD_DIM, D_PAD, MASKED)
    s = _scores(q, k, start_m, start_n, offs_m, offs_n, qk_scale, Table, stride_th, h, GH, GW, REL_START,
                HAS_BIAS, BLOCK_M, BLOCK_N, DOT_PRECISION, False)
    if MASKED:
        s = tl.where(_visible(offs_m, offs_n, NQ, NK, kv_len, prefix, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, PrefixLens, KvLens, Table,
                stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_os, stride_ob, stride_on, stride_oh, stride_ls, stride_th,
                H, NQ, NK, SPLITS, qk_scale, GH, GW, REL_START,
                N_BUCKET, Q_BUCKET, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = _block_and_head(NQ, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load2d(Q + tl.cast(b, tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    k_base = K + tl.cast(b, tl.int64) * stride_kb + h * stride_kh
    v_base = V + tl.cast(b, tl.int64) * stride_vb + h * stride_vh
    kv_len, prefix = _lens(b, NK, PrefixLens, KvLens, HAS_PREFIX, HAS_KVLEN)
    dense_end, hi = _key_range(start_m, NQ, NK, kv_len, prefix, CAUSAL, BLOCK_M, BLOCK_N)
    # split-K (few queries, few programs): this program covers keys [lo, up) only, whole tiles
    split = tl.program_id(1)
    keys_per_split = tl.cdiv(tl.cdiv(NK, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * keys_per_split
    up = lo + keys_per_split

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(lo, tl.minimum(dense_end, up), BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                  NQ, NK, kv_len, prefix, hi, qk_scale, Table, stride_th, h, GH, GW,
                                  REL_START, HEAD_DIM, D_PAD, CAUSAL, HAS_BIAS, False, BLOCK_M, BLOCK_N, DOT_PRECISION)
    for start_n in range(tl.maximum(dense_end, lo), tl.minimum(hi, up), BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                  NQ, NK, kv_len, prefix, hi, qk_scale, Table, stride_th, h, GH, GW,
                                  REL_START, HEAD_DIM, D_PAD, CAUSAL, HAS_BIAS, True, BLOCK_M, BLOCK_N, DOT_PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows that saw nothing have acc = 0: output 0, not NaN
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row_ok = offs_m < NQ
    o_ptrs = (Out + tl.cast(split, tl.int64) * stride_os + tl.cast(b, tl.int64) * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_on + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + tl.cast(split, tl.int64) * stride_ls + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=row_ok)


# ---- backward ------------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(Out, DOut, Delta, stride_ob, stride_on, stride_oh, stride_db, stride_dn, stride_dh, H, NQ,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ[b, h, i] = Σ_d dO·O in fp32 (the rowsum(P ⊙ dP) of the softmax backward)."""
    pid_m, pid_bh = _block_and_head(NQ, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load2d(Out + tl.cast(b, tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    do = _load2d(DOut + tl.cast(b, tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _load_row_stats(Lse, Delta, row_base, offs_m, NQ):
    """log2-domain lse (+inf for rows that see nothing or lie past NQ, so that P = 0 there) and Δ."""
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < NQ, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < NQ, other=0.0)
    return lse, delta


@triton.jit
def _diagonal_sums(ds_t, start_n, offs_m, offs_n, GH, GW, REL_START, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   W: tl.constexpr):
    """(right, left) sums of dSᵀ (keys × queries) per local diagonal e = i − j + BLOCK_N − 1 of the tile (W >=
    BLOCK_M + BLOCK_N − 1 of them; pairs outside the grid count 0).

    Pairs on a diagonal i − j = d share (y_q − y_k, x_q − x_k) up to the sign of x_q − x_k, so a gather moves
    the diagonals into rows and two row sums (x_q >= x_k: "right", x_q < x_k: "left") give one table entry each.
    """
    tq = offs_m - REL_START
    tk = offs_n - REL_START
    in_q = (tq >= 0) & (tq < GH * GW)
    in_k = (tk >= 0) & (tk < GH * GW)
    ds_t = tl.where(in_k[:, None] & in_q[None, :], ds_t, 0.0)
    offs_e = tl.arange(0, W)
    row = tl.arange(0, BLOCK_M)[None, :] + (BLOCK_N - 1) - offs_e[:, None]  # key row of (diagonal, query column)
    on_tile = (row >= 0) & (row < BLOCK_N)
    row = tl.where(on_tile, row, 0)
    skewed = tl.where(on_tile, tl.gather(ds_t, row, 0), 0.0)
    right = (tl.where(in_q, tq, 0) % GW)[None, :] >= (tl.maximum(start_n + row - REL_START, 0) % GW)
    return tl.sum(tl.where(right, skewed, 0.0), 1), tl.sum(tl.where(right, 0.0, skewed), 1)


@triton.jit
def _store_diagonals(win_right, win_left, base_m, start_n, Row, GH, GW, LIMIT, BLOCK_N: tl.constexpr,
                     W: tl.constexpr):
    """Store window entries e < LIMIT (diagonal d = base_m − start_n + e − (BLOCK_N − 1)) at their table rows in
    the program's staging row. (d, side) ↔ table entry is one-to-one and each diagonal leaves the window once per
    sample, so these are plain stores (no read-modify-write: no barrier); threads holding replicas of a sum
    store the same value."""
    offs_e = tl.arange(0, W)
    d = base_m - start_n + offs_e - (BLOCK_N - 1)
    dx = ((d % GW) + GW) % GW  # x_q - x_k for the "right" pairs (>= 0); the "left" pairs have dx - GW
    dy = (d - dx) // GW
    ok_right = (dy > -GH) & (dy < GH) & (offs_e < LIMIT)
    ok_left = (dx != 0) & (dy + 1 > -GH) & (dy + 1 < GH) & (offs_e < LIMIT)
    r_right = (dy + GH - 1) * (2 * GW - 1) + dx + GW - 1
    r_left = r_right + (2 * GW - 1) - GW  # (dy + 1, dx - GW)
    tl.store(Row + r_right, win_right, mask=ok_right)
    tl.store(Row + r_left, win_left, mask=ok_left)


@triton.jit
def _shift_window(win, SHIFT: tl.constexpr, W: tl.constexpr):
    """win[e + SHIFT] at e (0 past the end): the next query tile's window starts SHIFT diagonals later."""
    idx = tl.arange(0, W) + SHIFT
    return tl.where(idx < W, tl.gather(win, tl.minimum(idx, W - 1), 0), 0.0)


@triton.jit
def _visible_t(offs_n, offs_m, NQ, NK, kv_len, prefix, CAUSAL: tl.constexpr):
    """_visible transposed: (BLOCK_N keys, BLOCK_M queries)."""
    vis = (offs_n < kv_len)[:, None]
    if CAUSAL:
        vis = vis & ((offs_n[:, None] <= offs_m[None, :] + (NK - NQ)) | (offs_n < prefix)[:, None])
    return vis


@triton.jit
def _dkdv_tile(k, v, dk, dv, win_right, win_left, start_m, start_n, q_base, do_base, stride_qn, stride_dn, row_base,
               Lse, Delta, offs_n, offs_d, NQ, NK, kv_len, prefix, masked, qk_scale, Table, stride_th, h,
               GH, GW, REL_START, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SKEW_W: tl.constexpr):
    """One query tile of the dK/dV loop, computed transposed (keys × queries, as Triton's fused-attention tutorial
    does): Sᵀ = K·Qᵀ, so Pᵀ and dSᵀ are the *A* operands of dV += Pᵀ·dO and dK += dSᵀ·Q straight from the
    accumulator registers, and only the loaded Q and dO tiles are transposed (for free, as shared-memory
    descriptors). Computing S = Q·Kᵀ instead made tl.trans(P), tl.trans(dS) register shuffles that spilled.
    ``masked`` (a per-tile flag) applies the visibility mask only on boundary tiles; rows past NQ have P = 0
    through their lse (+inf), so the one loop body serves dense, boundary and tail tiles alike. With a table the
    tile's dS is added, per diagonal, to the (right, left) window sums (no memory traffic here)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load2d(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    do = _load2d(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    lse, delta = _load_row_stats(Lse, Delta, row_base, offs_m, NQ)
    s_t = _scores(k, q, start_m, start_n, offs_m, offs_n, qk_scale, Table, stride_th, h, GH, GW,
                  REL_START, HAS_BIAS, BLOCK_M, BLOCK_N, DOT_PRECISION, True)
    p_t = tl.math.exp2(s_t - lse[None, :])
    if masked:
        p_t = tl.where(_visible_t(offs_n, offs_m, NQ, NK, kv_len, prefix, CAUSAL), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        if _touches_grid(start_m, start_n, GH, GW, REL_START, BLOCK_M, BLOCK_N):
            sum_right, sum_left = _diagonal_sums(ds_t, start_n, offs_m, offs_n, GH, GW, REL_START, BLOCK_M, BLOCK_N,
                                                 SKEW_W)
            win_right += sum_right
            win_left += sum_left
    return dk, dv, win_right, win_left


@triton.jit
def _dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, PrefixLens, KvLens, Table, DTab,
                 stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                 stride_db, stride_dn, stride_dh, stride_dkb, stride_dkn, stride_dkh,
                 stride_dvb, stride_dvn, stride_dvh, stride_th,
                 H, NQ, NK, BATCH, CHUNK, qk_scale, scale, GH, GW, REL_START, TABLE_SIZE,
                 N_BUCKET, Q_BUCKET, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKEW_W: tl.constexpr,
                 T_PAD: tl.constexpr, ACC_IN_REGS: tl.constexpr):
    """One program per (key block, chunk of CHUNK samples, head): dK, dV of each sample of the chunk in turn, and
    the chunk's dtable partial sums in the program's own buffer row. Without a table CHUNK = 1; with one the
    launcher picks CHUNK so that the buffer holds at most max(B, key blocks)·H rows (not B·H·key blocks).

    dtable without a read-modify-write in the query loop (which needed two barriers per tile and kept the loop
    from being software-pipelined): the key block is fixed, so query tile t covers the diagonals from
    t·BLOCK_M − start_n − BLOCK_N + 1 on; a window of SKEW_W diagonal sums (right/left) slides along, and after
    each tile its first BLOCK_M diagonals are final: stored once (plain stores) at their table entries in the
    program's buffer row, which stages the sample. After each sample (outside the loop) the staged row is added
    to a (T_PAD,) register accumulator in a fixed order and zeroed; the program writes its row once at the end.
    Tables larger than T_PAD (ACC_IN_REGS false: > 1024 entries, whose register accumulator spilled on sm_80) use
    a second buffer row as the accumulator instead, folded in T_PAD-wide chunks; the launcher reads the first."""
    pid_n, pid_bh = _block_and_head(NK, BLOCK_N)
    chunk = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rows_per_program = 1 if ACC_IN_REGS else 2
    DTab_row = DTab + (pid_bh.to(tl.int64) * tl.cdiv(NK, BLOCK_N) + pid_n) * TABLE_SIZE * rows_per_program
    Acc_row = DTab_row + TABLE_SIZE  # the accumulator row of a large table
    offs_t = tl.arange(0, T_PAD)  # one thread per entry (T_PAD >= threads): no replicas in the staging passes
    dtab = tl.zeros([T_PAD], tl.float32)
    if HAS_BIAS:  # this program owns its buffer rows: zero them (autotuning reruns the kernel; stores skip entries)
        for t0 in range(0, TABLE_SIZE, T_PAD):
            tl.store(DTab_row + t0 + offs_t, dtab, mask=t0 + offs_t < TABLE_SIZE)
            if not ACC_IN_REGS:
                tl.store(Acc_row + t0 + offs_t, dtab, mask=t0 + offs_t < TABLE_SIZE)
        tl.debug_barrier()
    for b in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, BATCH)):  # fixed order: deterministic
        b64 = tl.cast(b, tl.int64)
        k = _load2d(K + b64 * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    offs_n, NK, offs_d, HEAD_DIM, D_PAD, True)
        v = _load2d(V + b64 * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    offs_n, NK, offs_d, HEAD_DIM, D_PAD, True)
        q_base = Q + tl.cast(b, tl.int64) * stride_qb + h * stride_qh
        do_base = DOut + tl.cast(b, tl.int64) * stride_db + h * stride_dh
        row_base = (tl.cast(b, tl.int64) * H + h) * NQ

        # Query rows that may see this key block: [lo, dense_lo) need the mask, [dense_lo, NQ) are visible to
        # every row that exists (rows past NQ have P = 0 through their lse).
        kv_len, prefix = _lens(b, NK, PrefixLens, KvLens, HAS_PREFIX, HAS_KVLEN)
        n_blocks_q = tl.cdiv(NQ, BLOCK_M) * BLOCK_M
        lo = start_n * 0
        dense_lo = start_n * 0
        if CAUSAL:
            if start_n >= prefix:
                lo = tl.maximum(start_n - (NK - NQ), 0)
            last_key = tl.minimum(start_n + BLOCK_N, NK) - 1
            if last_key >= prefix:
                dense_lo = tl.maximum(last_key - (NK - NQ), 0)
        if start_n + BLOCK_N > kv_len:  # the block holds padding (or lies past NK): every tile needs the mask
            dense_lo = n_blocks_q
        if start_n >= kv_len:  # nothing visible: dK = dV = 0
            lo = n_blocks_q
        lo = (lo // BLOCK_M) * BLOCK_M
        dense_lo = tl.maximum(tl.cdiv(dense_lo, BLOCK_M) * BLOCK_M, lo)

        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        win_right = tl.zeros([SKEW_W], tl.float32)
        win_left = tl.zeros([SKEW_W], tl.float32)
        for start_m in range(lo, NQ, BLOCK_M):
            dk, dv, win_right, win_left = _dkdv_tile(
                k, v, dk, dv, win_right, win_left, start_m, start_n, q_base, do_base, stride_qn, stride_dn, row_base,
                Lse, Delta, offs_n, offs_d, NQ, NK, kv_len, prefix, start_m < dense_lo, qk_scale, Table,
                stride_th, h, GH, GW, REL_START, HEAD_DIM, D_PAD, CAUSAL, HAS_BIAS, BLOCK_M, BLOCK_N, DOT_PRECISION,
                SKEW_W)
            if HAS_BIAS:  # diagonals e < BLOCK_M get nothing from later tiles: store them, slide the window
                _store_diagonals(win_right, win_left, start_m, start_n, DTab_row, GH, GW, BLOCK_M, BLOCK_N, SKEW_W)
                win_right = _shift_window(win_right, BLOCK_M, SKEW_W)
                win_left = _shift_window(win_left, BLOCK_M, SKEW_W)
        if HAS_BIAS:  # the window's rest, then fold the staged sample into the registers (fixed order)
            m_end = lo + tl.cdiv(tl.maximum(NQ - lo, 0), BLOCK_M) * BLOCK_M
            _store_diagonals(win_right, win_left, m_end, start_n, DTab_row, GH, GW, SKEW_W, BLOCK_N, SKEW_W)
            tl.debug_barrier()  # every thread's stores are visible
            if ACC_IN_REGS:
                dtab += tl.load(DTab_row + offs_t, mask=offs_t < TABLE_SIZE, other=0.0)
                tl.store(DTab_row + offs_t, tl.zeros([T_PAD], tl.float32), mask=offs_t < TABLE_SIZE)
            else:  # each thread reads back only the entries it wrote in the previous fold: no barrier needed
                for t0 in range(0, TABLE_SIZE, T_PAD):
                    ok = t0 + offs_t < TABLE_SIZE
                    staged = tl.load(DTab_row + t0 + offs_t, mask=ok, other=0.0)
                    acc_t = tl.load(Acc_row + t0 + offs_t, mask=ok, other=0.0)
                    tl.store(Acc_row + t0 + offs_t, acc_t + staged, mask=ok)
                    tl.store(DTab_row + t0 + offs_t, tl.zeros([T_PAD], tl.float32), mask=ok)
            tl.debug_barrier()  # the next sample's stores come after every thread's fold

        mask = (offs_n < NK)[:, None] & (offs_d < HEAD_DIM)[None, :]
        dk_ptrs = DK + b64 * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + b64 * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        if ACC_IN_REGS:
            tl.store(DTab_row + offs_t, dtab, mask=offs_t < TABLE_SIZE)
        else:  # the result in the first row (the same thread wrote each entry of the accumulator)
            for t0 in range(0, TABLE_SIZE, T_PAD):
                ok = t0 + offs_t < TABLE_SIZE
                tl.store(DTab_row + t0 + offs_t, tl.load(Acc_row + t0 + offs_t, mask=ok, other=0.0), mask=ok)


@triton.jit
def _dq_tile(q, do, lse, delta, dq, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, NQ, NK, kv_len,
             prefix, hi, qk_scale, Table, stride_th, h, GH, GW, REL_START,
             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
             MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, hi, offs_d, HEAD_DIM, D_PAD, MASKED)
    v = _load2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, hi, offs_d, HEAD_DIM, D_PAD, MASKED)
    s = _scores(q, k, start_m, start_n, offs_m, offs_n, qk_scale, Table, stride_th, h, GH, GW, REL_START,
                HAS_BIAS, BLOCK_M, BLOCK_N, DOT_PRECISION, False)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, offs_n, NQ, NK, kv_len, prefix, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, PrefixLens, KvLens, Table,
               stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
               stride_db, stride_dn, stride_dh, stride_dqb, stride_dqn, stride_dqh, stride_th,
               H, NQ, NK, BATCH, CHUNK, qk_scale, scale, GH, GW, REL_START,
               N_BUCKET, Q_BUCKET, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, chunk of CHUNK samples, head), writing DQ[chunk]. Own queries: CHUNK = 1.
    Shared queries: the chunk's samples are summed in a fixed order in registers; with several chunks DQ is an
    fp32 (chunks, Nq, H, D) buffer the launcher sums in a fixed order (split over the batch: more programs
    when Nq·H is small, as for attention pooling, and still deterministic).

    This separate pass recomputes S and dP: the backward runs 7 tile matmuls (4 in dK/dV, 3 here) where
    FlashAttention-2 runs 5, accumulating dQ inside the dK/dV pass with float atomics (not deterministic). The
    deterministic form of that (each key block writes an fp32 dQ partial, reduced in a fixed order) trades the 2
    saved matmuls, 4·Nq·Nk·D FLOPs, for 2·(Nk/BLOCK_N)·Nq·D·4 bytes of partials written and read back:
    BLOCK_N/2 = 32 FLOPs per byte at 64 keys per block, far below an H100's ~295 FLOP/B ridge (989 TFLOP/s over
    3.35 TB/s), so it would be slower; its buffer (B·H·Nk/BLOCK_N·Nq·D fp32, 4.3 GB at B 64, H 16, N 1024, D 64)
    is unbounded as well. Hence 7 matmuls."""
    pid_m, pid_bh = _block_and_head(NQ, BLOCK_M)
    chunk = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load2d(Q + tl.cast(chunk, tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for b in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, BATCH)):
        do = _load2d(DOut + tl.cast(b, tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_dn
                     + offs_d[None, :], offs_m, NQ, offs_d, HEAD_DIM, D_PAD, True)
        lse, delta = _load_row_stats(Lse, Delta, tl.cast(b * H + h, tl.int64) * NQ, offs_m, NQ)
        k_base = K + tl.cast(b, tl.int64) * stride_kb + h * stride_kh
        v_base = V + tl.cast(b, tl.int64) * stride_vb + h * stride_vh
        kv_len, prefix = _lens(b, NK, PrefixLens, KvLens, HAS_PREFIX, HAS_KVLEN)
        dense_end, hi = _key_range(start_m, NQ, NK, kv_len, prefix, CAUSAL, BLOCK_M, BLOCK_N)
        for start_n in range(0, dense_end, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, NQ,
                          NK, kv_len, prefix, hi, qk_scale, Table, stride_th, h, GH, GW, REL_START,
                          HEAD_DIM, D_PAD, CAUSAL, HAS_BIAS, False, BLOCK_M, BLOCK_N, DOT_PRECISION)
        for start_n in range(dense_end, hi, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, start_m, start_n, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, NQ,
                          NK, kv_len, prefix, hi, qk_scale, Table, stride_th, h, GH, GW, REL_START,
                          HEAD_DIM, D_PAD, CAUSAL, HAS_BIAS, True, BLOCK_M, BLOCK_N, DOT_PRECISION)
    dq_ptrs = DQ + tl.cast(chunk, tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---- autotuned entry points (built lazily: the interpreter decision is read at import) -----------------

def _pruner(min_rows: int, large_d_shapes, bias_limit: bool = False, large_d_min_rows: int | None = None):
    """Keep the configs made for the head dim (<= 128 or larger), then the row-block sizes that fit the number
    of queries: <= Q_BUCKET rows for few queries, >= min_rows otherwise. With a rel-pos table (dK/dV kernel)
    the dtable skew's gather grows with BLOCK_M + BLOCK_N (compile time and registers): keep the tiles whose
    diagonals fit in 128 lanes. ``large_d_min_rows`` (default min_rows) for head dims > 128: the dQ kernel's
    64-row (rows, 256) fp32 accumulator spills, so it keeps 32-row blocks there."""
    large = set(large_d_shapes)
    large_d_min_rows = min_rows if large_d_min_rows is None else large_d_min_rows

    def prune(configs, named_args, **kwargs):
        get = lambda name, default: kwargs.get(name, named_args.get(name, default))
        shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        want_large = get("D_PAD", 64) > 128
        configs = [c for c in configs if (shape(c) in large) == want_large] or configs
        q_bucket = get("Q_BUCKET", 128)
        if q_bucket <= 32:
            kept = [c for c in configs if c.kwargs["BLOCK_M"] <= q_bucket]
        else:
            kept = [c for c in configs if c.kwargs["BLOCK_M"] >= (large_d_min_rows if want_large else min_rows)]
        if bias_limit and get("HAS_BIAS", False):
            kept = [c for c in kept if c.kwargs["SKEW_W"] <= 128]
        return kept or configs
    return prune


_PRUNERS = {"fwd": _pruner(64, _FWD_SHAPES_LARGE_D), "dkdv": _pruner(32, _DKDV_SHAPES_LARGE_D, bias_limit=True),
            "dq": _pruner(64, _DQ_SHAPES_LARGE_D, large_d_min_rows=32)}


@functools.cache
def _tuned():
    fwd = triton.autotune(_configs(_FWD_SHAPES, _FWD_SHAPES_LARGE_D), key=_KEY,
                          prune_configs_by={"early_config_prune": _PRUNERS["fwd"]})(_fwd_kernel)
    dkdv = triton.autotune(_configs(_DKDV_SHAPES, _DKDV_SHAPES_LARGE_D, skew=True), key=_KEY,
                           prune_configs_by={"early_config_prune": _PRUNERS["dkdv"]})(_dkdv_kernel)
    dq = triton.autotune(_configs(_DQ_SHAPES, _DQ_SHAPES_LARGE_D), key=_KEY,
                         prune_configs_by={"early_config_prune": _PRUNERS["dq"]})(_dq_kernel)
    return fwd, dkdv, dq


_JIT = {"fwd": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}


def _fixed_shape(kernel: str, dtype: torch.dtype, d_pad: int, capability: tuple[int, int], q_bucket: int,
                 has_bias: bool = False, causal: bool = False):
    """(BLOCK_M, BLOCK_N, warps, stages) used without autotuning (the interpreter: its small tiles)."""
    if _INTERPRET:
        return (*_INTERPRET_BLOCKS, 4, 1)
    return _gpu_fixed_shape(kernel, dtype, d_pad, capability, q_bucket, has_bias, causal)


def _gpu_fixed_shape(kernel: str, dtype: torch.dtype, d_pad: int, capability: tuple[int, int], q_bucket: int,
                     has_bias: bool = False, causal: bool = False):
    """One config per (kernel, dtype, head dim, capability, table or not, causal or not), each free of register
    spills and within the shared memory of its target in the resource report
    (benchmarks/results/static/resources.md)."""
    if dtype == torch.float32:  # (TF32 on opt-in runs these small tiles too)
        shape = _FP32_FIXED[kernel][0 if d_pad <= 64 else 1 if d_pad <= 128 else 2]
        shape = _FP32_EXCEPTIONS.get((kernel, d_pad, has_bias, causal), shape)
    elif d_pad <= 128:
        shape = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 8, 2)}[kernel]
        if kernel == "dkdv" and d_pad <= 64 and capability < (9, 0):
            shape = (16, 64, 4, 2)  # mma.sync keeps more per thread than wgmma: 8 warps at 32 rows spill there
        if kernel == "dkdv" and has_bias:  # the dtable window sums and skew gather need room: 32 keys per block
            shape = (32, 32, 8, 2)
        if kernel == "fwd" and has_bias and d_pad > 64 and capability < (9, 0):
            shape = (64, 32, 8, 2)  # mma.sync with the bias gather's indices: 4 warps spill at D = 128
    else:
        # dK/dV: two stages fit without spilling, one with a table (its window sums and skew need the registers)
        shape = {"fwd": (32, 32, 4, 2), "dkdv": (16, 32, 8, 1 if has_bias else 2), "dq": (32, 32, 8, 2)}[kernel]
        if kernel == "fwd" and capability < (9, 0):
            shape = (32, 32, 8, 2)  # mma.sync: the (32, 256) accumulator over 4 warps spills with a causal mask
    if kernel != "dkdv" and q_bucket <= 16:  # attention pooling: 16-row blocks instead of mostly empty ones
        shape = (16, shape[1], 4, shape[3])
    if capability < (8, 0):  # no cp.async before Ampere: software pipelining only costs shared memory
        shape = (*shape[:3], 1)
    return shape


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _autotuning() -> bool:
    """Autotune unless in deterministic mode (autotuning picks tiles by timing, and tiles change the summation
    order: two processes could differ in bits) or switched off (VLCORE_ATTENTION_AUTOTUNE=0)."""
    return not deterministic() and os.environ.get("VLCORE_ATTENTION_AUTOTUNE", "1") != "0"


def _kernel(name: str, meta: dict, dtype: torch.dtype, device: torch.device):
    """(launchable, config kwargs) for kernel ``name``: the autotuned handle, or the plain jit function with its
    fixed config (then the config is passed at launch)."""
    if _autotuning():
        return _tuned()[("fwd", "dkdv", "dq").index(name)], {}
    bm, bn, warps, stages = _fixed_shape(name, dtype, meta["D_PAD"], _capability(device), meta["Q_BUCKET"],
                                         meta["HAS_BIAS"], meta["CAUSAL"])
    return _JIT[name], _config(bm, bn, warps, stages, skew=name == "dkdv").all_kwargs()


# ---- launchers -----------------------------------------------------------------------------------------

def _common(q, k, prefix_lens, kv_lens, causal, table, grid, start):
    batch, nk, heads, dim = k.shape
    d_pad = max(16, triton.next_power_of_2(dim))
    lens = lambda t: t.to(torch.int32) if t is not None else torch.empty(0, dtype=torch.int32, device=k.device)
    has_bias = table is not None
    gh, gw = grid if has_bias else (1, 1)
    q_bucket = min(max(triton.next_power_of_2(q.shape[1]), 16), 128)
    meta = dict(N_BUCKET=_seq_bucket(max(q.shape[1], nk)), Q_BUCKET=q_bucket, HEAD_DIM=dim, D_PAD=d_pad,
                CAUSAL=bool(causal or prefix_lens is not None), HAS_PREFIX=prefix_lens is not None,
                HAS_KVLEN=kv_lens is not None, HAS_BIAS=has_bias,
                # fp32: TF32 only when the user opted in through torch (16-bit operands ignore it)
                DOT_PRECISION=fp32_dot_precision(_INTERPRET) if q.dtype == torch.float32 else "tf32")
    # head-major (H, R) copy of the (R, H) table for the bias gather (see _rel_bias); R·H values per call
    tab = table.t().contiguous() if has_bias else k.new_empty(0)
    tab_strides = (tab.stride(0),) if has_bias else (0,)
    return meta, lens(prefix_lens), lens(kv_lens), tab, tab_strides, (gh, gw, int(start))


def _grid(name, device, n, block, programs_per_block, *rest):
    """Launch grid (blocks of ``n`` rows × ``programs_per_block``, *rest) checked against CUDA's limits; ``block``
    is a meta-parameter name (autotuned) or an int. Axis 0 holds the large product (see _block_and_head)."""
    if isinstance(block, int):
        return checked_grid(name, (triton.cdiv(n, block) * programs_per_block, *rest), device)
    return checked_grid(name, lambda m: (triton.cdiv(n, m[block]) * programs_per_block, *rest), device)


def _q_strides(q, batch):
    """q of batch 1 with k/v of batch B is one query set shared by the batch: batch stride 0."""
    return (0 if q.shape[0] != batch else q.stride(0)), q.stride(1), q.stride(2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _batch_chunks(batch: int, nq: int, heads: int, device: torch.device) -> tuple[int, int]:
    """(samples per chunk, chunks) for the shared-query dq: enough programs to fill the GPU (two per SM)."""
    if device.type != "cuda":  # interpreter: two chunks, so that the tests run the split path
        wanted = 2
    else:
        wanted = max(1, 2 * _sm_count(device.index or 0) // (triton.cdiv(nq, 64) * heads))
    chunk = triton.cdiv(batch, min(batch, wanted))
    return chunk, triton.cdiv(batch, chunk)


_ACC_IN_REGS_MAX = 1024  # table entries the dK/dV kernel accumulates in registers (more spilled on sm_80)


def _table_pad(table_size: int) -> int:
    """The dK/dV kernel's dtable fold width: a power of two >= the table (its register accumulator) and >= the
    threads of a program (8 warps), so that each entry has one owner thread (see _dkdv_kernel); for tables over
    _ACC_IN_REGS_MAX entries the chunk width of the in-memory fold; 16 without a table."""
    if not table_size:
        return 16
    return max(triton.next_power_of_2(min(table_size, _ACC_IN_REGS_MAX)), 256)


def _dtable_chunks(batch: int, key_blocks: int) -> tuple[int, int]:
    """(samples per chunk, chunks) for the dK/dV kernel with a rel-pos table: a program runs a chunk of samples
    one after the other so that the dtable buffer has chunks·key_blocks <= max(B, key_blocks) rows per head
    (at B 64, H 16, Nk 640 and a 24×24 grid: 9 MB instead of 181 MB per layer), with about B·H programs."""
    chunk = triton.cdiv(batch, max(1, batch // key_blocks))
    return chunk, triton.cdiv(batch, chunk)


def _key_splits(batch: int, nq: int, nk: int, heads: int, device: torch.device) -> int:
    """Split-K for the forward when a few queries (attention pooling, n_query <= 16) give too few programs to
    fill the GPU: each program then reads a slice of K and V (the op is bandwidth bound)."""
    if nq > 16:
        return 1
    if device.type != "cuda":  # interpreter: two splits once there are two key tiles, so that tests run the path
        return 2 if nk > _INTERPRET_BLOCKS[1] else 1
    programs, sms = batch * heads * triton.cdiv(nq, 16), _sm_count(device.index or 0)
    if programs >= sms or nk < 512:
        return 1
    return min(triton.cdiv(2 * sms, programs), triton.cdiv(nk, 256))


def attention_fwd(q, k, v, causal=False, prefix_lens=None, kv_lens=None, table=None, grid=None, start=0, scale=None):
    """(out (B, Nq, H, D) in q's dtype, lse (B, H, Nq) fp32, natural log; -inf for rows that see no key)."""
    batch, nk, heads, dim = k.shape
    nq = q.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    meta, plens, klens, tab, tstr, (gh, gw, s) = _common(q, k, prefix_lens, kv_lens, causal, table, grid, start)
    if batch * nq * nk * heads == 0:  # nothing to launch: no key gives output 0 and lse -inf
        out = torch.zeros((batch, nq, heads, dim), dtype=q.dtype, device=q.device)
        return out, torch.full((batch, heads, nq), float("-inf"), dtype=torch.float32, device=q.device)
    splits = _key_splits(batch, nq, nk, heads, q.device)
    if splits == 1:
        out = torch.empty((1, batch, nq, heads, dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((1, batch, heads, nq), dtype=torch.float32, device=q.device)
    else:  # per-split normalised outputs and lse, merged below
        out = torch.empty((splits, batch, nq, heads, dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, batch, heads, nq), dtype=torch.float32, device=q.device)
    fwd, config = _kernel("fwd", meta, q.dtype, q.device)
    with launch_context("attention.fwd", q):
        fwd[_grid("attention.fwd", q.device, nq, "BLOCK_M", batch * heads, splits)](
            q, k, v, out, lse, plens, klens, tab, *_q_strides(q, batch), *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:4], lse.stride(0), *tstr, heads, nq, nk, splits, scale * LOG2E, gh, gw, s, **meta, **config)
    if splits == 1:
        return out[0], lse[0]
    # merge the splits (fixed order: deterministic): lse = log Σ_s e^{lse_s}, out = Σ_s e^{lse_s − lse}·out_s;
    # a split that saw nothing has lse_s = −inf and weight 0, a row that saw nothing keeps out 0 and lse −inf
    total = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse - total).nan_to_num_(0.0)
    merged = (weight.permute(0, 1, 3, 2).unsqueeze(-1) * out).sum(0)
    return merged.to(q.dtype).contiguous(), total


def attention_bwd(dout, q, k, v, out, lse, causal=False, prefix_lens=None, kv_lens=None, table=None, grid=None,
                  start=0, scale=None):
    """(dq, dk, dv, dtable or None); dq is summed over the batch when q is shared (batch 1)."""
    batch, nk, heads, dim = k.shape
    nq = q.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    if batch * nq * nk * heads == 0:
        zeros = lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device)  # contiguous, whatever t's strides
        return zeros(q), zeros(k), zeros(v), None if table is None else zeros(table)
    meta, plens, klens, tab, tstr, (gh, gw, s) = _common(q, k, prefix_lens, kv_lens, causal, table, grid, start)
    delta = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    d_blk = _DELTA_BLOCK if not _INTERPRET else 32
    with launch_context("attention.delta", q):
        _delta_kernel[_grid("attention.delta", q.device, nq, d_blk, batch * heads)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, nq, HEAD_DIM=dim, D_PAD=meta["D_PAD"],
            BLOCK_M=d_blk)

    dkdv_kernel, dkdv_config = _kernel("dkdv", meta, q.dtype, q.device)
    dq_kernel, dq_config = _kernel("dq", meta, q.dtype, q.device)
    # contiguous gradients whatever the input strides, as the registered op's fake promises (inductor checks the
    # strides: empty_like would copy a permuted layout); the kernels take any strides
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    table_size = table.shape[0] if table is not None else 0
    # (programs, table) fp32 partial sums of dtable, one row per (key block, chunk of samples, head); each program
    # zeroes its row. Sized for the smallest BLOCK_N the launch may pick.
    block_n = dkdv_config["BLOCK_N"] if dkdv_config else min(c.kwargs["BLOCK_N"] for c in dkdv_kernel.configs)
    max_key_blocks = triton.cdiv(nk, block_n)
    dkdv_chunk, dkdv_chunks = _dtable_chunks(batch, max_key_blocks) if table is not None else (1, batch)
    acc_in_regs = table_size <= _ACC_IN_REGS_MAX
    rows_per_program = 1 if acc_in_regs else 2  # large tables: a second row per program accumulates
    dtab = torch.empty((dkdv_chunks * heads * max_key_blocks * rows_per_program, table_size)
                       if table is not None else (0,),
                       dtype=torch.float32, device=q.device)
    used_blocks = {}

    def key_blocks(m):  # remembers the autotuned BLOCK_N: it sizes the used part of the dtable buffer
        used_blocks["n"] = triton.cdiv(nk, m["BLOCK_N"])
        return used_blocks["n"]

    dkdv_grid = checked_grid("attention.dkdv", lambda m: (key_blocks(m) * dkdv_chunks * heads,), q.device)
    with launch_context("attention.dkdv", q):
        dkdv_kernel[dkdv_grid](q, k, v, dout, lse, delta, dk, dv, plens, klens, tab, dtab,
                               *_q_strides(q, batch), *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
                               *dk.stride()[:3], *dv.stride()[:3], *tstr, heads, nq, nk, batch, dkdv_chunk,
                               scale * LOG2E, scale, gh, gw, s, table_size, T_PAD=_table_pad(table_size), ACC_IN_REGS=acc_in_regs, **meta,
                               **dkdv_config)
    chunk, n_chunks = (_batch_chunks(batch, nq, heads, q.device) if q.shape[0] != batch else (1, batch))
    dq_out = dq if n_chunks == q.shape[0] else torch.empty((n_chunks, *q.shape[1:]), dtype=torch.float32,
                                                             device=q.device)
    with launch_context("attention.dq", q):
        dq_kernel[_grid("attention.dq", q.device, nq, "BLOCK_M", n_chunks * heads)](
            q, k, v, dout, lse, delta, dq_out, plens, klens, tab, *_q_strides(q, batch), *k.stride()[:3],
            *v.stride()[:3], *dout.stride()[:3], *dq_out.stride()[:3], *tstr, heads, nq, nk, batch, chunk,
            scale * LOG2E, scale, gh, gw, s, **meta, **dq_config)
    if dq_out is not dq:
        dq.copy_(dq_out.sum(0, keepdim=True))  # fixed-order reduction over the chunks: deterministic
    dtable = None
    if table is not None:
        n_used = used_blocks["n"]
        parts = dtab[: dkdv_chunks * heads * n_used * rows_per_program].view(
            dkdv_chunks, heads, n_used, rows_per_program, table_size)[:, :, :, 0]
        # fixed-order reduction: deterministic; (H, T) summed, returned as a contiguous (T, H) like the fake
        dtable = parts.sum(dim=(0, 2)).t().to(table.dtype).contiguous()
    return dq, dk, dv, dtable


# ---- static resource report: every config the launchers may choose ---------------------------------------

_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_IN_DTYPE_PTRS = ("Q", "K", "V", "Out", "Table", "DOut", "DK", "DV", "DQ")  # in the input dtype
_FP32_PTRS = ("Lse", "Delta", "DTab")
_INT_PTRS = ("PrefixLens", "KvLens")
_FLOAT_ARGS = ("qk_scale", "scale")
_DELTA_BLOCK = 64  # _delta_kernel's rows per program on a GPU


def kernel_signature(fn, dtype: torch.dtype, constexprs) -> dict[str, str]:
    """Triton signature of one of this module's kernels for inputs of ``dtype`` (as a real launch has it).
    The split-K forward writes fp32 partial outputs; the report uses the usual ``Out`` in the input dtype."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in _IN_DTYPE_PTRS:
            return "*" + _TYPE_NAMES[dtype]
        if name in _FP32_PTRS:
            return "*fp32"
        if name in _INT_PTRS:
            return "*i32"
        return "fp32" if name in _FLOAT_ARGS else "i32"  # sizes, strides, grid, bucket ints

    return {name: kind(name) for name in fn.arg_names}


def _divisible(fn) -> tuple[str, ...]:
    """Arguments a real launch sees as multiples of 16: every pointer (torch allocations are 256-byte aligned)
    and the row/batch/head strides of (B, N, H, D) tensors whose D is a multiple of 16 (the report's head dims)."""
    strides = ("stride_qb", "stride_qn", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "stride_vb",
               "stride_vn", "stride_vh", "stride_ob", "stride_on", "stride_oh", "stride_db", "stride_dn", "stride_dh",
               "stride_dkb", "stride_dkn", "stride_dkh", "stride_dvb", "stride_dvn", "stride_dvh", "stride_dqb",
               "stride_dqn", "stride_dqh", "stride_os")
    pointers = _IN_DTYPE_PTRS + _FP32_PTRS + _INT_PTRS
    return tuple(name for name in fn.arg_names if name in pointers or name in strides)


_REPORT_FLAGS = ("", "causal", "prefix,kvlen,bias", "bias,T6241")
# table entries per flags (default: a 16×16 grid's 961); "T6241" is a 40×40 grid's table, larger than the dK/dV
# kernel's register accumulator (only that kernel depends on the table's size)
_REPORT_TABLES = {"bias,T6241": 6241}
_REPORT_DIMS = (64, 128, 256)


def _flag_meta(dim: int, dtype: torch.dtype, flags: str) -> dict:
    on = set(filter(None, flags.split(",")))
    return dict(HEAD_DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)), CAUSAL="causal" in on or "prefix" in on,
                HAS_PREFIX="prefix" in on, HAS_KVLEN="kvlen" in on, HAS_BIAS="bias" in on,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def static_variants() -> list[KernelVariant]:
    """Every (kernel, dtype, head dim, flags, config) the launchers may launch on sm_90 / sm_80: the autotune
    configs the pruner keeps for many queries (Q_BUCKET 128) and, marked ``default``, the fixed config of the
    deterministic mode per target capability; the Δ kernel has one config. Head dims 64, 128 and 256."""
    variants = []
    lists = {"fwd": (_FWD_SHAPES, _FWD_SHAPES_LARGE_D, _PRUNERS["fwd"]),
             "dkdv": (_DKDV_SHAPES, _DKDV_SHAPES_LARGE_D, _PRUNERS["dkdv"]),
             "dq": (_DQ_SHAPES, _DQ_SHAPES_LARGE_D, _PRUNERS["dq"])}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for dim in _REPORT_DIMS:
            for flags in _REPORT_FLAGS:
                meta = _flag_meta(dim, dtype, flags)
                for name, (shapes, large, prune) in lists.items():
                    if flags in _REPORT_TABLES and name != "dkdv":
                        continue
                    fn = _JIT[name]
                    configs = [_config(*shape, skew=name == "dkdv")
                               for shape in dict.fromkeys(list(shapes) + list(large))]
                    tuned = prune(configs, {}, Q_BUCKET=128, **meta)
                    fixed = {cap: _config(*_gpu_fixed_shape(name, dtype, meta["D_PAD"], (cap // 10, cap % 10), 128,
                                                            meta["HAS_BIAS"], meta["CAUSAL"]),
                                          skew=name == "dkdv") for cap in (90, 80)}
                    entries = [(c, False, (90, 80)) for c in tuned]
                    entries += [(c, True, (cap,)) for cap, c in fixed.items()]
                    for config, default, targets in entries:
                        constexprs = dict(meta, **config.kwargs)
                        if name == "dkdv":  # the dtable fold: in registers up to _ACC_IN_REGS_MAX entries
                            table_size = _REPORT_TABLES.get(flags, 961) if meta["HAS_BIAS"] else 0
                            constexprs["T_PAD"] = _table_pad(table_size)
                            constexprs["ACC_IN_REGS"] = table_size <= _ACC_IN_REGS_MAX
                        variants.append(KernelVariant(
                            kernel=f"attention.{name}", fn=fn, signature=kernel_signature(fn, dtype, constexprs),
                            constexprs=constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
                            dtype=_TYPE_NAMES[dtype], dim=dim, flags=flags, default=default,
                            divisible=_divisible(fn), targets=targets))
            constexprs = dict(HEAD_DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_M=_DELTA_BLOCK)
            variants.append(KernelVariant(
                kernel="attention.delta", fn=_delta_kernel, signature=kernel_signature(_delta_kernel, dtype, constexprs),
                constexprs=constexprs, num_warps=4, num_stages=3, dtype=_TYPE_NAMES[dtype], dim=dim, default=True,
                divisible=_divisible(_delta_kernel)))
    return variants


# ---- backend object for vlcore.ops.attention -----------------------------------------------------------

def forward(q, k, v, causal, prefix_lens, kv_lens, table, grid, start, scale):
    return attention_fwd(q, k, v, causal, prefix_lens, kv_lens, table, grid, start, scale)


def backward(dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, table, grid, start, scale):
    return attention_bwd(dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, table, grid, start, scale)


__all__ = ["attention_fwd", "attention_bwd", "forward", "backward", "static_variants", "SUPPORTED_HEAD_DIMS"]
