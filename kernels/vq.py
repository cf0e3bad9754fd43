r"""Triton visual dictionary (SOHO, Huang et al. CVPR 2021): fused nearest-entry search, deterministic per-entry
statistics and the momentum update — nothing of size N x K is ever allocated.

Nearest entry (semantics: :mod:`vlcore.reference.vq`). One program owns BLOCK_N rows and scans the codebook in
BLOCK_K tiles, each a tensor-core dot over D chunks with fp32 accumulation, keeping a running (best, index):

    s_ij = ||e_j||^2 - 2 x_i.e_j      (||e||^2 precomputed once per call, fp32)
    h_i  = argmin_j s_ij               (torch.argmin's order: NaN below every number, ties to the lowest index
                                        inside a tile; a later tile replaces the best only when strictly
                                        better, so ties go to the lowest j and the first NaN wins)
    d_i  = max(s_ih + ||x_i||^2, 0)    (NaN stays NaN, as torch's clamp_min)

Duplicate entries then map to their first copy (:func:`vlcore.reference.vq.first_identical`), so they go to the
lowest index whatever the dot rounds per column.

* l2 with fp16/bf16 x: the codebook is cast once to x's dtype (the reference's semantics), so the products are
  exact and the dot runs on the tensor cores with fp32 accumulation.
* fp32 x, and cosine: fp32 operands with IEEE fp32 products (as torch's default matmul; TF32 when the user opted in
  through torch's flags, as torch's matmul then does). For cosine the codebook
  is normalised once per call (as F.normalize); rows are normalised on the fly: x^.e^ = (x.e^) / max(||x||, eps).

Statistics (counts and sums per entry, fp32): the rows are ordered by entry (stable sort) and one program per
(block of BLOCK_J entries, D chunk) adds their contiguous rows through a local BLOCK_J x BLOCK_R one-hot dot
(exact 0/1 products, fp32 accumulation) in a fixed order — no float atomics, so the result is bitwise
deterministic. (Work per program follows its entries' counts: a very skewed assignment serialises on the block
holding the largest entry.)

Momentum update (SOHO): n <- g n + (1-g) counts; m <- g m + (1-g) sums; n~ = (n + eps)/(sum n + K eps) sum n;
e = m / n~ (left unchanged where n~ = 0). The K counts and their sum go through torch (K values); one kernel
then updates sums and codebook over K x D reading the total from device memory (no host sync).

Determinism: statistics and the momentum step use fixed configs (bitwise reproducible anywhere on the same GPU
model and software). The nearest search is autotuned, except in deterministic mode
(:func:`vlcore.kernels._launch.deterministic`), where it uses :func:`default_nearest_config`.
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
from vlcore.kernels._variants import make_variant

from vlcore.reference import vq as ref

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _argmin_combine(v1, i1, v2, i2):
    """torch.argmin's order as a reduction: a NaN before every number, then the smaller value, then the lower
    index (tl.argmin's comparisons are false for NaN, so it would skip a NaN score)."""
    nan1 = v1 != v1
    nan2 = v2 != v2
    take1 = (nan1 & ~nan2) | (v1 < v2) | (((v1 == v2) | (nan1 & nan2)) & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _nearest_kernel(x_ptr, e_ptr, e_sq_ptr, idx_ptr, dist_ptr, n_rows, n_codes, dim, sx, se,
                    COSINE: tl.constexpr, NORM_EPS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    # ||x||^2 in fp32 (one pass over the row block)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_ptr + rows64[:, None] * sx + ds[None, :], mask=row_ok[:, None] & (ds[None, :] < dim),
                     other=0.0).to(tl.float32)
        x_sq += tl.sum(xt * xt, axis=1)
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    if COSINE:
        scale = 1.0 / tl.maximum(tl.sqrt(x_sq), NORM_EPS)
        x_sq = x_sq * scale * scale
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, n_codes, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_codes
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            et = tl.load(e_ptr + cols64[None, :] * se + ds[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            xt = tl.load(x_ptr + rows64[:, None] * sx + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(et.dtype), et, acc, input_precision=PRECISION)
        e_sq = tl.load(e_sq_ptr + cols, mask=col_ok, other=0.0)
        if COSINE:
            acc = acc * scale[:, None]
        scores = e_sq[None, :] - 2.0 * acc
        scores = tl.where(col_ok[None, :], scores, float("inf"))
        col_ids = tl.broadcast_to(cols[None, :], (BLOCK_N, BLOCK_K))
        tile_best, tile_idx = tl.reduce((scores, col_ids), 1, _argmin_combine)
        # strict: an equal later tile keeps the lower index; a NaN replaces only a number (the first NaN wins)
        better = (tile_best < best) | ((tile_best != tile_best) & (best == best))
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    dist = best + x_sq
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.where(dist < 0.0, 0.0, dist), mask=row_ok)  # clamp at 0, NaN stays NaN


@triton.jit
def _statistics_kernel(x_ptr, order_ptr, sorted_idx_ptr, offsets_ptr, out_ptr, n_codes, dim, sx, so,
                       BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Entries [j0, j0 + BLOCK_J) own the contiguous sorted rows [offsets[j0], offsets[j0 + BLOCK_J]); each row
    block is added to its entry through a local (BLOCK_J x BLOCK_R) one-hot dot — exact 0/1 products, fp32
    accumulation in a fixed order. packed[j, :D] = sums, packed[j, D] = counts."""
    j0 = tl.program_id(0) * BLOCK_J
    js = j0 + tl.arange(0, BLOCK_J)
    j_ok = js < n_codes
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < dim
    start = tl.load(offsets_ptr + j0)
    end = tl.load(offsets_ptr + tl.minimum(j0 + BLOCK_J, n_codes))
    acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < end
        rows = tl.load(order_ptr + rs, mask=r_ok, other=0)
        seg = tl.load(sorted_idx_ptr + rs, mask=r_ok, other=-1)
        xt = tl.load(x_ptr + rows[:, None] * sx + ds[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        onehot = (js[:, None] == seg[None, :]).to(xt.dtype)
        acc = tl.dot(onehot, xt, acc, input_precision=PRECISION)
    out_rows = out_ptr + js.to(tl.int64)[:, None] * so
    tl.store(out_rows + ds[None, :], acc, mask=j_ok[:, None] & d_ok[None, :])
    if tl.program_id(1) == 0:
        lo = tl.load(offsets_ptr + js, mask=j_ok, other=0)
        hi = tl.load(offsets_ptr + js + 1, mask=j_ok, other=0)
        tl.store(out_ptr + js.to(tl.int64) * so + dim, (hi - lo).to(tl.float32), mask=j_ok)


@triton.jit
def _ema_kernel(codebook_ptr, ema_counts_ptr, ema_sums_ptr, packed_ptr, total_ptr, n_codes, dim, sp,
                gamma, eps, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sums EMA, Laplace smoothing and codebook = sums / smoothed counts (the counts EMA is already applied)."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok, d_ok = ks < n_codes, ds < dim
    mask = k_ok[:, None] & d_ok[None, :]
    total = tl.load(total_ptr)
    n = tl.load(ema_counts_ptr + ks, mask=k_ok, other=0.0)
    smoothed = (n + eps) / (total + n_codes * eps) * total
    ks64 = ks.to(tl.int64)
    offs = ks64[:, None] * dim + ds[None, :]
    batch_sums = tl.load(packed_ptr + ks64[:, None] * sp + ds[None, :], mask=mask, other=0.0)
    sums = tl.load(ema_sums_ptr + offs, mask=mask, other=0.0) * gamma + batch_sums * (1.0 - gamma)
    tl.store(ema_sums_ptr + offs, sums, mask=mask)
    old = tl.load(codebook_ptr + offs, mask=mask, other=0.0)
    safe = tl.where(smoothed > 0, smoothed, 1.0)
    tl.store(codebook_ptr + offs, tl.where(smoothed[:, None] > 0, sums / safe[:, None], old), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    """The distance dot's precision: fp32 operands follow torch's matmul setting (IEEE by default, TF32 after
    ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32``); 16-bit operands use the tensor cores."""
    return fp32_dot_precision(_INTERPRET) if dtype == torch.float32 else "tf32"


def _sum_precision(dtype: torch.dtype) -> str:
    """The statistics' one-hot dot adds features: IEEE for fp32 always (a sum, not a matmul of the user's)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Autotuned on GPU (tile shapes differ for tensor-core and IEEE fp32 dots); under the interpreter one fixed
# config of few, large numpy ops (the interpreter's cost is per operation; a single config is never benchmarked).
# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages)
_LOWP_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
                 (64, 64, 64, 4, 4)]
_FP32_CONFIGS = [(64, 64, 32, 4, 3), (32, 64, 32, 4, 2), (64, 32, 32, 4, 3), (64, 64, 16, 4, 4)]
_INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, num_warps=4)


def _as_config(bn: int, bk: int, bd: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def default_nearest_config(tensor_cores: bool, dim: int, capability: tuple[int, int]) -> dict:
    """The deterministic mode's config: one per (operand kind, D, device capability), never timed — the block
    sizes fix the summation order of every distance, hence which of two near-equal entries wins. BLOCK_D shrinks
    for small D (no wasted masked lanes). Before Hopper (mma.sync keeps the operands in registers; the resource
    report): 32-column D chunks for the tensor-core tiles (64 spill with TF32's fp32 operands) and two stages
    for the IEEE fp32 tiles."""
    bn, bk, bd, warps, stages = _LOWP_CONFIGS[4] if tensor_cores else _FP32_CONFIGS[2]
    if capability < (9, 0):
        bd, stages = (32, stages) if tensor_cores else (bd, 2)
    return _as_config(bn, bk, min(bd, triton.next_power_of_2(max(dim, 16))), warps, stages)


@functools.cache
def _autotuned_nearest(tensor_cores: bool):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
               for bn, bk, bd, w, st in (_LOWP_CONFIGS if tensor_cores else _FP32_CONFIGS)]
    return triton.autotune(configs, key=["n_codes", "dim", "COSINE"])(_nearest_kernel)


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def _tuned_nearest(tensor_cores: bool, dim: int, device_tensor: torch.Tensor):
    """(kernel, launch config): fixed under the interpreter and in deterministic mode, else autotuned."""
    if _INTERPRET:
        return _nearest_kernel, _INTERPRETER_CONFIG
    if deterministic():
        return _nearest_kernel, default_nearest_config(tensor_cores, dim, _capability(device_tensor))
    return _autotuned_nearest(tensor_cores), {}


def nearest_grid(n: int, meta: dict) -> tuple[int]:
    """One program per BLOCK_N rows, on axis 0 (CUDA allows 2^31 - 1 there: N up to ~10^11 rows)."""
    return (triton.cdiv(n, meta["BLOCK_N"]),)


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, distance: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) fp16/bf16/fp32, codebook (K, D) -> (indices int64 [N], squared distances fp32 [N])."""
    x = x.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, dim = x.shape
    e, e_sq = ref.dot_operands(codebook, x.dtype, distance)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, dist
    precision = _precision(e.dtype)
    kernel, cfg = _tuned_nearest(precision == "tf32", dim, x)  # tensor-core tiles for 16-bit operands and TF32
    grid = checked_grid("vq.nearest", lambda meta: nearest_grid(n, meta), x.device)
    with launch_context("vq.nearest", x):
        kernel[grid](x, e, e_sq, idx, dist, n, e.shape[0], dim, x.stride(0), e.stride(0),
                     COSINE=distance == "cosine", NORM_EPS=ref.NORMALIZE_EPS, PRECISION=precision, **cfg)
    return ref.first_identical(e)[idx], dist


def entry_grid(num_codes: int, dim: int, block_j: int, block_d: int) -> tuple[int, int]:
    """(entry blocks on axis 0: K up to 2^31 - 1 blocks; D chunks on axis 1: at most a few for any real D)."""
    return triton.cdiv(num_codes, block_j), triton.cdiv(dim, block_d)


def statistics_blocks(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_R) of the statistics kernel on a GPU. The one-hot dot of fp32 features runs on FMA units
    (IEEE), which hold a thread's rows × BLOCK_R operand in registers: 32 rows per step fit (64 spill on sm_80)."""
    return (16, 32) if dtype == torch.float32 else (16, 64)


def vq_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Packed fp32 (K, D + 1) statistics: [:, :D] per-entry sums of x, [:, D] counts. Deterministic."""
    x = x.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    dim = x.shape[1]
    out = torch.empty(num_codes, dim + 1, dtype=torch.float32, device=x.device)
    sorted_idx, order, offsets = ref.sorted_segments(indices, num_codes)
    block_d = min(128, triton.next_power_of_2(max(dim, 16)))
    block_j, block_r = (32, 32) if _INTERPRET else statistics_blocks(x.dtype)
    grid = checked_grid("vq.statistics", entry_grid(num_codes, dim, block_j, block_d), x.device)
    with launch_context("vq.statistics", x):
        _statistics_kernel[grid](x, order, sorted_idx, offsets, out, num_codes, dim, x.stride(0), out.stride(0),
                                 BLOCK_J=block_j, BLOCK_R=block_r, BLOCK_D=block_d, PRECISION=_sum_precision(x.dtype),
                                 num_warps=4)
    return out


def ema_update(codebook: torch.Tensor, ema_counts: torch.Tensor, ema_sums: torch.Tensor, packed: torch.Tensor,
               gamma: float, eps: float) -> None:
    """SOHO's momentum step in place on contiguous fp32 state, from packed (K, D + 1) batch statistics."""
    for name, t in (("codebook", codebook), ("ema_counts", ema_counts), ("ema_sums", ema_sums)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"vq ema_update: `{name}` must be contiguous fp32 state; got {t.dtype}, {t.stride()}")
    k, dim = codebook.shape
    packed = packed.float()
    total = ref.ema_counts_step(ema_counts, packed[:, dim], gamma)
    block_k, block_d = 32, min(128, triton.next_power_of_2(max(dim, 16)))
    grid = checked_grid("vq.ema", entry_grid(k, dim, block_k, block_d), codebook.device)
    with launch_context("vq.ema", codebook):
        _ema_kernel[grid](codebook, ema_counts, ema_sums, packed, total, k, dim, packed.stride(0), float(gamma),
                          float(eps), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)


class TritonBackend:
    """The ``triton`` backend of the ``vq`` op family (see :mod:`vlcore.ops.vq`)."""

    nearest = staticmethod(vq_nearest)
    statistics = staticmethod(vq_statistics)
    ema_update = staticmethod(ema_update)


# ---- every GPU config, for the static resource report (benchmarks/kernel_resources.py) -----------------------

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# multiples of 16 in a real launch: the pointers, D and the row strides of x and the codebook (for D % 16 == 0);
# not the packed statistics' row stride (D + 1)
_ALIGNED = ("x_ptr", "e_ptr", "e_sq_ptr", "idx_ptr", "dist_ptr", "order_ptr", "sorted_idx_ptr", "offsets_ptr",
            "out_ptr", "codebook_ptr", "ema_counts_ptr", "ema_sums_ptr", "packed_ptr", "dim", "sx", "se")


def static_variants(dims=(256, 512, 768)) -> list[KernelVariant]:
    """Every config a GPU launch may use — the nearest search's autotune lists and its deterministic default
    (``default=True``), the fixed statistics and momentum-step configs — with the signature a real launch has."""
    variants = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x_type = "*" + _TYPES[dtype]
        for dim in dims:
            for distance in ("l2", "cosine"):
                # the codebook operand: x's 16-bit dtype for l2, fp32 (normalised) for cosine and fp32 x
                e_type = x_type if distance == "l2" and dtype != torch.float32 else "*fp32"
                for precision in (("ieee", "tf32") if e_type == "*fp32" else ("tf32",)):
                    tensor_cores = precision == "tf32"
                    signature = {"x_ptr": x_type, "e_ptr": e_type, "e_sq_ptr": "*fp32", "idx_ptr": "*i64",
                                 "dist_ptr": "*fp32", "n_rows": "i32", "n_codes": "i32", "dim": "i32", "sx": "i32",
                                 "se": "i32"}
                    consts = {"COSINE": distance == "cosine", "NORM_EPS": ref.NORMALIZE_EPS, "PRECISION": precision}
                    flags = distance + (",tf32" if e_type == "*fp32" and tensor_cores else "")
                    defaults = {cc: default_nearest_config(tensor_cores, dim, (cc // 10, cc % 10)) for cc in (90, 80)}
                    tuned = [_as_config(*c) for c in (_LOWP_CONFIGS if tensor_cores else _FP32_CONFIGS)]
                    entries = [(cfg, True, (cc,)) for cc, cfg in defaults.items()]
                    entries += [(c, False, (90, 80)) for c in tuned if c not in defaults.values()]
                    for cfg, default, targets in entries:
                        variants.append(make_variant("vq.nearest", _nearest_kernel, cfg, signature, consts,
                                                     dtype=_TYPES[dtype], dim=dim, flags=flags,
                                                     default=default, aligned=_ALIGNED, targets=targets))
            block_d = min(128, triton.next_power_of_2(max(dim, 16)))
            variants.append(make_variant(
                "vq.statistics", _statistics_kernel,
                dict(zip(("BLOCK_J", "BLOCK_R"), statistics_blocks(dtype)), BLOCK_D=block_d, num_warps=4),
                {"x_ptr": x_type, "order_ptr": "*i64", "sorted_idx_ptr": "*i64", "offsets_ptr": "*i64",
                 "out_ptr": "*fp32", "n_codes": "i32", "dim": "i32", "sx": "i32", "so": "i32"},
                {"PRECISION": _sum_precision(dtype)}, dtype=_TYPES[dtype], dim=dim, flags="", default=True,
                aligned=_ALIGNED))
            if dtype == torch.float32:  # the dictionary's state is fp32 whatever the features' dtype
                variants.append(make_variant(
                    "vq.ema", _ema_kernel, dict(BLOCK_K=32, BLOCK_D=block_d, num_warps=4),
                    {"codebook_ptr": "*fp32", "ema_counts_ptr": "*fp32", "ema_sums_ptr": "*fp32",
                     "packed_ptr": "*fp32", "total_ptr": "*fp32", "n_codes": "i32", "dim": "i32", "sp": "i32",
                     "gamma": "fp32", "eps": "fp32"}, {}, dtype="fp32", dim=dim, flags="", default=True,
                    aligned=_ALIGNED))
    return variants
