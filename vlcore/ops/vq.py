"""``vlcore.vq_nearest`` and ``vlcore.vq_statistics``: validation, dispatch, ``torch.library`` registration.

Semantics: docs/design.md §4 and :mod:`vlcore.reference.vq`. Backends (op family ``vq``) implement

    nearest(x (N, D), codebook (K, D), distance) -> (indices int64 [N], squared distances fp32 [N])
    statistics(x (N, D), indices [N], num_codes) -> packed fp32 (K, D + 1): [:, :D] sums, [:, D] counts
    ema_update(codebook, ema_counts, ema_sums, packed, gamma, eps) -> None (in place, fp32 state)

The packed statistics are what VisualDictionary all-reduces in ONE collective of K x (D + 1) values.
Both outputs of the nearest search are non-differentiable (an index and a distance used for bookkeeping);
the straight-through gradient lives in :class:`vlcore.nn.VisualDictionary`.
"""

from __future__ import annotations

import torch

from vlcore import _ext, dispatch
from vlcore import _validate as V
from vlcore.cpu import vq as cpu_vq
from vlcore.kernels._launch import launch_context
from vlcore.reference import vq as ref

OP = "vq"
_NAME = "vlcore.vq_nearest"
_STATS = "vlcore.vq_statistics"


def pack_statistics(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    return torch.cat([sums, counts.unsqueeze(1)], dim=1)


def unpack_statistics(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [K], sums [K, D]) as views of the packed (K, D + 1) buffer."""
    return packed[:, -1], packed[:, :-1]


class _ReferenceBackend:
    @staticmethod
    def nearest(x, codebook, distance):
        return ref.vq_nearest(x, codebook, distance)

    @staticmethod
    def statistics(x, indices, num_codes):
        return pack_statistics(*ref.vq_statistics(x, indices, num_codes))

    @staticmethod
    def ema_update(codebook, ema_counts, ema_sums, packed, gamma, eps):
        counts, sums = unpack_statistics(packed)
        ref.ema_update(codebook, ema_counts, ema_sums, counts, sums, gamma, eps)


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.REFERENCE, devices=("cpu", "cuda"), dtypes=V.FLOAT_DTYPES, priority=0,
    load=_ReferenceBackend, description="PyTorch, (rows, K) score chunks + argmin, index_add statistics",
))


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.CPU, devices=("cpu",), dtypes=V.FLOAT_DTYPES, priority=5, load=lambda: cpu_vq.CpuVQ,
    description="cache-sized (rows x codebook chunk) addmm tiles + running argmin, packed statistics",
))


class _CudaBackend:
    """csrc/vq.cu through vlcore._C: raw pointers, strides, dtype codes and the current stream.

    A portable fallback for machines where Triton is unavailable, not the fast path: fixed 64 x 64 tiles (WMMA
    for 16-bit l2, fp32 FMAs otherwise), no autotuning, not benchmarked on a GPU yet; ranked below triton."""

    @staticmethod
    def nearest(x, codebook, distance):
        x = x.detach() if x.stride(-1) == 1 else x.detach().contiguous()
        n, dim = x.shape
        e, e_sq = ref.dot_operands(codebook, x.dtype, distance)
        if e.shape[0] > 2**31 - 1:
            raise ValueError(f"{_NAME}: the cuda backend supports K < 2^31 entries; got K = {e.shape[0]}")
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        dist = torch.empty(n, dtype=torch.float32, device=x.device)
        with launch_context("vq.nearest[cuda]", x):  # the extension launches on the current device
            _ext.extension().vq_nearest(x.data_ptr(), e.data_ptr(), e_sq.data_ptr(), idx.data_ptr(), dist.data_ptr(),
                                        n, e.shape[0], dim, x.stride(0), e.stride(0), _ext.dtype_code(x),
                                        _ext.dtype_code(e), distance == "cosine", ref.NORMALIZE_EPS,
                                        _ext.stream_handle(x.device))
        return ref.first_identical(e)[idx], dist  # duplicates to their first copy (see the reference)

    @staticmethod
    def statistics(x, indices, num_codes):
        x = x.detach() if x.stride(-1) == 1 else x.detach().contiguous()
        dim = x.shape[1]
        out = torch.empty(num_codes, dim + 1, dtype=torch.float32, device=x.device)
        _, order, offsets = ref.sorted_segments(indices, num_codes)
        with launch_context("vq.statistics[cuda]", x):
            _ext.extension().vq_statistics(x.data_ptr(), order.data_ptr(), offsets.data_ptr(), out.data_ptr(),
                                           num_codes, dim, x.stride(0), out.stride(0), _ext.dtype_code(x),
                                           _ext.stream_handle(x.device))
        return out

    @staticmethod
    def ema_update(codebook, ema_counts, ema_sums, packed, gamma, eps):
        for name, t in (("codebook", codebook), ("ema_counts", ema_counts), ("ema_sums", ema_sums)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"vq ema_update: `{name}` must be contiguous fp32 state; got {V.describe(t)}")
        k, dim = codebook.shape
        packed = packed.float().contiguous()
        total = ref.ema_counts_step(ema_counts, packed[:, dim], gamma)
        with launch_context("vq.ema[cuda]", codebook):
            _ext.extension().vq_ema(codebook.data_ptr(), ema_counts.data_ptr(), ema_sums.data_ptr(),
                                    packed.data_ptr(), total.data_ptr(), k, dim, packed.stride(0), float(gamma),
                                    float(1.0 - gamma), float(eps), float(k * eps),
                                    _ext.stream_handle(codebook.device))


def _load_triton():
    from vlcore.kernels import vq

    return vq.TritonBackend


_LOWP = (torch.float16, torch.bfloat16, torch.float32)
# Triton above CUDA until a GPU benchmark decides which is faster (then the faster one gets the higher priority).
dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.TRITON, devices=("cuda",), dtypes=_LOWP, priority=20, load=_load_triton,
    requires=dispatch.triton_missing, interpreter_cpu=True,
    description="fused tiled distance + argmin (no N x K), sorted segmented statistics (deterministic)",
))
dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.CUDA, devices=("cuda",), dtypes=_LOWP, priority=10, load=_CudaBackend,
    requires=lambda: dispatch.cuda_ext_missing("vq_nearest"),
    description="csrc/vq.cu, portable fallback: WMMA (16-bit l2) or fp32-FMA tiles, sorted deterministic statistics",
))


# ---- registered ops ------------------------------------------------------------------------------------

@torch.library.custom_op("vlcore::vq_nearest", mutates_args=())
def _vq_nearest_op(x: torch.Tensor, codebook: torch.Tensor, distance: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx, dist = dispatch.get(OP, backend).impl().nearest(x, codebook, distance)
    return idx, dist


@_vq_nearest_op.register_fake
def _(x, codebook, distance, backend):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=ref.compute_dtype(x.dtype))


def _nearest_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _nearest_backward(ctx, _didx, _ddist):
    return None, None, None, None


_vq_nearest_op.register_autograd(_nearest_backward, setup_context=_nearest_setup)


@torch.library.custom_op("vlcore::vq_statistics", mutates_args=())
def _vq_statistics_op(x: torch.Tensor, indices: torch.Tensor, num_codes: int, backend: str) -> torch.Tensor:
    return dispatch.get(OP, backend).impl().statistics(x, indices, num_codes)


@_vq_statistics_op.register_fake
def _(x, indices, num_codes, backend):
    return x.new_empty(num_codes, x.shape[1] + 1, dtype=ref.compute_dtype(x.dtype))


def _stats_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _stats_backward(ctx, _dpacked):
    return None, None, None, None


_vq_statistics_op.register_autograd(_stats_backward, setup_context=_stats_setup)


# ---- public functions ----------------------------------------------------------------------------------

def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, *, distance: str = "l2",
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry of every row of ``x``: fused distance + argmin, no N x K buffer on GPU backends.

    Args:
        x: (..., D) features, fp16/bf16/fp32/fp64.
        codebook: (K, D) entries, any float dtype (represented in x's dtype for the distance).
        distance: ``"l2"`` (squared Euclidean) or ``"cosine"`` (squared L2 between L2-normalised vectors).
        backend: ``reference`` | ``cpu`` | ``triton`` | ``cuda`` (default: automatic, see :mod:`vlcore.dispatch`).

    Returns:
        (indices int64, squared distances fp32 (fp64 for fp64 x)), both of shape ``x.shape[:-1]``;
        ties go to the lowest index (as torch.argmin). Neither output is differentiable.
    """
    x2d, codebook = _check_nearest(x, codebook, distance)
    chosen = choose_backend(x2d, backend)
    if chosen.name == dispatch.REFERENCE:
        idx, dist = ref.vq_nearest(x2d, codebook, distance)
    else:
        idx, dist = _vq_nearest_op(x2d, codebook, distance, chosen.name)
    lead = x.shape[:-1]
    return idx.reshape(lead), dist.reshape(lead)


def vq_statistics(x: torch.Tensor, indices: torch.Tensor, num_codes: int, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry counts [K] and feature sums [K, D] of an assignment, fp32 (fp64 for fp64 x), no N x K buffer.

    Args:
        x: (..., D) features; indices: int tensor of shape ``x.shape[:-1]`` with values in [0, num_codes).
    """
    packed = vq_statistics_packed(x, indices, num_codes, backend=backend)
    return unpack_statistics(packed)


def vq_statistics_packed(x: torch.Tensor, indices: torch.Tensor, num_codes: int, *,
                         backend: str | None = None) -> torch.Tensor:
    """As :func:`vq_statistics`, packed in one (K, D + 1) buffer ([:, :D] sums, [:, D] counts)."""
    x2d, idx = _check_statistics(x, indices, num_codes)
    chosen = choose_backend(x2d, backend)
    if chosen.name == dispatch.REFERENCE:
        return _ReferenceBackend.statistics(x2d, idx, num_codes)
    return _vq_statistics_op(x2d, idx, int(num_codes), chosen.name)


def choose_backend(x2d: torch.Tensor, backend: str | None) -> dispatch.Backend:
    problem = dispatch.Problem(x2d.device, x2d.dtype, {"dim": x2d.shape[1]})
    return dispatch.choose(OP, problem, backend)


# ---- validation ----------------------------------------------------------------------------------------

def _check_nearest(x, codebook, distance):
    V.tensor(_NAME, "x", x, dtypes=V.FLOAT_DTYPES)
    V.tensor(_NAME, "codebook", codebook, ndim=2, dtypes=V.FLOAT_DTYPES, layout="(K, D)")
    if x.dim() < 1:
        raise ValueError(f"{_NAME}: `x` must have shape (..., D); got {V.describe(x)}")
    if codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"{_NAME}: `codebook` must have at least one entry of dim >= 1; got {V.describe(codebook)}")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"{_NAME}: `x` must have last dim D = {codebook.shape[1]} (codebook is (K, D)); "
                         f"got {V.describe(x)}")
    V.same_device(_NAME, "x", x, codebook=codebook)
    if distance not in ref.DISTANCES:
        raise ValueError(f"{_NAME}: `distance` must be one of {ref.DISTANCES}; got {distance!r}")
    return x.reshape(-1, x.shape[-1]), codebook


def _check_statistics(x, indices, num_codes):
    V.tensor(_STATS, "x", x, dtypes=V.FLOAT_DTYPES)
    V.tensor(_STATS, "indices", indices, dtypes=V.INDEX_DTYPES)
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"{_STATS}: `num_codes` must be a positive int; got {num_codes!r}")
    if x.dim() < 1 or tuple(indices.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{_STATS}: `indices` must have shape x.shape[:-1] = {tuple(x.shape[:-1])}; "
                         f"got {V.describe(indices)} (x: {V.describe(x)})")
    V.same_device(_STATS, "x", x, indices=indices)
    idx = indices.reshape(-1)
    # Range check without a device sync on GPU (it would stall the stream every step).
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"{_STATS}: `indices` values must lie in [0, {num_codes}); got min {lo}, max {hi}")
    return x.reshape(-1, x.shape[-1]), idx
