"""Reference attention against an independent float64 computation (tests/dense_oracles.py: explicit per-pair
masks built by loops, per-token grid coordinates, a softmax over the visible keys); the Swin/timm table layout
against timm's own relative-position index."""


import pytest
import torch
from dense_oracles import attention as naive_attention  # the independent float64 oracle

import vlcore
from vlcore.reference import attention as ref


def timm_relative_position_index(gh, gw):
    """timm's WindowAttention / Swin code, verbatim in spirit."""
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += gh - 1
    relative_coords[:, :, 1] += gw - 1
    relative_coords[:, :, 0] *= 2 * gw - 1
    return relative_coords.sum(-1)


def _inputs(batch, nq, nk, heads, dim, dtype=torch.float64, shared=False):
    q = torch.randn(1 if shared else batch, nq, heads, dim, dtype=dtype)
    k = torch.randn(batch, nk, heads, dim, dtype=dtype)
    v = torch.randn(batch, nk, heads, dim, dtype=dtype)
    return q, k, v


MASKS = {
    "none": {},
    "causal": {"causal": True},
    "prefix": {"prefix_lens": [0, 3]},
    "prefix_full": {"prefix_lens": [7, 7]},
    "padding": {"kv_lens": [7, 2]},
    "padding_empty": {"kv_lens": [0, 5]},
    "causal_padding": {"causal": True, "kv_lens": [4, 7]},
    "prefix_padding": {"prefix_lens": [5, 1], "kv_lens": [3, 6]},
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("nq,shared", [(7, False), (1, False), (4, False), (7, True), (3, True)])
@pytest.mark.parametrize("rel_pos", [False, True])
def test_reference_matches_naive(mask, nq, shared, rel_pos):
    batch, nk, heads, dim = 2, 7, 2, 5
    q, k, v = _inputs(batch, nq, nk, heads, dim, shared=shared)
    kw = {key: (torch.tensor(val) if isinstance(val, list) else val) for key, val in MASKS[mask].items()}
    naive_kw = dict(kw)
    if rel_pos:
        grid, start = (2, 3), 1
        table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), heads, dtype=torch.float64)
        kw.update(rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=start)
        naive_kw.update(table=table, grid=grid, start=start)
    out = vlcore.attention(q, k, v, **kw)
    expected = naive_attention(q, k, v, **naive_kw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v = _inputs(2, 5, 5, 2, 4)
    for t in (q, k, v):
        t.requires_grad_()
    kv_lens = torch.tensor([0, 3])
    out = vlcore.attention(q, k, v, kv_lens=kv_lens)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[:, 3:][1], torch.zeros_like(k.grad[:, 3:][1]))  # padding keys get nothing


def test_causal_is_bottom_right_aligned():
    # Nq=2 queries against Nk=5 keys: query 0 sees keys 0..3, query 1 sees all (flash-attn >= 2.1)
    q, k, v = _inputs(1, 2, 5, 1, 4)
    out = vlcore.attention(q, k, v, causal=True)
    expected = torch.stack([
        vlcore.attention(q[:, :1], k[:, :4], v[:, :4])[0, 0],
        vlcore.attention(q[:, 1:], k, v)[0, 0],
    ])
    torch.testing.assert_close(out[0], expected)


def test_prefix_lens_zero_is_causal_and_full_is_bidirectional():
    q, k, v = _inputs(2, 6, 6, 2, 4)
    torch.testing.assert_close(vlcore.attention(q, k, v, prefix_lens=torch.tensor([0, 0])),
                               vlcore.attention(q, k, v, causal=True))
    torch.testing.assert_close(vlcore.attention(q, k, v, prefix_lens=torch.tensor([6, 6])), vlcore.attention(q, k, v))


def test_shared_queries_batch_one_and_stride_zero_agree_with_explicit_copy():
    q1, k, v = _inputs(3, 4, 6, 2, 4, shared=True)
    expanded = q1.expand(3, -1, -1, -1)
    assert expanded.stride(0) == 0
    explicit = q1.repeat(3, 1, 1, 1)
    for qq in (q1, expanded):
        torch.testing.assert_close(vlcore.attention(qq, k, v, kv_lens=torch.tensor([6, 2, 4])),
                                   vlcore.attention(explicit, k, v, kv_lens=torch.tensor([6, 2, 4])))
    # gradient of the shared set = sum over the batch of the per-sample gradients
    a = q1.clone().requires_grad_()
    b = explicit.clone().requires_grad_()
    g = torch.randn(3, 4, 2, 4, dtype=torch.float64)
    vlcore.attention(a, k, v).backward(g)
    vlcore.attention(b, k, v).backward(g)
    torch.testing.assert_close(a.grad, b.grad.sum(0, keepdim=True))


def test_strided_views_of_fused_qkv():
    qkv = torch.randn(2, 9, 3, 2, 8, dtype=torch.float64)  # (B, N, 3, H, D): what a fused projection gives
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    torch.testing.assert_close(vlcore.attention(q, k, v, causal=True),
                               vlcore.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


def test_scale_argument():
    q, k, v = _inputs(1, 3, 4, 1, 4)
    torch.testing.assert_close(vlcore.attention(q, k, v, scale=0.3), naive_attention(q, k, v, scale=0.3))


def test_swin_table_loads_unchanged():
    """A table in timm's layout, gathered with timm's index into a dense bias, gives the same result."""
    gh, gw, heads = 3, 4, 2
    table = torch.randn((2 * gh - 1) * (2 * gw - 1), heads, dtype=torch.float64)
    q, k, v = _inputs(2, gh * gw, gh * gw, heads, 8)
    bias = table[timm_relative_position_index(gh, gw).view(-1)].view(gh * gw, gh * gw, heads).permute(2, 0, 1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * 8 ** -0.5 + bias
    expected = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    torch.testing.assert_close(vlcore.attention(q, k, v, rel_pos_table=table, rel_pos_grid=(gh, gw)), expected)


def _case(kw, n, dim):
    """Inputs and keyword arguments for a compact case description (``shared``/``rel_pos`` flags + masks)."""
    kw = dict(kw)
    shared, rel = kw.pop("shared", False), kw.pop("rel_pos", False)
    q, k, v = _inputs(2, n, n, 2, dim, shared=shared)
    args = {key: (torch.tensor(val) if isinstance(val, list) else val) for key, val in kw.items()}
    leaves = [q, k, v]
    if rel:
        leaves.append(torch.randn(3 * 3, 2, dtype=torch.float64))
        args.update(rel_pos_grid=(2, 2), rel_pos_start=1)  # tokens 1..4: inside n >= 5

    def fn(q, k, v, table=None):
        return vlcore.attention(q, k, v, **args, **({"rel_pos_table": table} if table is not None else {}))

    return leaves, args, fn


GRAD_CASES = [{"causal": True}, {"prefix_lens": [2, 0], "kv_lens": [5, 3]}, {"rel_pos": True, "prefix_lens": [3, 1]},
              {"shared": True, "kv_lens": [4, 2]}, {"rel_pos": True, "kv_lens": [2, 5], "shared": True}]


@pytest.mark.parametrize("kw", GRAD_CASES)
def test_gradcheck(kw):
    leaves, _, fn = _case(kw, 5, 3)
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in leaves])


@pytest.mark.parametrize("kw", [{}] + GRAD_CASES)
def test_explicit_backward_equals_autograd(kw):
    """The backward formulas a fused kernel implements (reference.attention_backward) equal autograd."""
    leaves, args, fn = _case(kw, 6, 4)
    grad_leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*grad_leaves)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, grad_leaves, g)
    table = leaves[3] if len(leaves) > 3 else None
    got = ref.attention_backward(g, *leaves[:3], rel_pos_table=table, **args)
    for name, a, e in zip(("dq", "dk", "dv", "dtable"), got, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    if table is None:
        assert got[3] is None


def test_reduced_precision_inputs_compute_in_fp32():
    q, k, v = _inputs(2, 9, 9, 2, 8, dtype=torch.float32)
    out16 = vlcore.attention(q.half(), k.half(), v.half(), causal=True)
    assert out16.dtype == torch.float16
    exact = naive_attention(q.half(), k.half(), v.half(), causal=True)
    assert (out16.double() - exact).abs().max() < 2e-3
