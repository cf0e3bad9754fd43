"""Visual dictionary kernels (triton; cuda on GPU) against the reference: exact argmin including ties, statistics
vs a literal loop, SOHO's momentum step, odd N/K/D, no N x K allocation, VisualDictionary end to end.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16); bf16 and the CUDA backend run on GPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA
from kernel_check import track_allocations

import vlcore
from vlcore import dispatch
from vlcore.nn import VisualDictionary
from vlcore.ops import vq as vq_ops
from vlcore.reference import vq as ref

DEV = "cuda" if HAS_CUDA else "cpu"
# N, K, D: N = 1 and 97; K = 3 and 2048 (small N there); D = 5 and 768 (small N and K there)
SHAPES = [(1, 3, 5), (97, 3, 5), (97, 257, 33), (9, 2048, 5), (5, 7, 768)]
# the CUDA backend runs the same tests on a GPU (it cannot run here)
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def truth(x, codebook, distance):
    """float64 brute force on the codebook as x's dtype sees it: (first argmin, its distance, all distances)."""
    x64, e = x.double().cpu(), codebook.to(x.dtype).double().cpu()
    if distance == "cosine":
        x64, e = F.normalize(x64, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    d = ((x64[:, None, :] - e[None]) ** 2).sum(-1)
    idx = d.argmin(1)
    return idx, d.gather(1, idx[:, None]).squeeze(1), d


def check_nearest(x, codebook, distance, backend):
    idx, dist = vlcore.vq_nearest(x, codebook, distance=distance, backend=backend)
    r_idx, _ = vlcore.vq_nearest(x, codebook, distance=distance, backend="reference")
    t_idx, t_dist, all_d = truth(x, codebook, distance)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == x.shape[:-1]
    idx, dist, r_idx = idx.cpu(), dist.cpu(), r_idx.cpu()
    k = codebook.shape[0]
    top2 = all_d.topk(min(2, k), dim=1, largest=False).values
    gap = top2[:, -1] - top2[:, 0]
    scale = x.double().cpu().pow(2).sum(1) + codebook.to(x.dtype).double().cpu().pow(2).sum(1).max()
    clear = (gap > 1e-5 * scale) | (gap == 0)
    assert torch.equal(idx[clear], t_idx[clear]), "argmin differs from the float64 brute force"
    assert torch.equal(idx[clear], r_idx[clear]), "argmin differs from the reference"
    assert (all_d.gather(1, idx[:, None]).squeeze(1) - t_dist <= 1e-5 * scale).all()
    assert ((dist.double() - t_dist).abs() <= 1e-5 * scale + 1e-6).all()
    return idx, dist


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_l2(n, k, d, dtype, backend):
    check_nearest(torch.randn(n, d, device=DEV).to(dtype), torch.randn(k, d, device=DEV), "l2", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,d", [(97, 3, 5), (9, 2048, 5), (5, 7, 768)])
def test_nearest_cosine(n, k, d, dtype, backend):
    x = torch.randn(n, d, device=DEV).to(dtype)
    cb = torch.randn(k, d, device=DEV)
    check_nearest(x, cb, "cosine", backend)
    # a zero row normalises to 0: distance 1 to every entry (which one wins is decided by rounding)
    _, dist0 = vlcore.vq_nearest(torch.zeros(1, d, device=DEV, dtype=dtype), cb, distance="cosine", backend=backend)
    assert abs(dist0.item() - 1.0) < 1e-5


def tie_case():
    """Small integers: products and partial sums are exact in fp16/fp32, so the ties are exact in any order.
    Duplicates (rows 1, 3, 5 and 41, 77) sit in different codebook tiles; rows 6 and 7 are equidistant from 0."""
    v = torch.tensor([1.0, -2, 0, 3, 1, -1, 2, 0, 1])
    w = torch.tensor([2.0, 1, 1, 0, -1, 0, 0, 1, -1])
    rest = torch.randint(-3, 4, (90, 9)).float() * 3 + 20  # far from every query
    cb = torch.cat([torch.stack([3 * w, v, 2 * v, v, -v, v, w, -w]), rest])
    cb[41] = cb[77] = 2 * w - v
    x = torch.stack([v, -v, torch.zeros(9), 2 * v, w, torch.ones(9), 2 * w - v, 2 * w - v + 1])
    return x, cb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nearest_ties_lowest_index(dtype, backend):
    x, cb = tie_case()
    idx, dist = vlcore.vq_nearest(x.to(DEV, dtype), cb.to(DEV), backend=backend)
    t_idx, t_dist, all_d = truth(x, cb, "l2")
    assert ((all_d == all_d.min(1, keepdim=True).values).sum(1) > 1).sum() >= 4  # real ties
    assert torch.equal(idx.cpu(), t_idx) and idx.tolist()[:3] == [1, 4, 6] and idx[6].item() == 41
    assert torch.equal(dist.cpu().double(), t_dist)  # exact arithmetic: exact distances


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_nearest_duplicates_go_to_the_first_copy(distance, dtype, backend):
    """Random (inexact) data: the same dot product may round differently in another column (numpy's BLAS under
    the interpreter did: index 11 instead of 3), yet identical entries must go to the lowest index."""
    cb = torch.randn(150, 24)
    cb[11] = cb[3]   # same codebook tile
    cb[100] = cb[3]  # another tile
    cb[7] = cb[120] = cb[140] = cb[60]
    x = torch.cat([cb[3] + 0.01 * torch.randn(20, 24), cb[60] + 0.01 * torch.randn(20, 24)]).to(dtype)
    idx, dist = vlcore.vq_nearest(x.to(DEV), cb.to(DEV), distance=distance, backend=backend)
    assert idx.tolist() == [3] * 20 + [7] * 20
    t_idx, t_dist, _ = truth(x, cb, distance)
    torch.testing.assert_close(dist.cpu().double(), t_dist, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_nearest_nan_follows_torch_argmin(distance, dtype, backend):
    """torch.argmin's semantics on every backend: a NaN row -> distance NaN and index 0 (all its scores are NaN);
    a NaN entry takes every other row (the first NaN entry), distance NaN."""
    cb = torch.randn(70, 9)
    x = torch.randn(6, 9)
    x[2, 4] = float("nan")
    idx, dist = vlcore.vq_nearest(x.to(DEV, dtype), cb.to(DEV), distance=distance, backend=backend)
    t_idx, t_dist, _ = truth(x.to(dtype), cb, distance)
    assert idx.tolist() == t_idx.tolist() and idx[2].item() == 0
    assert torch.isnan(dist[2]) and not torch.isnan(dist[[0, 1, 3, 4, 5]]).any()
    bad = cb.clone()
    bad[66, 1] = bad[68, 0] = float("nan")  # in the second codebook tile of the GPU configs too
    idx, dist = vlcore.vq_nearest(x.to(DEV, dtype), bad.to(DEV), distance=distance, backend=backend)
    # (the NaN row's scores are all NaN: its first NaN is entry 0)
    assert idx.tolist() == [66, 66, 0, 66, 66, 66] == truth(x.to(dtype), bad, distance)[0].tolist()
    assert torch.isnan(dist).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,d", [(1, 3, 5), (97, 3, 5), (97, 257, 33), (31, 2048, 5), (13, 5, 768)])
def test_statistics_match_literal_loop(n, k, d, dtype, backend):
    x = torch.randn(n, d, device=DEV).to(dtype)
    idx = torch.randint(0, k, (n,), device=DEV)
    idx[0] = k - 1
    counts, sums = vq_ops.vq_statistics(x, idx, k, backend=backend)
    lit_counts = torch.zeros(k, dtype=torch.float64)
    lit_sums = torch.zeros(k, d, dtype=torch.float64)
    for i in range(n):  # the literal loop
        lit_counts[int(idx[i])] += 1
        lit_sums[int(idx[i])] += x[i].double().cpu()
    assert torch.equal(counts.cpu().double(), lit_counts)
    assert torch.allclose(sums.cpu().double(), lit_sums, rtol=1e-6, atol=1e-5)
    again = vq_ops.vq_statistics_packed(x, idx, k, backend=backend)
    assert torch.equal(again[:, :d], sums) and torch.equal(again[:, d], counts)  # deterministic


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,d", [(3, 5), (257, 33), (7, 768)])
def test_ema_step_matches_soho_literal(k, d, backend):
    state = [torch.randn(k, d, device=DEV), torch.rand(k, device=DEV) * 4, torch.randn(k, d, device=DEV)]
    state[1][0] = 0  # an entry never used: smoothing keeps it finite
    packed = torch.cat([torch.randn(k, d, device=DEV), torch.randint(0, 5, (k, 1), device=DEV).float()], 1)
    mine = [t.clone() for t in state]
    dispatch.get("vq", backend).impl().ema_update(*mine, packed, 0.8, 1e-5)
    # SOHO's released update, written out: EMA of counts and sums, Laplace smoothing, normalisation
    embed, cluster_size, embed_avg = [t.clone() for t in state]
    encoding_sum, embed_sum, decay = packed[:, d], packed[:, :d], 0.8
    cluster_size.mul_(decay).add_(torch.mul(encoding_sum, 1.0 - decay))
    embed_avg.mul_(decay).add_(torch.mul(embed_sum, 1.0 - decay))
    n = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (n + k * 1e-5) * n
    embed = embed_avg / smoothed.unsqueeze(1)
    for a, b in zip(mine, (embed, cluster_size, embed_avg)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_no_n_by_k_allocation():
    n, k, d = 256, 512, 4
    x, cb = torch.randn(n, d, device=DEV), torch.randn(k, d, device=DEV)
    impl = dispatch.get("vq", "triton").impl()
    # the launchers themselves (the tracker cannot see inside a registered custom op)
    with track_allocations() as t:
        idx, _ = impl.nearest(x, cb, "l2")
        impl.nearest(x.half(), cb, "cosine")
        impl.statistics(x, idx, k)
    assert t.largest_bytes < n * k * 4 // 8, f"allocated {t.largest_bytes} bytes, shape {t.largest_shape}"
    assert t.largest_bytes <= max(k * (d + 1), n * d) * 8
    vd = VisualDictionary(k, d, dead_code_threshold=0.5, backend="triton").to(DEV).train()
    xg = x.clone().requires_grad_()
    with track_allocations() as t:  # a whole training step, restarts included, and its backward
        q, _ = vd(xg)
        q.sum().backward()
    assert t.largest_bytes <= max(k * (d + 2), n * d) * 8, f"allocated {t.largest_bytes} bytes, {t.largest_shape}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_visual_dictionary_kernels_equal_reference(distance, backend):
    k, d = 24, 10
    mods = {b: VisualDictionary(k, d, dead_code_threshold=0.7, distance=distance, backend=b, seed=4).to(DEV).train()
            for b in (backend, "reference")}
    centers = torch.randn(6, d, device=DEV) * 3
    for step in range(4):
        x = centers[torch.randint(0, 6, (40,), device=DEV)] + 0.3 * torch.randn(40, d, device=DEV)
        x = x.requires_grad_()
        (q_t, i_t), (q_r, i_r) = mods[backend](x), mods["reference"](x)
        assert torch.equal(i_t, i_r), f"step {step}"
        assert torch.allclose(q_t, q_r, atol=1e-5)
        (g,) = torch.autograd.grad(q_t.sum(), x)
        assert torch.equal(g, torch.ones_like(g))
    a, b = mods[backend], mods["reference"]
    assert int(a.dead_codes) == int(b.dead_codes) and int(a.step) == 4
    for name in ("codebook", "ema_counts", "ema_sums"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5), name


def test_triton_backend_refuses_fp64_clearly():
    with pytest.raises(dispatch.BackendError, match="supports dtypes"):
        vlcore.vq_nearest(torch.randn(3, 4, dtype=torch.float64, device=DEV), torch.randn(2, 4, device=DEV),
                          backend="triton")


def test_registered_op_with_triton_backend():
    x, cb = torch.randn(9, 5, device=DEV), torch.randn(4, 5, device=DEV)
    torch.library.opcheck(vq_ops._vq_nearest_op, (x, cb, "l2", "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ---- GPU only: bf16, native Triton at real sizes, the CUDA backend -------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_gpu_nearest(backend, dtype, distance):
    for n, k, d in [(1, 3, 5), (97, 2048, 5), (1000, 2048, 768), (4097, 513, 80)]:
        check_nearest(torch.randn(n, d, device="cuda").to(dtype), torch.randn(k, d, device="cuda"), distance, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_ties(backend, dtype):
    x, cb = tie_case()
    idx, dist = vlcore.vq_nearest(x.cuda().to(dtype), cb.cuda(), backend=backend)
    t_idx, t_dist, _ = truth(x, cb, "l2")
    assert torch.equal(idx.cpu(), t_idx) and torch.equal(dist.cpu().double(), t_dist)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_statistics_and_ema(backend, dtype):
    n, k, d = 20000, 2048, 768
    x = torch.randn(n, d, device="cuda").to(dtype)
    idx = torch.randint(0, 64, (n,), device="cuda") * 32  # skewed: most entries empty
    packed = vq_ops.vq_statistics_packed(x, idx, k, backend=backend)
    r_counts, r_sums = ref.vq_statistics(x.double(), idx, k)
    assert torch.equal(packed[:, d].double(), r_counts)
    assert torch.allclose(packed[:, :d].double(), r_sums, rtol=1e-5, atol=1e-3)
    assert torch.equal(packed, vq_ops.vq_statistics_packed(x, idx, k, backend=backend))  # deterministic
    state = [torch.randn(k, d, device="cuda"), torch.rand(k, device="cuda"), torch.randn(k, d, device="cuda")]
    mine, theirs = [t.clone() for t in state], [t.clone() for t in state]
    dispatch.get("vq", backend).impl().ema_update(*mine, packed, 0.9, 1e-5)
    ref.ema_update(*theirs, packed[:, d], packed[:, :d], 0.9, 1e-5)
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_n_by_k_and_module(backend):
    n, k, d = 65536, 2048, 64
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    vd = VisualDictionary(k, d, backend=backend).cuda().train()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vd(x)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n * k * 4 // 4


def test_cuda_backend_runs_or_refuses_with_reason():
    x, cb = torch.randn(4, 8, device=DEV), torch.randn(3, 8, device=DEV)
    why = dispatch.get("vq", "cuda").environment_refusal()
    if why is None:
        check_nearest(x, cb, "l2", "cuda")
        return
    with pytest.raises(dispatch.BackendError, match="backend 'cuda' cannot run"):
        vlcore.vq_nearest(x, cb, backend="cuda")
