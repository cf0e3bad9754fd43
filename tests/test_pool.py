"""AttentionPool / MultiAttentionPool against an independent open_clip-style computation
(LayerNorm + separate projections + F.scaled_dot_product_attention per pooler)."""

import pytest
import torch
import torch.nn.functional as F

import vlcore


def open_clip_style(pool, context, p):
    """Pooler ``p`` of ``pool`` computed with plain torch ops."""
    b, n, _ = context.shape
    h, d = pool.heads, pool.dim // pool.heads
    ctx = pool.norm_context(context)
    k_w, v_w = pool.kv_proj.weight.chunk(2)
    k_b, v_b = pool.kv_proj.bias.chunk(2)
    k = F.linear(ctx, k_w, k_b).view(b, n, h, d).transpose(1, 2)
    v = F.linear(ctx, v_w, v_b).view(b, n, h, d).transpose(1, 2)
    q = pool.q_proj(pool.norm_q(pool.queries[p])).view(1, -1, h, d).transpose(1, 2).expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, pool.dim)
    return pool.out_proj[p](out)


@pytest.mark.parametrize("n_queries,context_dim", [((1,), None), ((5,), 24), ((6, 1), 40)])
def test_pool_matches_independent_computation(n_queries, context_dim):
    pool = vlcore.nn.MultiAttentionPool(32, n_queries, heads=4, context_dim=context_dim).double()
    context = torch.randn(3, 11, context_dim or 32, dtype=torch.float64, requires_grad=True)
    outs = pool(context)
    assert [o.shape for o in outs] == [(3, n, 32) for n in n_queries]
    for p, out in enumerate(outs):
        torch.testing.assert_close(out, open_clip_style(pool, context, p))
    # gradients of the queries and the context agree too
    g = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [context, *pool.queries], g)
    want = torch.autograd.grad([open_clip_style(pool, context, p) for p in range(len(outs))],
                               [context, *pool.queries], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_single_pool_returns_a_tensor():
    pool = vlcore.nn.AttentionPool(16, 3, heads=2)
    assert pool(torch.randn(2, 5, 16)).shape == (2, 3, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by heads"):
        vlcore.nn.AttentionPool(30, 1, heads=4)
    with pytest.raises(ValueError, match=r"`context` must be \(B, N, context_dim\)"):
        vlcore.nn.AttentionPool(16, 1, heads=2)(torch.randn(5, 16))
