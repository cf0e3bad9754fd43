"""Shared blocks of vlcore.nn (attention module, KV cache, transformer stacks, Swin, ResNet, ViT, text, heads,
objectives, decoding) against independent float64 computations."""

import pytest
import torch
import torch.nn.functional as F

import vlcore
from vlcore import tokens as T
from vlcore.nn import attention as attn_mod
from vlcore.nn.attention import KVCache, MultiheadAttention
from vlcore.nn.generation import DecodingState, decode
from vlcore.nn.heads import BoxHead, MLMHead
from vlcore.nn.objectives import (
    IGNORE,
    box_losses,
    generalized_box_iou,
    mask_tokens,
    sample_hard_negatives,
    sample_negatives,
    token_cross_entropy,
)
from vlcore.nn.resnet import ResNet
from vlcore.nn.swin import SwinBlock, SwinEncoder, window_plan
from vlcore.nn.text import TextEmbeddings, TextEncoder
from vlcore.nn.transformer import decoder, encoder
from vlcore.nn.vit import ViT
from vlcore.reference.attention import rel_pos_index

D64 = torch.float64



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's spinning
    multiplies the run time; restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def dense_attention(q, k, v, visible=None, bias=None):
    """Textbook softmax attention on (B, N, H, D) with a boolean (B, Nq, Nk) mask and an (H, Nq, Nk) bias."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


def table_bias(table, gh, gw, start, n):
    """(H, n, n) bias of a rel-pos table for the grid tokens [start, start + gh*gw), built from the formula."""
    bias = torch.zeros(table.shape[1], n, n, dtype=table.dtype)
    for tq in range(start, start + gh * gw):
        for tk in range(start, start + gh * gw):
            (yq, xq), (yk, xk) = divmod(tq - start, gw), divmod(tk - start, gw)
            bias[:, tq, tk] = table[(yq - yk + gh - 1) * (2 * gw - 1) + (xq - xk + gw - 1)]
    return bias


# ---- attention module ------------------------------------------------------------------------------------

def test_fused_qkv_views_reach_the_op_without_copies(monkeypatch):
    seen, real = {}, vlcore.attention

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn_mod.vlcore, "attention", spy)
    m = MultiheadAttention(64, 2)
    m(torch.randn(3, 5, 64))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.stride() == (5 * 3 * 64, 3 * 64, 32, 1) and not q.is_contiguous()
    assert k.data_ptr() - q.data_ptr() == 64 * q.element_size()


@pytest.mark.parametrize("mode", ["causal", "prefix", "padding", "rel_pos"])
def test_self_attention_matches_dense(mode):
    b, n, dim, heads = 2, 9, 16, 2
    m = MultiheadAttention(dim, heads, rel_pos_grid=(2, 3)).double()
    x = torch.randn(b, n, dim, dtype=D64, requires_grad=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    kw, visible, bias = {"use_rel_pos": False}, None, None
    if mode == "causal":
        kw["causal"], visible = True, (j <= i).expand(b, n, n)
    elif mode == "prefix":
        p = torch.tensor([3, 0])
        kw["prefix_lens"], visible = p, (j <= i) | (j < p.view(b, 1, 1))
    elif mode == "padding":
        lens = torch.tensor([9, 4])
        kw["kv_lens"], visible = lens, (j < lens.view(b, 1, 1)).expand(b, n, n)
    else:
        kw = {"rel_pos_start": 2}
        bias = table_bias(m.rel_pos_table, 2, 3, 2, n)
    out = m(x, **kw)
    qkv = m.qkv(x).view(b, n, 3, heads, dim // heads)
    ref = m.proj(dense_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], visible, bias).reshape(b, n, dim))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, m.qkv.weight, m.rel_pos_table] if mode == "rel_pos" else [x, m.qkv.weight], g)
    grads_ref = torch.autograd.grad(ref, [x, m.qkv.weight, m.rel_pos_table] if mode == "rel_pos" else
                                    [x, m.qkv.weight], g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


def test_cross_attention_padding_matches_dense():
    m = MultiheadAttention(16, 2, cross=True, context_dim=12).double()
    x, ctx = torch.randn(2, 4, 16, dtype=D64), torch.randn(2, 6, 12, dtype=D64)
    lens = torch.tensor([6, 2])
    out = m(x, ctx, kv_lens=lens)
    q = m.q(x).view(2, 4, 2, 8)
    kv = m.kv(ctx).view(2, 6, 2, 2, 8)
    visible = (torch.arange(6) < lens.view(2, 1, 1)).expand(2, 4, 6)
    ref = m.proj(dense_attention(q, kv[:, :, 0], kv[:, :, 1], visible).reshape(2, 4, 16))
    torch.testing.assert_close(out, ref)


def test_kv_cache_decoding_equals_full_pass_and_reorders():
    torch.manual_seed(1)
    stack = decoder(32, 2, 2, cross=True, context_dim=24).double().eval()
    ctx, ctx_lens = torch.randn(3, 5, 24, dtype=D64), torch.tensor([5, 3, 1], dtype=torch.int32)
    y = torch.randn(3, 7, 32, dtype=D64)
    full = stack(y, ctx, context_lens=ctx_lens)
    cache = stack.new_cache(4)  # smaller than needed: the cache grows
    steps = [stack(y[:, :3], ctx, context_lens=ctx_lens, cache=cache)]
    steps += [stack(y[:, t:t + 1], ctx, context_lens=ctx_lens, cache=cache) for t in range(3, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, :5])
    order = torch.tensor([2, 0, 2])
    for layer_cache in cache:
        for c in layer_cache.values():
            c.reorder(order)
    y2 = y[order]
    full2 = stack(y2, ctx[order], context_lens=ctx_lens[order])
    rest = [stack(y2[:, t:t + 1], None, context_lens=ctx_lens[order], cache=cache) for t in range(5, 7)]
    torch.testing.assert_close(torch.cat(rest, 1), full2[:, 5:])


def test_kv_cache_append_returns_history():
    c = KVCache(8)
    k = torch.randn(2, 3, 1, 4)
    c.append(k, k + 1)
    k2, v2 = c.append(k[:, :1], k[:, :1] + 1)
    assert c.length == 4 and k2.shape == (2, 4, 1, 4)
    torch.testing.assert_close(k2, torch.cat([k, k[:, :1]], 1))
    torch.testing.assert_close(v2, torch.cat([k, k[:, :1]], 1) + 1)


def test_checkpointed_stack_matches_plain():
    torch.manual_seed(0)
    plain = encoder(32, 2, 2, rel_pos_grid=(2, 2)).double()
    ckpt = encoder(32, 2, 2, rel_pos_grid=(2, 2), checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 32, dtype=D64, requires_grad=True)
    lens = torch.tensor([6, 5])
    outs = []
    for m in (plain, ckpt):
        out = m(x, kv_lens=lens, rel_pos_start=1)
        gx, gt = torch.autograd.grad(out.square().sum(), [x, m.layers[0].attn.rel_pos_table])
        outs.append((out, gx, gt))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r)


# ---- Swin ------------------------------------------------------------------------------------------------

def swin_block_reference(block, x):
    """Swin as published: roll, window partition, gathered bias, region mask (-inf: exact), reverse."""
    (h, w), ws, s = block.resolution, block.window, block.shift
    b, _, c = x.shape
    heads, d = block.attn.heads, c // block.attn.heads
    y = block.norm1(x).view(b, h, w, c)
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
    win = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    qkv = block.attn.qkv(win).view(-1, ws * ws, 3, heads, d)
    bias = block.attn.rel_pos_table[rel_pos_index(ws, ws).reshape(-1)].view(ws * ws, ws * ws, heads).permute(2, 0, 1)
    visible = None
    if s:
        region = torch.zeros(h, w, dtype=torch.long)
        cuts = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
        rid = 0
        for sy in cuts:
            for sx in cuts:
                region[sy, sx] = rid
                rid += 1
        rw = region.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        visible = (rw[:, :, None] == rw[:, None, :]).repeat(b, 1, 1)
    out = dense_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], visible, bias).reshape(-1, ws * ws, c)
    out = block.attn.proj(out).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    x = x + out.reshape(b, h * w, c)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("res,window,shift", [(8, 4, 0), (8, 4, 2), (6, 3, 1), (12, 4, 2), (14, 7, 3)])
def test_swin_block_equals_dense_mask_reference(res, window, shift):
    torch.manual_seed(0)
    block = SwinBlock(16, 2, (res, res), window, shift).double()
    assert (block.window, block.shift) == (window, shift)
    x = torch.randn(2, res * res, 16, dtype=D64, requires_grad=True)
    out, ref = block(x), swin_block_reference(block, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x, block.attn.rel_pos_table, block.attn.qkv.weight]
    for a, r in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, r)


def test_window_plan_is_a_permutation_grouped_by_shape():
    perm, groups = window_plan(14, 14, 7, 3)
    assert sorted(perm) == list(range(196))
    assert sum(h * w * c for h, w, c in groups) == 196
    assert len(groups) == 9  # odd window: (7, 4, 3) x (7, 4, 3) region shapes
    assert len(window_plan(8, 8, 4, 2)[1]) == 4 and window_plan(8, 8, 4, 0)[1] == ((4, 4, 4),)


def test_swin_block_on_map_not_larger_than_window_does_not_shift():
    block = SwinBlock(16, 2, (4, 4), 7, 3)
    assert (block.window, block.shift) == (4, 0)


def test_swin_encoder_shapes_and_table_per_layer():
    enc = SwinEncoder(32, 4, 16, (2, 2), (1, 2), window=4)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16, 32) and enc.grid == (4, 4)
    tables = [m.attn.rel_pos_table for m in enc.blocks if isinstance(m, SwinBlock)]
    assert len(tables) == 4 and len({t.data_ptr() for t in tables}) == 4


# ---- CNN, ViT, text ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,stride,channels", [((1, 1, 1), 16, 256), ((1, 1, 1, 1), 32, 512)])
def test_resnet_stages(layers, stride, channels):
    net = ResNet(layers, 64, base_width=16, norm="group")
    out = net(torch.randn(2, 3, 64, 64))
    assert net.stride == stride and out.shape == (2, channels, 64 // stride, 64 // stride)
    with pytest.raises(ValueError, match="image"):
        net(torch.randn(2, 3, 48, 48))


def test_vit_shapes():
    vit = ViT(32, 8, 32, 1, 1, cls_token=True)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 17, 32)


def test_text_encoder_ignores_padding():
    enc = TextEncoder(50, 32, 2, 1, max_len=10).eval()
    text = torch.randint(7, 50, (2, 8))
    mask = torch.arange(8) < torch.tensor([[8], [5]])
    a = enc(text, mask)
    text2 = text.clone()
    text2[1, 5:] = 9
    b = enc(text2, mask)
    torch.testing.assert_close(a[1, :5], b[1, :5])
    torch.testing.assert_close(a[0], b[0])


def test_text_embeddings_sum():
    emb = TextEmbeddings(20, 8, 6, segments=2, norm=False)
    t = torch.tensor([[3, 4, 5]])
    ref = emb.tokens.weight[t] + emb.positions.weight[:3] + emb.segments.weight[1]
    torch.testing.assert_close(emb(t, segments=1), ref)


def test_mlm_head_ties_weights():
    emb = torch.nn.Embedding(30, 8)
    head = MLMHead(8, emb)
    out = head(torch.randn(2, 3, 8))
    out.sum().backward()
    assert out.shape == (2, 3, 30) and emb.weight.grad is not None
    assert all(p is not emb.weight for p in head.parameters())
    box = BoxHead(8)(torch.randn(4, 8) * 100).detach()
    assert box.shape == (4, 4) and 0 <= float(box.min()) and float(box.max()) <= 1


# ---- objectives ------------------------------------------------------------------------------------------

def test_giou_known_boxes():
    a = torch.tensor([[0., 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=D64)
    b = torch.tensor([[1., 1, 3, 3], [2, 0, 3, 1], [0, 0, 1, 1]], dtype=D64)
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0], dtype=D64))
    pred = torch.tensor([[1., 1, 2, 2]], dtype=D64)  # (cx, cy, w, h) of [0, 0, 2, 2]
    target = torch.tensor([[2., 2, 2, 2]], dtype=D64)  # [1, 1, 3, 3]
    l1, giou = box_losses(pred, target)
    torch.testing.assert_close(l1, torch.tensor(2.0, dtype=D64))
    torch.testing.assert_close(giou, torch.tensor(1 - (1 / 7 - 2 / 9), dtype=D64))


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(T.NUM_SPECIAL, 1000, (200, 100), generator=g)
    text[:, 0], text[:, 90] = T.BOS, T.EOS
    mask = torch.arange(100) <= 90
    text[:, 91:] = T.PAD
    masked, labels = mask_tokens(text, mask.expand_as(text), 1000, generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 90:].any()
    torch.testing.assert_close(labels[chosen], text[chosen])
    assert (masked[~chosen] == text[~chosen]).all()
    rate = chosen.float().sum() / (200 * 89)
    assert abs(rate - 0.15) < 0.01
    to_mask = (masked[chosen] == T.MASK).float().mean()
    kept = (masked[chosen] == text[chosen]).float().mean()
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
    assert (masked[chosen] >= T.NUM_SPECIAL).logical_or(masked[chosen] == T.MASK).all()


def test_mask_tokens_chooses_at_least_one_per_row():
    text = torch.tensor([[T.BOS, 10, T.EOS, T.PAD], [T.BOS, T.EOS, T.PAD, T.PAD]])
    _, labels = mask_tokens(text, text != T.PAD, 50, prob=0.0)
    assert labels.tolist() == [[IGNORE, 10, IGNORE, IGNORE], [IGNORE] * 4]


def test_token_cross_entropy_counts_only_labelled():
    logits = torch.randn(2, 3, 5, dtype=D64)
    labels = torch.tensor([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    keep = labels != IGNORE
    ref = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(token_cross_entropy(logits, labels).double(), ref)
    assert token_cross_entropy(logits, torch.full_like(labels, IGNORE)) == 0


def test_negative_sampling():
    neg = sample_negatives(5)
    assert (neg != torch.arange(5)).all() and ((0 <= neg) & (neg < 5)).all()
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(1)
    sim = torch.zeros(4, 6)
    sim[:, 5] = 50.0  # column 5 dominates, except for row 3 whose positive it is
    pos = torch.tensor([0, 1, 2, 5])
    draws = torch.stack([sample_hard_negatives(sim, pos) for _ in range(50)])
    assert (draws != pos).all()
    assert (draws[:, :3] == 5).all()
    sim2 = torch.full((2, 3), -1e4)
    sim2[:, 0] = 1e4  # all the mass on the positive: falls back to uniform over the others
    assert (sample_hard_negatives(sim2, torch.tensor([0, 0])) != 0).all()


# ---- decoding --------------------------------------------------------------------------------------------

def _counting_state(vocab=12, eos_after=None):
    """Toy decoder: the next token is (last + 1), EOS after token ``eos_after``; logits peaked but not one-hot."""
    def run(tokens, start, ctx, cache):
        last = tokens
        nxt = (last + 1) % vocab
        if eos_after is not None:
            nxt = torch.where(last == eos_after, torch.full_like(nxt, T.EOS), nxt)
        logits = torch.full((*tokens.shape, vocab), -3.0) + ctx["bias"][:, None, :]
        return logits.scatter(-1, nxt[..., None], 2.0)
    return run


@pytest.mark.parametrize("strategy", ["greedy", "beam", "top_p"])
def test_decode_strategies_on_a_deterministic_chain(strategy):
    state = DecodingState(_counting_state(eos_after=9), {"bias": torch.zeros(2, 12)})
    start = torch.tensor([[T.BOS, 7], [T.BOS, 8]])
    out = decode(state, start, 6, strategy, beam_size=3, top_p=0.5)
    assert out.tolist() == [[8, 9, T.EOS], [9, T.EOS, T.PAD]]


def test_beam_search_finds_the_better_sequence_greedy_misses():
    # step 1: token 7 (p=.5) vs 8 (p=.4); after 7 everything is flat, after 8 EOS is certain.
    vocab = 10

    def run(tokens, start, ctx, cache):
        logits = torch.zeros(*tokens.shape, vocab)
        last = tokens[..., -1:] if tokens.dim() == 2 else tokens
        probs = torch.full((vocab,), 1e-3)
        first = probs.clone()
        first[7], first[8] = 0.5, 0.4
        after8 = probs.clone()
        after8[T.EOS] = 1.0
        out = torch.where((last == T.BOS)[..., None], first.log(), probs.log())
        out = torch.where((last == 8)[..., None], after8.log(), out)
        return logits + out

    greedy = decode(DecodingState(run, {}), torch.tensor([[T.BOS]]), 2, "greedy")
    beam = decode(DecodingState(run, {}), torch.tensor([[T.BOS]]), 2, "beam", beam_size=2, length_penalty=0.0)
    assert greedy[0, 0] == 7 and beam.tolist() == [[8, T.EOS]]


def test_conv_stem_gives_the_patch_grid_and_rejects_other_patch_sizes():
    from vlcore.nn.vit import PatchEmbed

    stem = PatchEmbed(64, 8, 48, stem="conv")
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 and [c.out_channels for c in convs] == [32, 48, 48]
    tokens = stem(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 64, 48) and stem.num_patches == 64
    # token (r, c) sees only its own neighbourhood: changing the far corner leaves token 0 unchanged
    image = torch.randn(1, 3, 64, 64)
    moved = image.clone()
    moved[..., 40:, 40:] += 1
    torch.testing.assert_close(stem(image)[0, 0], stem(moved)[0, 0])
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        PatchEmbed(60, 6, 48, stem="conv")
    with pytest.raises(ValueError, match="stem must be 'linear' or 'conv'"):
        PatchEmbed(64, 8, 48, stem="mlp")
