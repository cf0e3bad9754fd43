"""Reference visual dictionary (SOHO): nearest entry vs float64 brute force, statistics vs a literal loop, the
momentum update vs a literal transcription of SOHO's released code, VisualDictionary behaviour, MVM masks,
errors, opcheck and torch.compile of the registered ops."""

import pytest
import torch
import torch.nn.functional as F
from dense_oracles import vq_statistics as literal_statistics  # one row at a time, float64

import vlcore
from vlcore.nn import VisualDictionary, mvm_mask
from vlcore.ops import vq as vq_ops
from vlcore.reference import vq as ref


def brute_force(x, codebook, distance="l2"):
    """float64, explicit differences, first minimum: the ground truth."""
    x64 = x.double()
    e = codebook.to(x.dtype).double()
    if distance == "cosine":
        x64, e = F.normalize(x64, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    d = ((x64[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    idx = d.argmin(1)
    return idx, d.gather(1, idx[:, None]).squeeze(1), d


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 3, 5), (97, 3, 33), (97, 257, 5), (1, 257, 33), (97, 257, 33), (33, 5, 1)])
def test_nearest_matches_brute_force(n, k, d, distance):
    x, cb = torch.randn(n, d), torch.randn(k, d)
    idx, dist = vlcore.vq_nearest(x, cb, distance=distance)
    t_idx, t_dist, all_d = brute_force(x, cb, distance)
    # exact indices wherever the float64 gap to the runner-up exceeds fp32 rounding, and on exact ties
    # (d = 1 with cosine: every normalised entry is exactly +-1); elsewhere a float64-equivalent choice
    top2 = all_d.topk(min(2, k), dim=1, largest=False).values
    gap = top2[:, -1] - top2[:, 0]
    clear = (gap > 1e-4) | (gap == 0)
    assert torch.equal(idx[clear], t_idx[clear])
    assert (all_d.gather(1, idx[:, None]).squeeze(1) - t_dist <= 1e-4).all()
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    scale = x.double().pow(2).sum(1) + cb.double().pow(2).sum(1).max()
    assert ((dist.double() - t_dist).abs() <= 1e-5 * scale + 1e-6).all()


def tie_case(distance):
    """Small-integer data: every product and partial sum is exact in fp16/fp32, so ties are exact whatever the
    summation order; several entries are duplicates or equidistant."""
    v = torch.tensor([1.0, -2, 0, 3, 1, -1])
    w = torch.tensor([2.0, 1, 1, 0, -1, 0])
    first = 3 * w if distance == "l2" else 3 * w + v  # cosine: no entry parallel to another but a duplicate
    cb = torch.stack([first, v, 2 * v, v, -v, v, w, -w])  # rows 1, 3, 5 identical; 6, 7 equidistant from 0
    origin = torch.zeros(6) if distance == "l2" else 2 * v  # cosine of 0 is not an exact tie after rounding
    x = torch.stack([v, -v, origin, v + w - w, 2 * v, w, torch.zeros(6) + 1])
    return x, cb


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_nearest_ties_go_to_lowest_index(distance):
    x, cb = tie_case(distance)
    idx, dist = vlcore.vq_nearest(x, cb, distance=distance)
    t_idx, t_dist, all_d = brute_force(x, cb, distance)
    assert torch.equal(idx, t_idx)
    n_ties = ((all_d == all_d.min(1, keepdim=True).values).sum(1) > 1).sum()
    assert n_ties >= 3  # the case really has ties
    if distance == "l2":
        assert idx.tolist()[:3] == [1, 4, 6]  # x = 0: rows 6 and 7 (+-w) share the smallest norm
    assert torch.allclose(dist.double(), t_dist, atol=1e-5)


def test_nearest_cosine_zero_row_and_scale_invariance():
    cb = torch.randn(9, 7)
    x = torch.randn(5, 7)
    idx, dist = vlcore.vq_nearest(x, cb, distance="cosine")
    idx2, dist2 = vlcore.vq_nearest(7.5 * x, 0.1 * cb, distance="cosine")
    assert torch.equal(idx, idx2) and torch.allclose(dist, dist2, atol=1e-5)
    cos = F.normalize(x, dim=1) @ F.normalize(cb, dim=1).T
    assert torch.allclose(dist, 2 - 2 * cos.max(1).values, atol=1e-5)
    z_idx, z_dist = vlcore.vq_nearest(torch.zeros(1, 7), cb, distance="cosine")
    assert abs(z_dist.item() - 1.0) < 1e-6  # ||0 - e^||^2 = 1 for every entry (up to rounding of the norms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nearest_uses_codebook_in_x_dtype(dtype):
    x, cb = torch.randn(40, 16).to(dtype), torch.randn(11, 16)
    idx, dist = vlcore.vq_nearest(x, cb)
    t_idx, t_dist, _ = brute_force(x, cb)  # brute_force also rounds the codebook to x's dtype
    assert torch.equal(idx, t_idx)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(dist.double(), t_dist, rtol=1e-5, atol=1e-5)


def test_nearest_leading_dims_and_empty():
    x, cb = torch.randn(2, 3, 4, 8), torch.randn(5, 8)
    idx, dist = vlcore.vq_nearest(x, cb)
    assert idx.shape == (2, 3, 4) and dist.shape == (2, 3, 4)
    flat_idx, _ = vlcore.vq_nearest(x.reshape(-1, 8), cb)
    assert torch.equal(idx.flatten(), flat_idx)
    e_idx, e_dist = vlcore.vq_nearest(torch.randn(0, 8), cb)
    assert e_idx.shape == (0,) and e_dist.shape == (0,)


@pytest.mark.parametrize("n,k,d", [(1, 3, 5), (97, 3, 5), (97, 257, 33)])
def test_statistics_match_literal_loop(n, k, d):
    x = torch.randn(n, d)
    idx = torch.randint(0, k, (n,))
    counts, sums = vlcore.vq_statistics(x, idx, k)
    t_counts, t_sums = literal_statistics(x, idx, k)
    assert counts.dtype == torch.float32 and sums.shape == (k, d)
    assert torch.equal(counts.double(), t_counts)
    assert torch.allclose(sums.double(), t_sums, atol=1e-5)
    packed = vq_ops.vq_statistics_packed(x, idx.int(), k)
    assert packed.shape == (k, d + 1) and torch.equal(packed[:, d], counts) and torch.equal(packed[:, :d], sums)


# ---- SOHO's released update, transcribed literally (one-hot matmuls, in-place EMA helpers) -------------

def soho_ema_tensor_inplace(moving_avg, new, decay):
    new_out = torch.mul(new, 1.0 - decay)
    moving_avg.data.mul_(decay).add_(new_out.detach())


def soho_laplace_smoothing(x, n_categories, eps=1e-5):
    return (x + eps) / (x.sum() + n_categories * eps)


def soho_step(embed, cluster_size, embed_avg, inputs_flatten, decay, eps=1e-5):
    """SOHO_Pre_VD.forward in training on one process; returns (quantize, encoding_indices)."""
    num_tokens = embed.shape[0]
    distances = (torch.sum(inputs_flatten ** 2, dim=1, keepdim=True) + torch.sum(embed.data ** 2, dim=1)
                 - 2 * torch.matmul(inputs_flatten, embed.data.t()))
    encoding_indices = torch.argmin(distances, dim=1).unsqueeze(1)
    encodings = torch.zeros(encoding_indices.shape[0], num_tokens, dtype=torch.float)
    encodings.scatter_(1, encoding_indices, 1)
    encoding_sum = torch.sum(encodings, dim=0)
    soho_ema_tensor_inplace(cluster_size, encoding_sum, decay)
    embed_sum = torch.matmul(encodings.t(), inputs_flatten)
    soho_ema_tensor_inplace(embed_avg, embed_sum, decay)
    smoothed = soho_laplace_smoothing(cluster_size, num_tokens, eps) * cluster_size.sum()
    embed.data.copy_(embed_avg / smoothed.unsqueeze(1))
    quantize = torch.matmul(encodings, embed)
    return quantize, encoding_indices.squeeze(1)


def test_ema_update_matches_soho_step():
    k, d = 13, 6
    codebook, x = torch.randn(k, d), torch.randn(50, d)
    counts0, sums0 = torch.rand(k) * 5, torch.randn(k, d)
    mine = [codebook.clone(), counts0.clone(), sums0.clone()]
    soho = [codebook.clone(), counts0.clone(), sums0.clone()]
    idx, _ = vlcore.vq_nearest(x, mine[0])
    counts, sums = vlcore.vq_statistics(x, idx, k)
    ref.ema_update(*mine, counts, sums, gamma=0.8, eps=1e-5)
    soho_step(*soho, x, decay=0.8)
    for a, b in zip(mine, soho):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_module_matches_soho_over_steps():
    k, d = 12, 5
    vd = VisualDictionary(k, d, dead_code_threshold=0.0).train()
    soho = [vd.codebook.clone(), torch.zeros(k), torch.zeros(k, d)]
    gammas = []
    for step in range(5):
        x = torch.randn(64, d) + step
        gammas.append(vd.current_momentum())
        q, idx = vd(x)
        s_q, s_idx = soho_step(*soho, x, decay=min(0.4 * (step + 1), 0.99))
        assert torch.equal(idx, s_idx)
        assert torch.allclose(q, s_q, atol=1e-5)
        assert torch.allclose(vd.codebook, soho[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(vd.ema_counts, soho[1], atol=1e-5)
        assert torch.allclose(vd.ema_sums, soho[2], atol=1e-5)
    assert gammas == pytest.approx([0.4, 0.8, 0.99, 0.99, 0.99])


def test_momentum_schedule():
    assert [ref.momentum_at(t, 0.99, 0.99 / 0.4) for t in (1, 2, 3, 10)] == pytest.approx([0.4, 0.8, 0.99, 0.99])
    assert [ref.momentum_at(t, 0.9, 10) for t in (1, 5, 10, 11)] == pytest.approx([0.09, 0.45, 0.9, 0.9])
    assert ref.momentum_at(1, 0.95, 0) == 0.95
    vd = VisualDictionary(4, 3, momentum=0.9, momentum_warmup_steps=3)
    assert vd.current_momentum(1) == pytest.approx(0.3) and vd.current_momentum(7) == pytest.approx(0.9)


def test_ema_update_all_zero_counts_keeps_codebook():
    cb = torch.randn(4, 3)
    state = [cb.clone(), torch.zeros(4), torch.zeros(4, 3)]
    ref.ema_update(*state, torch.zeros(4), torch.zeros(4, 3), gamma=0.5)
    assert torch.equal(state[0], cb)


# ---- module ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True])
def test_straight_through_gradient(training):
    vd = VisualDictionary(7, 5, dead_code_threshold=0.0).train(training)
    x = torch.randn(3, 4, 5, requires_grad=True)
    q, idx = vd(x)
    assert idx.shape == (3, 4) and q.dtype == x.dtype
    assert torch.allclose(q, vd.codebook[idx], atol=1e-6)  # after the update in training (as SOHO)
    g = torch.randn_like(q)
    (dx,) = torch.autograd.grad(q, x, g)
    assert torch.equal(dx, g)


def test_dead_entry_restart_takes_worst_represented_features():
    k, d = 8, 4
    vd = VisualDictionary(k, d, dead_code_threshold=0.5).train()
    cb0 = vd.codebook.clone()
    x = torch.randn(30, d) * 0.1 + cb0[0]  # everything lands near entry 0: the others are dead
    x[:3] += torch.tensor([[5.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 7.0, 0]])
    idx, dist = vlcore.vq_nearest(x, cb0)
    used = set(idx.tolist())
    dead = [j for j in range(k) if j not in used]
    order = torch.sort(dist, descending=True, stable=True).indices
    vd(x)
    assert int(vd.dead_codes) == len(dead)
    for r, j in enumerate(dead):
        assert torch.equal(vd.codebook[j], x[order[r]])
        assert vd.ema_counts[j].item() == pytest.approx(0.5)
        assert torch.allclose(vd.ema_sums[j], 0.5 * x[order[r]])
    # the restarted entries now win their features
    idx2, _ = vlcore.vq_nearest(x[order[: len(dead)]], vd.codebook)
    assert idx2.tolist() == dead


def test_kmeans_init_is_lloyd_from_a_uniform_sample():
    k, d = 6, 8
    centers = torch.randn(k, d) * 10
    x = centers.repeat(40, 1) + 0.3 * torch.randn(40 * k, d)
    x = x[torch.randperm(x.shape[0])]
    vd = VisualDictionary(k, d, kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.0, seed=5).train()
    assert not bool(vd.initialized)
    # literal Lloyd's iterations in float64 from the same uniform sample (rank 0's generator, top keys)
    keys = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5 * 1_000_003))
    cent = x[torch.sort(keys, descending=True, stable=True).indices[:k]].double()
    for _ in range(10):
        assign = torch.cdist(x.double(), cent).argmin(1)
        for j in range(k):
            if (assign == j).any():
                cent[j] = x.double()[assign == j].mean(0)
    vd(x)
    assert bool(vd.initialized)
    # the momentum step that follows on the same (converged) batch leaves the centroids in place
    assert torch.allclose(vd.codebook.double(), cent, atol=1e-3)
    start_cost = torch.cdist(x, x[torch.sort(keys, descending=True, stable=True).indices[:k]]).min(1).values.mean()
    assert torch.cdist(x, vd.codebook).min(1).values.mean() < start_cost


def test_usage_statistics():
    vd = VisualDictionary(4, 2, dead_code_threshold=0.0).eval()
    vd.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    vd(vd.codebook.repeat(3, 1))
    assert vd.usage()["perplexity"] == pytest.approx(4.0)
    vd(vd.codebook[:1].repeat(5, 1))
    assert vd.usage()["perplexity"] == pytest.approx(1.0)


def test_state_stays_fp32_under_half_and_autocast():
    vd = VisualDictionary(5, 4, dead_code_threshold=0.0).train()
    vd(torch.randn(16, 4))
    before = vd.codebook.clone()
    vd = vd.to(torch.bfloat16)
    assert vd.codebook.dtype == torch.float32 and torch.equal(vd.codebook, before)
    assert vd.ema_sums.dtype == torch.float32 and vd.step.dtype == torch.int64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, _ = vd(torch.randn(10, 4).bfloat16())
    assert q.dtype == torch.bfloat16 and vd.codebook.dtype == torch.float32
    assert vd.ema_counts.sum().item() > 0


def test_state_dict_round_trip():
    a = VisualDictionary(9, 6, dead_code_threshold=0.3, seed=1).train()
    for _ in range(3):
        a(torch.randn(20, 6))
    b = VisualDictionary(9, 6, dead_code_threshold=0.3, seed=2)
    b.load_state_dict(a.state_dict())
    for name in ("codebook", "ema_counts", "ema_sums", "step", "initialized"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = torch.randn(25, 6)
    qa, ia = a(x)
    qb, ib = b.train()(x)
    assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(a.codebook, b.codebook)


def test_mvm_mask_masks_exactly_the_chosen_index():
    gen = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 6, (5, 17), generator=gen)
    mask, chosen = mvm_mask(indices, generator=gen)
    assert mask.shape == indices.shape and mask.dtype == torch.bool
    for b in range(5):
        assert chosen[b].item() in indices[b].tolist()
        assert torch.equal(mask[b], indices[b] == chosen[b])


def test_mvm_mask_draws_uniformly_among_distinct_indices():
    row = torch.tensor([[4] * 9 + [7]])
    gen = torch.Generator().manual_seed(0)
    picks = [mvm_mask(row, generator=gen)[1].item() for _ in range(400)]
    share = picks.count(7) / len(picks)
    assert 0.4 < share < 0.6  # uniform over {4, 7}, not weighted by frequency (which would give 0.1)


# ---- errors ------------------------------------------------------------------------------------------

def test_errors():
    cb = torch.randn(4, 8)
    with pytest.raises(ValueError, match="last dim D = 8"):
        vlcore.vq_nearest(torch.randn(3, 7), cb)
    with pytest.raises(ValueError, match="`codebook` must have 2 dims"):
        vlcore.vq_nearest(torch.randn(3, 8), cb[0])
    with pytest.raises(TypeError, match="`x` must have dtype"):
        vlcore.vq_nearest(torch.ones(3, 8, dtype=torch.int64), cb)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        vlcore.vq_nearest([[1.0] * 8], cb)
    with pytest.raises(ValueError, match="`distance` must be one of"):
        vlcore.vq_nearest(torch.randn(3, 8), cb, distance="dot")
    with pytest.raises(ValueError, match="is on meta"):
        vlcore.vq_nearest(torch.randn(3, 8), cb.to("meta"))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 4\)"):
        vlcore.vq_statistics(torch.randn(3, 8), torch.tensor([0, 4, 1]), 4)
    with pytest.raises(ValueError, match="must have shape x.shape"):
        vlcore.vq_statistics(torch.randn(3, 8), torch.tensor([0, 1]), 4)
    with pytest.raises(TypeError, match="`indices` must have dtype"):
        vlcore.vq_statistics(torch.randn(3, 8), torch.tensor([0.0, 1, 2]), 4)
    with pytest.raises(ValueError, match="`num_codes` must be a positive int"):
        vlcore.vq_statistics(torch.randn(3, 8), torch.tensor([0, 1, 2]), 0)
    with pytest.raises(vlcore.dispatch.BackendError, match="unknown backend"):
        vlcore.vq_nearest(torch.randn(3, 8), cb, backend="nope")
    vd = VisualDictionary(4, 8)
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., 8\)"):
        vd(torch.randn(2, 5))
    with pytest.raises(ValueError, match="distance must be one of"):
        VisualDictionary(4, 8, distance="manhattan")
    with pytest.raises(ValueError, match="momentum"):
        VisualDictionary(4, 8, momentum=1.5)
    with pytest.raises(ValueError, match="must have 2 dims"):
        mvm_mask(torch.zeros(3, dtype=torch.int64))


# ---- torch.library registration ----------------------------------------------------------------------

def test_opcheck_registered_ops():
    x, cb = torch.randn(9, 5), torch.randn(4, 5)
    for distance in ("l2", "cosine"):
        torch.library.opcheck(vq_ops._vq_nearest_op, (x, cb, distance, "reference"))
    idx = torch.randint(0, 4, (9,))
    torch.library.opcheck(vq_ops._vq_statistics_op, (x, idx, 4, "reference"))


def test_compile_fullgraph_registered_ops():
    def step(x, cb):
        idx, dist = vq_ops._vq_nearest_op(x, cb, "l2", "reference")
        packed = vq_ops._vq_statistics_op(x, idx, cb.shape[0], "reference")
        return idx, dist, packed

    x, cb = torch.randn(11, 6), torch.randn(5, 6)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, cb)
    want = step(x, cb)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
