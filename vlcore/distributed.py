"""Distributed helpers: an all_gather with gradient for variable local sizes (docs/design.md §5).

``all_gather(x)`` concatenates every rank's ``x`` along dim 0 — local sizes may differ — and its backward
sends each rank the gradient of its own rows **summed over the ranks** (a reduce-scatter): with
``y = all_gather(x)`` on every rank and per-rank losses ``L_r(y)``, rank r receives d(Σ_r' L_r')/d x_r.
That is the gradient of the sum of the ranks' losses, which is what the contrastive loss and models that mine
negatives from the gathered batch (X-VLM, ITM) need.

How: the ranks first exchange a small fixed-size descriptor (rows, dtype, trailing shape), so a rank whose
``x`` disagrees with the others raises the same clear error on *every* rank instead of leaving the others
waiting in a collective; then the rows are padded to the largest local size, gathered in one collective and
cut. The backward uses ``reduce_scatter_tensor`` on NCCL; gloo has no reduce-scatter, so there it is an
all_reduce of the gathered gradient followed by taking the local slice.

Without an initialised process group (or with a group of one rank) everything is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_META_SLOTS = 8  # rows, ndim, dtype code, trailing numel, first 4 trailing dims (-1 padded)
_DTYPE_CODES = {dt: i for i, dt in enumerate((
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128))}


def world_info(group=None) -> tuple[int, int, bool]:
    """(rank, world_size, is_distributed) for ``group`` (default: the default group when initialised).

    ``is_distributed`` is False when torch.distributed is unavailable or not initialised: then (0, 1, False).
    A group of one rank gives (0, 1, True).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, False
    return dist.get_rank(group), dist.get_world_size(group), True


def gather_sizes(n: int, group=None, device: torch.device | None = None) -> list[int]:
    """Every rank's local size ``n`` (one small all_gather); ``[n]`` when not distributed."""
    _, world, is_dist = world_info(group)
    if not is_dist or world == 1:
        return [int(n)]
    device = device or _collective_device(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([int(n)], dtype=torch.int64, device=device), group=group)
    return [int(s.item()) for s in sizes]


def local_offset(sizes: list[int], group=None) -> int:
    """Row offset of this rank's rows in the gathered tensor, given every rank's size (:func:`gather_sizes`)."""
    rank, _, _ = world_info(group)
    return int(sum(sizes[:rank]))


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation over the ranks of ``group`` of every rank's ``x`` along dim 0 (variable sizes allowed).

    Differentiable: the backward gives each rank the sum over ranks of the gradient of its own rows. Ranks must
    agree on the dtype and on every dim but the first; if they do not, every rank raises ``ValueError``.
    Identity when torch.distributed is not initialised or the group has one rank.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"vlcore.distributed.all_gather: `x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("vlcore.distributed.all_gather: `x` must have at least 1 dim (rows along dim 0); "
                         "got a 0-dim tensor")
    _, world, is_dist = world_info(group)
    if not is_dist or world == 1:
        return x
    return _AllGather.apply(x, group)


def all_gather_with_sizes(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """:func:`all_gather` plus every rank's local size (so the caller knows its offset without a collective)."""
    _, world, is_dist = world_info(group)
    if not is_dist or world == 1:
        return all_gather(x, group), [x.shape[0]]
    sizes: list[int] = []
    return _AllGather.apply(x, group, sizes), sizes


def _collective_device(group) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _meta(x: torch.Tensor) -> list[int]:
    trailing = list(x.shape[1:])
    numel = 1
    for s in trailing:
        numel *= s
    slots = (trailing + [-1] * 4)[:4]
    return [x.shape[0], x.dim(), _DTYPE_CODES.get(x.dtype, 99), numel, *slots]


def _describe_meta(m: list[int]) -> str:
    names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
    trailing = [s for s in m[4:4 + max(0, m[1] - 1)]]
    if m[1] - 1 > 4:
        trailing.append("...")
    return f"rows {m[0]}, trailing shape {tuple(trailing)}, dtype {names.get(m[2], 'other')}"


def _exchange_meta(x: torch.Tensor, group, world: int) -> list[list[int]]:
    device = _collective_device(group)
    mine = torch.tensor(_meta(x), dtype=torch.int64, device=device)
    metas = [torch.empty(_META_SLOTS, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(metas, mine, group=group)
    metas = [m.tolist() for m in metas]
    ref = metas[0]
    bad = [r for r, m in enumerate(metas) if m[1:] != ref[1:]]
    if bad:  # every rank sees the same descriptors, so every rank raises here: no rank is left waiting
        lines = "\n".join(f"  rank {r}: {_describe_meta(m)}" for r, m in enumerate(metas))
        raise ValueError("vlcore.distributed.all_gather: ranks disagree on the dtype or on the dims after the "
                         f"first (only dim 0 may differ):\n{lines}")
    return metas


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes_out=None):
        rank, world, _ = world_info(group)
        sizes = [m[0] for m in _exchange_meta(x, group, world)]
        if sizes_out is not None:
            sizes_out.extend(sizes)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        largest = max(sizes)
        xc = x.contiguous()
        if xc.shape[0] < largest:
            xc = torch.cat([xc, xc.new_zeros((largest - xc.shape[0], *xc.shape[1:]))])
        out = xc.new_empty((world * largest, *xc.shape[1:]))
        if largest:
            dist.all_gather_into_tensor(out, xc, group=group)
        if all(s == largest for s in sizes):
            return out
        return torch.cat([out[r * largest: r * largest + s] for r, s in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        group, sizes, rank = ctx.group, ctx.sizes, ctx.rank
        world, largest = len(sizes), max(sizes)
        grad = grad.contiguous()
        if "nccl" in str(dist.get_backend(group)).lower():
            padded = grad
            if any(s != largest for s in sizes):
                padded = grad.new_zeros((world * largest, *grad.shape[1:]))
                start = 0
                for r, s in enumerate(sizes):
                    padded[r * largest: r * largest + s] = grad[start:start + s]
                    start += s
            mine = grad.new_empty((largest, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, padded, group=group)
            return mine[:sizes[rank]], None, None
        total = grad.clone()  # gloo (and others) have no reduce_scatter: sum everything, keep our slice
        dist.all_reduce(total, group=group)
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]], None, None
