"""Triton attention kernels (vlcore.kernels.attention) against the reference: forward and every gradient.

On CPU they run under TRITON_INTERPRET=1 (fp32, fp16; bf16 is wrong in the interpreter) at tiny shapes; the
interpreter runs 32×32 tiles, so N = 64..130 exercises the dense (unmasked) loops, the boundary loops and the
tails. The @gpu tests repeat the checks natively with bf16 and larger shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_check import compare_with_reference, track_allocations

import vlcore
from vlcore import dispatch
from vlcore.reference import attention as ref

# GPU runs: one fixed config per kernel (autotuning every tested key would compile for a long time);
# the benchmarks autotune.
os.environ.setdefault("VLCORE_ATTENTION_AUTOTUNE", "0")

DTYPES = (torch.float32, torch.float16)


def _masks(batch: int, nq: int, nk: int) -> dict[str, dict]:
    """Every mask combination for a batch of 2 (per-sample lengths differ)."""
    lens = lambda *v: torch.tensor(v[:batch], dtype=torch.int64)
    half, third = max(nk // 2, 1), nk // 3
    return {
        "none": {},
        "causal": {"causal": True},
        "prefix0": {"prefix_lens": lens(0, 0)},
        "prefix_partial": {"prefix_lens": lens(half, third)},
        "prefix_full": {"prefix_lens": lens(nk, nk)},
        "prefix_mixed": {"prefix_lens": lens(nk, 0)},
        "pad": {"kv_lens": lens(nk, half)},
        "pad_empty": {"kv_lens": lens(third, 0)},  # sample 1 fully padded: output 0, gradients 0
        "causal_pad": {"causal": True, "kv_lens": lens(half, nk)},
        "prefix_pad": {"prefix_lens": lens(third, half), "kv_lens": lens(nk - 1, half)},
    }


def _check(batch, nq, nk, heads, dim, dtype, *, shared=False, **mask):
    q = torch.randn(1 if shared else batch, nq, heads, dim).to(dtype)
    k = torch.randn(batch, nk, heads, dim).to(dtype)
    v = torch.randn(batch, nk, heads, dim).to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in (q, k, v))
    mask = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in mask.items()}
    return compare_with_reference(
        lambda q, k, v: vlcore.attention(q, k, v, backend="triton", **mask),
        lambda q, k, v: ref.attention(q, k, v, **mask),
        {"q": q, "k": k, "v": v}, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(_masks(2, 17, 17)))
def test_every_mask_n17(mask, dtype):
    _check(2, 17, 17, 1, 80, dtype, **_masks(2, 17, 17)[mask])


@pytest.mark.parametrize("mask", ["none", "causal", "prefix_partial", "pad_empty"])
def test_single_token(mask):
    _check(2, 1, 1, 2, 32, torch.float32, **_masks(2, 1, 1)[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["causal", "prefix_partial", "prefix_mixed", "causal_pad", "prefix_pad"])
def test_masks_n64(mask, dtype):
    _check(2, 64, 64, 1, 32, dtype, **_masks(2, 64, 64)[mask])


@pytest.mark.parametrize("case", [
    # (nq, nk, dim, dtype, mask): odd sizes, cross-attention both ways, several tiles with dense + boundary tiles
    (97, 97, 80, torch.float32, "prefix_partial"),
    (130, 130, 32, torch.float16, "causal_pad"),
    (97, 130, 32, torch.float32, "causal_pad"),
    (130, 97, 80, torch.float16, "prefix_pad"),
    (17, 130, 32, torch.float32, "pad"),
    (130, 17, 32, torch.float32, "causal"),  # rows before Nq - Nk see no key
], ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_larger_and_cross(case):
    nq, nk, dim, dtype, mask = case
    _check(2 if "pad" in mask or "prefix" in mask else 1, nq, nk, 1, dim, dtype, **_masks(2, nq, nk)[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "prefix_pad", "pad_empty"])
def test_shared_queries(mask, dtype):
    """One query set (batch 1) for a batch of 2 contexts: dq is summed over the batch inside the kernel."""
    _check(2, 17, 70, 2, 32, dtype, shared=True, **_masks(2, 17, 70)[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "causal", "prefix_mixed", "pad_empty"])
def test_few_queries_split_k(mask, dtype):
    """n_query <= 16 takes the split-K forward (key slices merged by their lse); shared queries as in pooling."""
    _check(2, 5, 97, 2, 32, dtype, shared=True, **_masks(2, 5, 97)[mask])


def test_split_k_lse_and_empty_rows():
    from vlcore.kernels import attention as kernels

    q, k, v = torch.randn(2, 3, 1, 32), torch.randn(2, 100, 1, 32), torch.randn(2, 100, 1, 32)
    mask = {"causal": True, "kv_lens": torch.tensor([40, 0])}  # sample 0: the second key slice is all padding
    out, lse = kernels.attention_fwd(q, k, v, **mask)
    ref_out, ref_lse = ref.attention_with_lse(q, k, v, **mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


def test_expanded_queries_run_as_shared():
    q = torch.randn(1, 17, 1, 32).expand(2, -1, -1, -1)
    k, v = torch.randn(2, 40, 1, 32), torch.randn(2, 40, 1, 32)
    lens = torch.tensor([40, 9])
    torch.testing.assert_close(vlcore.attention(q, k, v, kv_lens=lens, backend="triton"),
                               ref.attention(q, k, v, kv_lens=lens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_qkv_views(dtype):
    """q, k, v as strided views of one (B, N, 3, H, D) projection output: no copies, gradient into the fused tensor."""
    qkv = torch.randn(2, 45, 3, 2, 32).to(dtype)
    lens = {"prefix_lens": torch.tensor([20, 0]), "kv_lens": torch.tensor([45, 30])}
    compare_with_reference(
        lambda qkv: vlcore.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], backend="triton", **lens),
        lambda qkv: ref.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **lens), {"qkv": qkv}, dtype=dtype)


def test_head_major_layout():
    """(B, H, N, D) storage seen as (B, N, H, D): arbitrary strides, last dim contiguous."""
    x = torch.randn(3, 2, 2, 33, 32)  # (which, B, H, N, D)
    compare_with_reference(
        lambda x: vlcore.attention(*(t.transpose(1, 2) for t in x.unbind(0)), causal=True, backend="triton"),
        lambda x: ref.attention(*(t.transpose(1, 2) for t in x.unbind(0)), causal=True), {"x": x},
        dtype=torch.float32)


def test_lse_and_empty_rows():
    """lse matches the reference (−inf where a row sees nothing) and outputs there are exactly 0."""
    from vlcore.kernels import attention as kernels

    q, k, v = torch.randn(2, 40, 2, 32), torch.randn(2, 33, 2, 32), torch.randn(2, 33, 2, 32)
    lens = torch.tensor([33, 0])
    out, lse = kernels.attention_fwd(q, k, v, causal=True, kv_lens=lens, scale=0.2)
    ref_out, ref_lse = ref.attention_with_lse(q, k, v, causal=True, kv_lens=lens, scale=0.2)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert (out[1] == 0).all() and (out[0, :7] == 0).all()  # rows 0..6 of sample 0 precede every key


@pytest.mark.parametrize("nq,nk", [(0, 5), (5, 0)])
def test_empty_sequences(nq, nk):
    q, k, v = (torch.randn(2, n, 1, 32, requires_grad=True) for n in (nq, nk, nk))
    out = vlcore.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, ref.attention(q, k, v))
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))


def test_no_nq_by_nk_allocation():
    """Forward and backward launchers allocate nothing of size Nq×Nk (tracked on the launchers themselves: a
    dispatch mode sees a custom op only from outside)."""
    from vlcore.kernels import attention as kernels

    nq, nk = 130, 97
    q, k, v = torch.randn(1, nq, 1, 32), torch.randn(1, nk, 1, 32), torch.randn(1, nk, 1, 32)
    mask = {"prefix_lens": torch.tensor([40]), "kv_lens": torch.tensor([90])}
    with track_allocations() as tracker:
        out, lse = kernels.attention_fwd(q, k, v, **mask)
        kernels.attention_bwd(torch.randn_like(out), q, k, v, out, lse, **mask)
    assert 0 < tracker.largest_bytes < nq * nk * 4, (tracker.largest_bytes, tracker.largest_shape)


def test_backward_is_deterministic():
    q = torch.randn(1, 70, 2, 32, requires_grad=True)  # shared queries: dq reduced over the batch
    k = torch.randn(3, 70, 2, 32, requires_grad=True)
    v = torch.randn(3, 70, 2, 32, requires_grad=True)
    kw = {"prefix_lens": torch.tensor([10, 0, 70]), "kv_lens": torch.tensor([70, 50, 33]), "backend": "triton"}
    dout = torch.randn(3, 70, 2, 32)
    runs = [torch.autograd.grad(vlcore.attention(q, k, v, **kw), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck():
    q, k, v = torch.randn(2, 9, 1, 32), torch.randn(2, 12, 1, 32), torch.randn(2, 12, 1, 32)
    q.requires_grad_()
    args = (q, k, v, False, torch.tensor([5, 0]), torch.tensor([12, 7]), None, None, 0, 0.2, "triton")
    torch.library.opcheck(torch.ops.vlcore.attention.default, args)
    out, lse = torch.ops.vlcore.attention(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bargs = (torch.randn_like(out), q.detach(), k, v, out, lse, False, args[4], args[5], None, None, 0, 0.2, "triton")
    torch.library.opcheck(torch.ops.vlcore.attention_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x, prefix_lens):
            qkv = self.qkv(x).view(x.shape[0], x.shape[1], 3, 1, 32)
            return vlcore.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], prefix_lens=prefix_lens,
                                    backend="triton").sum()

    model = Block()
    x, lens = torch.randn(2, 20, 32), torch.tensor([5, 20])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, lens)
    loss.backward()
    grad = model.qkv.weight.grad.clone()
    model.zero_grad()
    eager = model(x, lens)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, model.qkv.weight.grad)


def test_refusals_name_the_reason():
    q = torch.randn(1, 4, 1, 44)
    with pytest.raises(dispatch.BackendError, match="head dim 44 not supported .*multiples of 8 up to 256"):
        vlcore.attention(q, q, q, backend="triton")
    with pytest.raises(dispatch.BackendError, match="float64"):
        vlcore.attention(q.double()[..., :32], q.double()[..., :32], q.double()[..., :32], backend="triton")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """The GPU code path (every mask flag and the rel-pos table: tl.gather, barriers, bf16 dots) compiles for H100
    without a GPU; tests/attention_compile_check.py --all-configs checks every autotune config (minutes)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "attention_compile_check.py")
    proc = subprocess.run([sys.executable, script, "90:bfloat16:80:causal,prefix,kvlen,bias"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled") == 3, proc.stdout


# ---- native GPU runs: bf16 and larger shapes -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("dim", (64, 96, 128))
@pytest.mark.parametrize("mask", ["none", "causal", "prefix_partial", "prefix_pad", "pad_empty"])
def test_gpu_masks(mask, dim, dtype):
    _check(2, 515, 515, 3, dim, dtype, **_masks(2, 515, 515)[mask])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", [(333, 1030, 64), (1030, 333, 128), (1, 1000, 80), (257, 1000, 32)])
def test_gpu_cross_and_shared(shape, dtype):
    nq, nk, dim = shape
    _check(2, nq, nk, 2, dim, dtype, causal=True, kv_lens=torch.tensor([nk, nk // 3]))
    _check(3, nq, nk, 2, dim, dtype, shared=True, prefix_lens=torch.tensor([0, nk // 2, nk]))


@pytest.mark.gpu
def test_gpu_deterministic_and_linear_memory():
    def run(n, repeats):
        q = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(4, n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        kw = {"prefix_lens": torch.tensor([0, 100, n // 2, n], device="cuda"), "backend": "triton"}
        dout = torch.randn(4, n, 8, 128, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = [torch.autograd.grad(vlcore.attention(q, k, v, **kw), (q, k, v), dout) for _ in range(repeats)]
        torch.cuda.synchronize()
        return grads, torch.cuda.max_memory_allocated() - before

    runs, _ = run(2048, 2)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, peak_2k = run(2048, 1)
    _, peak_4k = run(4096, 1)
    assert peak_4k < 2.5 * peak_2k, (peak_2k, peak_4k)  # linear in N (an N×N buffer would give 4×)
