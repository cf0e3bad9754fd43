"""2-D relative position table inside the Triton attention kernels: forward, dq/dk/dv and dtable vs the reference,
a Swin/timm table checked against an independent dense-bias computation, and a bitwise-deterministic dtable.

Runs under TRITON_INTERPRET=1 on CPU (fp32, fp16) at small odd grids (3×5, 7×7); @gpu tests use bf16 and ViT grids.
"""

from __future__ import annotations

import os

import kernel_check
import pytest
import torch
import torch.nn.functional as F
from kernel_check import compare_with_reference, track_allocations

import vlcore
from vlcore.reference import attention as ref

# GPU runs: one fixed config per kernel (autotuning every tested key would compile for a long time);
# the benchmarks autotune.
os.environ.setdefault("VLCORE_ATTENTION_AUTOTUNE", "0")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _table(grid, heads, dtype, transposed=False):
    gh, gw = grid
    size = (2 * gh - 1) * (2 * gw - 1)
    if transposed:  # a (H, T) parameter seen as (T, H): strides (1, T)
        return torch.randn(heads, size).to(dtype).t()
    return torch.randn(size, heads).to(dtype)


def _check(batch, nq, nk, heads, dim, dtype, grid, start, *, shared=False, transposed=False, **mask):
    dev = _device()
    q = torch.randn(1 if shared else batch, nq, heads, dim).to(dtype).to(dev)
    k = torch.randn(batch, nk, heads, dim).to(dtype).to(dev)
    v = torch.randn(batch, nk, heads, dim).to(dtype).to(dev)
    table = _table(grid, heads, dtype, transposed).to(dev)
    mask = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in mask.items()}
    bias = {"rel_pos_grid": grid, "rel_pos_start": start}
    return compare_with_reference(
        lambda q, k, v, table: vlcore.attention(q, k, v, rel_pos_table=table, backend="triton", **bias, **mask),
        lambda q, k, v, table: ref.attention(q, k, v, rel_pos_table=table, **bias, **mask),
        {"q": q, "k": k, "v": v, "table": table}, dtype=dtype)


CASES = {
    # name: (batch, nq, nk, heads, dim, dtype, grid, start, extra)
    "3x5-plain-strided-table": (2, 15, 15, 2, 32, torch.float32, (3, 5), 0, {"transposed": True}),
    "3x5-offset-prefix-pad": (2, 26, 26, 2, 32, torch.float16, (3, 5), 4,
                              {"prefix_lens": torch.tensor([10, 22]), "kv_lens": torch.tensor([26, 20])}),
    "7x7-simvlm-image-then-text": (2, 65, 65, 1, 80, torch.float32, (7, 7), 0,
                                   {"prefix_lens": torch.tensor([54, 49])}),
    "7x7-text-then-image-causal-pad": (2, 70, 70, 1, 32, torch.float16, (7, 7), 9,
                                       {"causal": True, "kv_lens": torch.tensor([70, 40])}),
    "7x7-cross-causal": (1, 40, 70, 2, 32, torch.float32, (7, 7), 3, {"causal": True}),
    "7x7-grid-to-the-end": (1, 60, 60, 1, 32, torch.float32, (7, 7), 11, {}),
    "3x5-shared-queries": (2, 15, 15, 2, 32, torch.float32, (3, 5), 0, {"shared": True,
                                                                        "kv_lens": torch.tensor([15, 8])}),
    "3x5-windows-in-batch": (4, 15, 15, 1, 32, torch.float16, (3, 5), 0, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_relpos_vs_reference(name):
    batch, nq, nk, heads, dim, dtype, grid, start, extra = CASES[name]
    _check(batch, nq, nk, heads, dim, dtype, grid, start, **extra)


def _timm_relative_position_index(gh: int, gw: int) -> torch.Tensor:
    """timm.models.swin_transformer.get_relative_position_index, written out independently."""
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += gh - 1
    rel[:, :, 1] += gw - 1
    rel[:, :, 0] *= 2 * gw - 1
    return rel.sum(-1)


@pytest.mark.parametrize("grid,dtype", [((7, 7), torch.float32), ((3, 5), torch.float16)], ids=str)
def test_timm_table_matches_dense_bias(grid, dtype):
    """A Swin/timm table loads unchanged: vlcore equals table[index] gathered into a dense bias + SDPA."""
    gh, gw = grid
    n, heads = gh * gw, 2
    index = _timm_relative_position_index(gh, gw).to(_device())

    def dense(q, k, v, table):
        bias = table[index.view(-1)].view(n, n, heads).permute(2, 0, 1)  # (H, N, N), as timm
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias.to(q.dtype))
        return out.transpose(1, 2)

    dev = _device()
    inputs = {"q": torch.randn(3, n, heads, 32), "k": torch.randn(3, n, heads, 32), "v": torch.randn(3, n, heads, 32),
              "table": torch.randn((2 * gh - 1) * (2 * gw - 1), heads)}
    inputs = {name: t.to(dtype).to(dev) for name, t in inputs.items()}
    compare_with_reference(
        lambda q, k, v, table: vlcore.attention(q, k, v, rel_pos_table=table, rel_pos_grid=grid, backend="triton"),
        dense, inputs, dtype=dtype)


def test_dtable_is_deterministic():
    dev = _device()
    q = torch.randn(3, 60, 2, 32, device=dev, requires_grad=True)
    k = torch.randn(3, 60, 2, 32, device=dev, requires_grad=True)
    v = torch.randn(3, 60, 2, 32, device=dev, requires_grad=True)
    table = torch.randn(13 * 13, 2, device=dev, requires_grad=True)
    kw = {"rel_pos_table": table, "rel_pos_grid": (7, 7), "rel_pos_start": 0, "backend": "triton",
          "prefix_lens": torch.tensor([55, 49, 60], device=dev)}
    dout = torch.randn(3, 60, 2, 32, device=dev)
    runs = [torch.autograd.grad(vlcore.attention(q, k, v, **kw), (q, k, v, table), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_relpos_allocates_no_n_by_n():
    """The launchers (tracked directly: a dispatch mode sees a custom op only from outside) allocate at most the
    (programs, table) dtable partials, far below one sample-head's N×N scores."""
    from vlcore.kernels import attention as kernels

    n, grid = 99, (9, 11)
    q, k, v = torch.randn(1, n, 1, 16), torch.randn(1, n, 1, 16), torch.randn(1, n, 1, 16)
    table = torch.randn(17 * 21, 1)
    bias = {"table": table, "grid": grid, "start": 0}
    with track_allocations() as tracker:
        out, lse = kernels.attention_fwd(q, k, v, **bias)
        _, _, _, dtable = kernels.attention_bwd(torch.randn_like(out), q, k, v, out, lse, **bias)
    assert dtable.shape == table.shape
    assert 0 < tracker.largest_bytes < n * n * 4, (tracker.largest_bytes, tracker.largest_shape)


class _EveryAllocation(kernel_check._AllocationTracker):
    def __init__(self):
        super().__init__()
        self.tensors = []

    def _record(self, out):
        super()._record(out)
        self.tensors += [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("batch", [6, 2])
def test_dtable_buffer_is_bounded(batch):
    """The dtable partial sums take at most max(B, key blocks)·H·T fp32 values (B·H·T here: B >= key blocks
    at B = 6), not one row per (sample, head, key block): B·H·⌈Nk/32⌉·T was 181 MB per layer at B 64, H 16,
    Nk 640 and a 24×24 grid. Checked with the buffer's values reduced right: dtable vs the reference."""
    from vlcore.kernels import attention as kernels

    heads, n, grid = 2, 70, (7, 7)  # the interpreter's 32-key tiles: 3 key blocks
    rows = 13 * 13
    q, k, v = (torch.randn(batch, n, heads, 16, dtype=torch.float64).float() for _ in range(3))
    table = torch.randn(rows, heads)
    out, lse = kernels.attention_fwd(q, k, v, table=table, grid=grid, start=2)
    dout = torch.randn_like(out)
    with _EveryAllocation() as tracker:
        _, _, _, dtable = kernels.attention_bwd(dout, q, k, v, out, lse, table=table, grid=grid, start=2)
    buffers = [t for t in tracker.tensors if t.dim() == 2 and t.shape[1] == rows and t.dtype == torch.float32
               and t.shape[0] > heads]
    assert buffers, [tuple(t.shape) for t in tracker.tensors]
    extra = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in buffers}.values())  # views once
    assert extra <= max(batch, 3) * heads * rows * 4, (extra, [tuple(t.shape) for t in buffers])
    expected = ref.attention_backward(dout, q, k, v, rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=2)[3]
    torch.testing.assert_close(dtable, expected, atol=1e-4, rtol=1e-4)


def test_dtable_of_a_large_table_through_the_memory_accumulator(monkeypatch):
    """Tables over _ACC_IN_REGS_MAX entries (> 1024 on a GPU: the register accumulator spilled on sm_80) fold the
    samples into a second buffer row per program, in T_PAD-wide chunks: lowered here so that a 9×13 grid's 425
    entries take that path in two chunks (256 wide) and a program runs several samples; vs the reference."""
    from vlcore.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_ACC_IN_REGS_MAX", 64)
    assert kernels._table_pad(425) == 256
    batch, heads, n, grid = 5, 2, 120, (9, 13)
    q, k, v = (torch.randn(batch, n, heads, 16, dtype=torch.float64).float() for _ in range(3))
    table = torch.randn(17 * 25, heads)
    out, lse = kernels.attention_fwd(q, k, v, table=table, grid=grid, start=1)
    dout = torch.randn_like(out)
    dtable = kernels.attention_bwd(dout, q, k, v, out, lse, table=table, grid=grid, start=1)[3]
    expected = ref.attention_backward(dout, q, k, v, rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=1)[3]
    torch.testing.assert_close(dtable, expected, atol=1e-4, rtol=1e-4)


def test_table_shape_is_checked():
    q = torch.randn(1, 15, 2, 32)
    with pytest.raises(ValueError, match="rel_pos_table"):
        vlcore.attention(q, q, q, rel_pos_table=torch.randn(44, 2), rel_pos_grid=(3, 5), backend="triton")


# ---- native GPU runs ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("grid,text,dim", [((14, 14), 0, 64), ((14, 14), 40, 64), ((24, 24), 77, 128),
                                           ((7, 7), 0, 32)])
def test_gpu_relpos(grid, text, dim, dtype):
    n = grid[0] * grid[1] + text
    mask = {"prefix_lens": torch.tensor([n - text // 2, n - text, n])} if text else {}
    _check(3, n, n, 4, dim, dtype, grid, 0, **mask)


@pytest.mark.gpu
def test_gpu_dtable_deterministic():
    q, k, v = (torch.randn(64, 196, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    table = torch.randn(27 * 27, 12, device="cuda", requires_grad=True)
    dout = torch.randn(64, 196, 12, 64, device="cuda", dtype=torch.bfloat16)
    kw = {"rel_pos_table": table, "rel_pos_grid": (14, 14), "backend": "triton"}
    runs = [torch.autograd.grad(vlcore.attention(q, k, v, **kw), (q, k, v, table), dout) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
