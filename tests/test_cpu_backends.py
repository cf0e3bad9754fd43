"""The ``cpu`` backends (vlcore/cpu/) against independent dense computations and the reference backend, forward
and backward with the same upstream gradient; and the dispatch rule that makes them the default on CPU."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from kernel_check import track_allocations
from test_attention_reference import naive_attention
from test_contrastive_reference import independent_loss
from test_distributed import _check_against_single_process, _contrastive_worker
from test_vq_reference import brute_force, literal_statistics, tie_case

import vlcore
from vlcore import dispatch
from vlcore.cpu import attention as cpu_attention
from vlcore.cpu import contrastive as cpu_contrastive
from vlcore.cpu import vq as cpu_vq
from vlcore.ops import vq as vq_ops
from vlcore.reference import contrastive as contrastive_ref

# ---- attention -----------------------------------------------------------------------------------------

ATTN_CASES = {
    "none": {},
    "causal_square": {"causal": True},
    "causal_fewer_queries": {"causal": True, "nq": 3},
    "causal_more_queries": {"causal": True, "nq": 9},  # the first rows see no key
    "prefix": {"prefix_lens": [0, 4]},
    "padding_empty_row": {"kv_lens": [0, 5]},
    "prefix_padding": {"prefix_lens": [5, 1], "kv_lens": [3, 7]},
    "shared_queries": {"shared": True, "kv_lens": [7, 2]},
    "rel_pos": {"rel_pos": True},
    "rel_pos_causal_padding": {"rel_pos": True, "causal": True, "kv_lens": [4, 0], "nq": 5},
    "rel_pos_shared_prefix": {"rel_pos": True, "shared": True, "prefix_lens": [2, 6]},
}


def _attention_inputs(case, dtype, batch=2, nk=7, heads=2, dim=4):
    spec = dict(ATTN_CASES[case])
    nq = spec.pop("nq", nk)
    q = torch.randn(1 if spec.pop("shared", False) else batch, nq, heads, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, nk, heads, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, nk, heads, dim, dtype=dtype, requires_grad=True)
    kw = {key: (torch.tensor(val) if isinstance(val, list) else val) for key, val in spec.items() if key != "rel_pos"}
    leaves = [q, k, v]
    if spec.get("rel_pos"):
        grid = (2, 3)
        table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), heads, dtype=dtype, requires_grad=True)
        kw.update(rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=1)
        leaves.append(table)
    return leaves, kw


def _grads(out, leaves, upstream):
    return torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_cpu_matches_naive_float64_forward_and_backward(case):
    leaves, kw = _attention_inputs(case, torch.float64)
    out = vlcore.attention(*leaves[:3], backend="cpu", **kw)
    naive_kw = {key: val for key, val in kw.items() if not key.startswith("rel_pos")}
    if "rel_pos_table" in kw:
        naive_kw.update(table=kw["rel_pos_table"], grid=kw["rel_pos_grid"], start=kw["rel_pos_start"])
    expected = naive_attention(*leaves[:3], **naive_kw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, upstream), _grads(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_cpu_matches_reference_float32(case):
    leaves, kw = _attention_inputs(case, torch.float32, nk=33, heads=4, dim=16)
    out = vlcore.attention(*leaves[:3], backend="cpu", **kw)
    expected = vlcore.attention(*leaves[:3], backend="reference", **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, upstream), _grads(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _sdpa_nan_on_empty_rows(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """SDPA as older torch versions compute it: a plain softmax, so a row with no visible key is NaN (and so is its
    gradient)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("nan_sdpa", [False, True])
def test_attention_cpu_fully_masked_rows_output_zero_and_zero_gradient(nan_sdpa, monkeypatch):
    """SDPA alone gives NaN on such rows in some torch versions; the backend must give 0 and zero gradient."""
    if nan_sdpa:
        monkeypatch.setattr(cpu_attention.F, "scaled_dot_product_attention", _sdpa_nan_on_empty_rows)
    (q, k, v), _ = _attention_inputs("none", torch.float32)
    kv_lens = torch.tensor([0, 3])
    out = vlcore.attention(q, k, v, kv_lens=kv_lens, backend="cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dk[0], torch.zeros_like(dk[0]))
    assert torch.equal(dk[1, 3:], torch.zeros_like(dk[1, 3:]))  # padding keys get nothing


def test_attention_cpu_expanded_queries_get_the_batch_summed_gradient():
    (q1, k, v), _ = _attention_inputs("shared_queries", torch.float64)
    expanded = q1.expand(k.shape[0], -1, -1, -1)
    out = vlcore.attention(expanded, k, v, backend="cpu")
    explicit = q1.detach().repeat(k.shape[0], 1, 1, 1).requires_grad_()
    expected = naive_attention(explicit, k, v)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, q1, upstream)
    (want,) = torch.autograd.grad(expected, explicit, upstream)
    torch.testing.assert_close(got, want.sum(0, keepdim=True))


def test_attention_cpu_rel_pos_bias_built_once_per_call(monkeypatch):
    """The table is gathered once for all heads and the batch, not once per head or sample."""
    calls = []
    real = cpu_attention.ref.rel_pos_bias
    monkeypatch.setattr(cpu_attention.ref, "rel_pos_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    leaves, kw = _attention_inputs("rel_pos", torch.float32, batch=3, heads=4)
    vlcore.attention(*leaves[:3], backend="cpu", **kw).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 8), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_cpu_cached_causal_bias_matches_the_oracle_visibility(nq, nk, dtype):
    """The memoised additive mask is -inf exactly where the independent oracle hides a key, and a second call
    (served from the memo) returns the same values for its own dtype."""
    from dense_oracles import attention_visible

    want = attention_visible(1, nq, nk, causal=True, prefix_lens=None, kv_lens=None)[:, None]
    for _ in range(2):
        bias = cpu_attention.causal_bias(nq, nk, dtype, torch.device("cpu"))
        assert bias.dtype == dtype and bias.shape == (1, 1, nq, nk)
        assert torch.equal(bias == 0, want) and torch.equal(bias == float("-inf"), ~want)


def test_attention_cpu_prefix_builds_no_boolean_mask(monkeypatch):
    """PrefixLM without padding takes the additive-mask path: the boolean (B, Nq, Nk) mask is never built."""
    monkeypatch.setattr(cpu_attention.ref, "visibility_mask", lambda *a, **k: pytest.fail("boolean mask built"))
    leaves, kw = _attention_inputs("prefix", torch.float64)
    out = vlcore.attention(*leaves, backend="cpu", **kw)
    torch.testing.assert_close(out, naive_attention(*leaves, **kw), rtol=1e-10, atol=1e-12)


# ---- contrastive loss ----------------------------------------------------------------------------------

def _small_chunks(monkeypatch, elements=12):
    """Column chunks of a few columns, so that every test crosses chunk boundaries (and uneven last chunks)."""
    monkeypatch.setattr(cpu_contrastive, "_CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(cpu_contrastive, "_MIN_COLUMNS", 1)


def _contrastive_leaves(b, d, kind, dtype=torch.float32):
    img, txt = F.normalize(torch.randn(b, d, dtype=dtype), dim=-1), F.normalize(torch.randn(b, d, dtype=dtype), dim=-1)
    leaves = [img, txt, torch.tensor(7.5, dtype=dtype)] + ([torch.tensor(-3.0, dtype=dtype)] if kind == "siglip" else [])
    return [t.requires_grad_() for t in leaves]


@pytest.mark.parametrize("b,d", [(1, 3), (7, 80), (13, 5)])
@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_contrastive_cpu_matches_independent_dense_loss(b, d, kind, monkeypatch):
    _small_chunks(monkeypatch)
    leaves = _contrastive_leaves(b, d, kind)
    loss = vlcore.contrastive_loss(*leaves[:3], kind=kind, logit_bias=leaves[3] if kind == "siglip" else None,
                                   backend="cpu")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = independent_loss(*leaves64[:3], kind, leaves64[3] if kind == "siglip" else None)
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=1e-5, atol=1e-6)
    upstream = torch.tensor(1.7)
    for g, t in zip(torch.autograd.grad(loss, leaves, upstream),
                    torch.autograd.grad(truth, leaves64, upstream.double())):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("b,big_b,offset", [(5, 11, 0), (4, 11, 7), (3, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_cpu_row_op_matches_reference_forward_and_backward(kind, b, big_b, offset, dtype, monkeypatch):
    """The rows x gathered-columns op of a rank (offset = where its rows start), as the distributed path runs it."""
    _small_chunks(monkeypatch, elements=8)
    x, y = torch.randn(b, 6, dtype=dtype), torch.randn(big_b, 6, dtype=dtype)
    scale, bias = torch.tensor(3.0, dtype=dtype), (torch.tensor(-1.5, dtype=dtype) if kind == "siglip" else None)
    rows, lse = cpu_contrastive.CpuContrastive.forward(x, y, scale, bias, offset, kind)
    want_rows, want_lse = contrastive_ref.row_losses(x, y, scale, bias, offset=offset, kind=kind)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(rows, want_rows, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    drow = torch.randn(b, dtype=dtype)
    got = cpu_contrastive.CpuContrastive.backward(drow, x, y, scale, bias, lse, offset, kind)
    want = contrastive_ref.row_losses_backward(drow, x, y, scale, bias, offset=offset, kind=kind)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w.to(g.dtype), **tol)


def test_contrastive_cpu_pair_backward_equals_two_row_backwards(monkeypatch):
    _small_chunks(monkeypatch, elements=10)
    img, txt, scale = torch.randn(9, 5), torch.randn(9, 5), torch.tensor(4.0)
    impl = cpu_contrastive.CpuContrastive
    _, lse_i = impl.forward(img, txt, scale, None, 0, "infonce")
    _, lse_t = impl.forward(txt, img, scale, None, 0, "infonce")
    d_i, d_t = torch.randn(9), torch.randn(9)
    g_img, g_txt, dscale = impl.pair_backward(d_i, d_t, img, txt, scale, lse_i, lse_t)
    dx1, dy1, ds1, _ = contrastive_ref.row_losses_backward(d_i, img, txt, scale)
    dx2, dy2, ds2, _ = contrastive_ref.row_losses_backward(d_t, txt, img, scale)
    torch.testing.assert_close(g_img, dx1 + dy2)
    torch.testing.assert_close(g_txt, dy1 + dx2)
    torch.testing.assert_close(dscale, ds1 + ds2)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_contrastive_cpu_memory_is_linear_in_the_batch(kind, monkeypatch):
    """No b x B logits: with chunks of 4096 logits the largest buffer of a 256-row loss is far below 256²."""
    _small_chunks(monkeypatch, elements=4096)
    leaves = _contrastive_leaves(256, 8, kind)
    with track_allocations() as tracker:
        loss = vlcore.contrastive_loss(*leaves[:3], kind=kind, logit_bias=leaves[3] if kind == "siglip" else None,
                                       backend="cpu")
        loss.backward()
    assert tracker.largest_bytes <= 4 * 4096, tracker.largest_shape


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_contrastive_cpu_nan_input_gives_nan_loss(kind):
    leaves = _contrastive_leaves(6, 4, kind)
    with torch.no_grad():
        leaves[0][2, 1] = float("nan")
    loss = vlcore.contrastive_loss(*leaves[:3], kind=kind, logit_bias=leaves[3] if kind == "siglip" else None,
                                   backend="cpu")
    assert loss.isnan()


def _chunked_contrastive_worker(rank, world):
    cpu_contrastive._CHUNK_ELEMENTS, cpu_contrastive._MIN_COLUMNS = 6, 1  # a fresh process: patch directly
    return _contrastive_worker(rank, world, "cpu")


@pytest.mark.distributed
def test_contrastive_cpu_distributed_matches_single_process_with_unequal_local_batches():
    _check_against_single_process(run_distributed(_chunked_contrastive_worker, 2), "cpu")


# ---- visual dictionary (vq) ----------------------------------------------------------------------------

def _small_tiles(monkeypatch, chunk=4, tile=12):
    """Codebook chunks of a few entries and tiles of a few rows, so every test crosses both boundaries."""
    monkeypatch.setattr(cpu_vq, "_CODEBOOK_CHUNK", chunk)
    monkeypatch.setattr(cpu_vq, "_TILE_ELEMENTS", tile)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 3, 5), (37, 11, 6), (20, 257, 9)])
def test_vq_cpu_nearest_matches_brute_force_and_reference(n, k, d, distance, monkeypatch):
    _small_tiles(monkeypatch)
    x, cb = torch.randn(n, d), torch.randn(k, d)
    idx, dist = vlcore.vq_nearest(x, cb, distance=distance, backend="cpu")
    t_idx, t_dist, all_d = brute_force(x, cb, distance)
    top2 = all_d.topk(min(2, k), dim=1, largest=False).values
    clear = (top2[:, -1] - top2[:, 0] > 1e-4) | (top2[:, -1] == top2[:, 0])
    assert torch.equal(idx[clear], t_idx[clear])
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    torch.testing.assert_close(dist.double(), t_dist, rtol=1e-5, atol=1e-5)
    r_idx, r_dist = vlcore.vq_nearest(x, cb, distance=distance, backend="reference")
    assert torch.equal(idx[clear], r_idx[clear])
    torch.testing.assert_close(dist, r_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_vq_cpu_ties_go_to_lowest_index_across_chunks(distance, monkeypatch):
    _small_tiles(monkeypatch, chunk=2)  # duplicates 1, 3, 5 and the equidistant 6, 7 sit in different chunks
    x, cb = tie_case(distance)
    idx, _ = vlcore.vq_nearest(x, cb, distance=distance, backend="cpu")
    assert torch.equal(idx, brute_force(x, cb, distance)[0])


@pytest.mark.parametrize("nan_entries", [[5], [1, 6], [9]])
def test_vq_cpu_nan_entry_wins_like_argmin(nan_entries, monkeypatch):
    """torch.argmin returns the first NaN of a row: a NaN codebook entry is every row's choice, whichever chunk
    it lies in, and a NaN row picks entry 0."""
    _small_tiles(monkeypatch, chunk=3)
    x, cb = torch.randn(7, 4), torch.randn(10, 4)
    cb[nan_entries, 2] = float("nan")
    x[3, 1] = float("nan")
    idx, dist = vlcore.vq_nearest(x, cb, backend="cpu")
    r_idx, r_dist = vlcore.vq_nearest(x, cb, backend="reference")
    assert torch.equal(idx, r_idx)
    assert idx.tolist() == [nan_entries[0]] * 3 + [0] + [nan_entries[0]] * 3
    assert dist.isnan().all() and r_dist.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_vq_cpu_nearest_uses_codebook_in_x_dtype(dtype, monkeypatch):
    _small_tiles(monkeypatch)
    x, cb = torch.randn(40, 16).to(dtype), torch.randn(11, 16)
    idx, dist = vlcore.vq_nearest(x, cb, backend="cpu")
    t_idx, t_dist, _ = brute_force(x, cb)
    assert torch.equal(idx, t_idx)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(dist.double(), t_dist, rtol=1e-5, atol=1e-5)


def test_vq_cpu_statistics_and_ema_match_literal_loop_and_reference():
    x, idx = torch.randn(53, 7), torch.randint(0, 9, (53,))
    idx[:5] = 8  # an entry with several rows, and (likely) some with none
    counts, sums = vlcore.vq_statistics(x, idx, 9, backend="cpu")
    t_counts, t_sums = literal_statistics(x, idx, 9)
    torch.testing.assert_close(counts.double(), t_counts)
    torch.testing.assert_close(sums.double(), t_sums, rtol=1e-5, atol=1e-5)
    initial = (torch.randn(9, 7), torch.rand(9), torch.randn(9, 7))  # codebook, EMA counts, EMA sums
    states = []
    for backend in ("cpu", "reference"):
        state = [t.clone() for t in initial]
        packed = vq_ops.vq_statistics_packed(x, idx, 9, backend=backend)
        vlcore.dispatch.get("vq", backend).impl().ema_update(*state, packed, 0.9, 1e-5)
        states.append(state)
    for got, want in zip(*states):
        torch.testing.assert_close(got, want)
    assert not torch.equal(states[0][0], initial[0])  # the update did something


# ---- dispatch ------------------------------------------------------------------------------------------

def _attention_problem(dtype, device="cpu"):
    return dispatch.Problem(torch.device(device), dtype, {"head_dim": 16})


def test_cpu_tensors_pick_the_cpu_backend():
    assert dispatch.choose("attention", _attention_problem(torch.float32)).name == "cpu"
    assert dispatch.choose("attention", _attention_problem(torch.float64)).name == "cpu"
    # dtypes it declines fall back to the reference
    assert dispatch.choose("attention", _attention_problem(torch.float16)).name == "reference"
    assert dispatch.choose("attention", _attention_problem(torch.float32), backend="reference").name == "reference"
    problem = dispatch.Problem(torch.device("cpu"), torch.bfloat16, {"dim": 8, "kind": "infonce"})
    assert dispatch.choose("contrastive_loss", problem).name == "cpu"
    assert dispatch.choose("vq", dispatch.Problem(torch.device("cpu"), torch.float16, {"dim": 8})).name == "cpu"


@pytest.mark.parametrize("op", ["attention", "contrastive_loss", "vq"])
def test_cpu_backend_never_chosen_for_cuda_tensors(op):
    assert dispatch.get(op, "cpu").refusals(_attention_problem(torch.float32, "cuda"))
    assert "cuda" not in dispatch.get(op, "cpu").devices


def test_public_contrastive_loss_runs_the_cpu_backend_by_default(monkeypatch):
    calls = []
    real = cpu_contrastive.CpuContrastive.forward
    monkeypatch.setattr(cpu_contrastive.CpuContrastive, "forward",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    leaves = _contrastive_leaves(5, 4, "siglip")
    auto = vlcore.contrastive_loss(*leaves[:3], kind="siglip", logit_bias=leaves[3])
    assert calls == [1]
    torch.testing.assert_close(auto, vlcore.contrastive_loss(*leaves[:3], kind="siglip", logit_bias=leaves[3],
                                                             backend="reference"))
    assert calls == [1]


def test_public_attention_runs_the_cpu_backend_by_default(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    (q, k, v), _ = _attention_inputs("none", torch.float32)
    auto = vlcore.attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(auto, vlcore.attention(q, k, v, backend="reference"))
    assert calls == [1]  # the explicit reference request does not go through the cpu backend


def test_info_lists_the_cpu_backend_of_every_op():
    from vlcore import info

    report = info.report()
    for op in ("attention", "contrastive_loss", "vq"):
        assert any(line.split()[:3] == [op, "cpu", "available"] for line in report.splitlines()), op
    assert "CPU tensors -> cpu" in report
