"""The survey's models (ViLT, ALIGN, MURAL, VinVL, E2E-VLP, KD-VLP) and their building blocks: every tiny config
trains on CPU (finite losses and gradients, loss goes down on one batch), parameter counts, batch-key errors,
and the blocks checked against independent computations."""

import pytest
import torch
import vlcore.models as models

from vlcore import tokens as T
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.nn.efficientnet import EfficientNet
from vlcore.nn.fusion import SingleStreamEncoder
from vlcore.nn.masking import mask_whole_words, word_ids_from_starts, word_start_table
from vlcore.nn.objectives import IGNORE
from vlcore.nn.region import MaskedRegionKL, cells_in_boxes, masked_mean, roi_align

V = 1024


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: avoid oversubscribing the shared cores
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def make_batch(b=8, t=12, r=3, size=64, seed=0):
    """A batch in the contract's layout; box phrases are copied from the caption (as in digits-scenes)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, t + 1, (b,), generator=g)
    text = torch.randint(T.NUM_SPECIAL, V, (b, t), generator=g)
    text = torch.where(torch.arange(t) < lens[:, None], text, torch.full_like(text, T.PAD))
    text[:, 0] = T.BOS
    text[torch.arange(b), lens - 1] = T.EOS
    box_text = torch.full((b, r, 4), T.PAD)
    box_text[..., 0], box_text[..., 3] = T.BOS, T.EOS
    for j in range(r):
        box_text[:, j, 1:3] = text[:, 1 + j:3 + j]
    box_valid = torch.ones(b, r, dtype=torch.bool)
    box_valid[0, -1] = False
    src = torch.randint(T.NUM_SPECIAL, V, (b + 2, 6), generator=g)
    src[:, 0], src[:, -1] = T.BOS, T.EOS
    return {"image": torch.randn(b, 3, size, size, generator=g), "text": text, "text_mask": text != T.PAD,
            "boxes": torch.rand(b, r, 4, generator=g) * 0.3 + 0.35, "box_valid": box_valid,
            "box_labels": torch.randint(0, 10, (b, r), generator=g).masked_fill(~box_valid, IGNORE),
            "box_text": box_text, "box_text_mask": box_text != T.PAD,
            "src_text": src, "src_text_mask": src != T.PAD, "tgt_text": src.flip(1).roll(1, 1).clone(),
            "tgt_text_mask": src != T.PAD}


def _word_ids(batch):
    return (torch.arange(batch["text"].shape[1]) // 2).expand_as(batch["text"]).contiguous()  # 2-token words


CASES = [
    ("vilt-tiny", {}, {}),
    ("vilt-tiny", {"whole_word_masking": True}, {"word_ids": _word_ids}),
    ("align-tiny", {}, {}),
    ("align-tiny", {"image_tower": "vit", "max_text_len": 24}, {}),  # ViT tower: leaves the log(B) plateau later
    ("mural-tiny", {}, {}),
    ("vinvl-tiny", {}, {}),
    ("vinvl-tiny", {"region_source": "batch", "feature_dim": 20, "mrc_weight": 0.0},
     {"region_features": lambda b: torch.randn(*b["boxes"].shape[:2], 20)}),
    ("e2evlp-tiny", {}, {}),
    ("kdvlp-tiny", {}, {}),
    ("kdvlp-tiny", {"object_feature_source": "batch", "feature_dim": 20, "omvm_class_target": "distribution"},
     {"region_features": lambda b: torch.randn(*b["boxes"].shape[:2], 20),
      "box_label_probs": lambda b: torch.softmax(torch.randn(*b["boxes"].shape[:2], 10), -1),
      "label_text": lambda b: torch.randint(T.NUM_SPECIAL, V, (10, 2)),
      "label_text_mask": lambda b: torch.ones(10, 2, dtype=torch.bool)}),
]


@pytest.mark.parametrize("name,overrides,extra", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_tiny_model_trains_with_finite_losses_and_gradients(name, overrides, extra):
    torch.manual_seed(0)
    model = models.create(name, **overrides)
    batch = make_batch()
    batch.update({k: f(batch) for k, f in extra.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for step in range(24 if overrides.get("image_tower") == "vit" else 14):
        torch.manual_seed(1)  # the same masks, negatives and pollutions every step: one fixed batch to overfit
        out = model(batch)
        assert "loss" in out and all(v.dim() == 0 and torch.isfinite(v) for v in out.values()), out
        opt.zero_grad()
        if step == 0:  # every named loss term reaches the parameters
            for key, value in out.items():
                if key != "loss":
                    grads = torch.autograd.grad(value, list(model.parameters()), retain_graph=True,
                                                allow_unused=True) if value.requires_grad else ()
                    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: {key} has no gradient"
        out["loss"].backward()
        if step == 0:
            for pname, p in model.named_parameters():
                assert p.grad is not None, f"{name}: {pname} received no gradient"
                assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        opt.step()
        history.append(float(out["loss"].detach()))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.85 * first, f"{name}: loss did not go down on one batch: {history}"


@pytest.mark.parametrize("name", ["vilt-tiny", "align-tiny", "mural-tiny", "vinvl-tiny", "e2evlp-tiny", "kdvlp-tiny"])
def test_scores_and_embeddings(name):
    model = models.create(name).eval()
    batch = make_batch(b=3)
    regions = {k: batch[k] for k in ("boxes", "box_valid", "box_text", "box_text_mask")} if name == "vinvl-tiny" else {}
    with torch.no_grad():
        score = model.score(batch["image"], batch["text"], batch["text_mask"], **regions)
        joint = model.joint_embedding(batch["image"], batch["text"], batch["text_mask"], **regions)
    assert score.shape == (3,) and torch.isfinite(score).all()
    assert joint.shape == (3, model.joint_dim)
    if hasattr(model, "encode_image"):
        with torch.no_grad():
            u, v = model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["text_mask"])
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(score, (u * v).sum(-1))


def test_vilt_b32_parameter_count():
    with torch.device("meta"):
        model = models.create("vilt-b32")
    # the paper's 87.4M = the ViT-B/32 Transformer + patch projection
    core = sum(p.numel() for p in model.encoder.blocks.layers.parameters()) + \
        sum(p.numel() for p in model.patch_embed.parameters())
    assert core == 87_414_528
    assert abs(model.backbone_parameter_count() / 87.4e6 - 1) < 0.02


@pytest.mark.parametrize("name", ["align-base", "mural-base", "vinvl-base", "e2evlp-base", "kdvlp-base"])
def test_base_configs_build_on_meta(name):
    with torch.device("meta"):
        model = models.create(name)
    n = sum(p.numel() for p in model.parameters())
    assert 100e6 < n < 400e6


def test_efficientnet_b0_matches_the_reference_parameter_count():
    with torch.device("meta"):
        net = EfficientNet(1.0, 1.0)
    assert sum(p.numel() for p in net.parameters()) == 4_007_548  # timm efficientnet_b0 minus its classifier
    x = EfficientNet(0.25, 0.34, out_dim=16)(torch.randn(2, 3, 64, 64))
    assert x.shape == (2, 16, 2, 2)


def test_missing_batch_keys_are_named():
    batch = make_batch(b=2)
    cases = [("e2evlp-tiny", "boxes"), ("mural-tiny", "src_text"), ("kdvlp-tiny", "box_text"),
             ("vinvl-tiny", "boxes")]
    for name, key in cases:
        with pytest.raises(KeyError, match=key):
            models.create(name)({k: v for k, v in batch.items() if k != key})
    with pytest.raises(KeyError, match="region_features"):
        models.create("vinvl-tiny", region_source="batch", feature_dim=8)(batch)
    with pytest.raises(KeyError, match="word_ids"):
        models.create("vilt-tiny", whole_word_masking=True)(batch)


def test_e2evlp_generation_cache_equals_recomputation():
    model = models.create("e2evlp-tiny").eval()
    image = make_batch(b=3)["image"]
    cached = model.generate(image, max_new_tokens=6)
    full = model.generate(image, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, full) and cached.shape[0] == 3
    assert model.generate(image, max_new_tokens=4, strategy="beam", beam_size=2).shape[0] == 3


# ---------------------------------------------------------------- blocks
def test_single_stream_encoder_packing_equals_running_each_row_unpadded():
    enc = SingleStreamEncoder(32, 2, 2).eval()
    a, b = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    va = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    vb = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    with torch.no_grad():
        (oa, ob), pooled = enc([(a, va), (b, vb)])
        for i in range(2):
            ref = enc.blocks(torch.cat([a[i][va[i]], b[i][vb[i]]])[None])[0]
            na = int(va[i].sum())
            torch.testing.assert_close(oa[i][va[i]], ref[:na], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ob[i][vb[i]], ref[na:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled[i], enc.pooler(ref[0]), atol=1e-5, rtol=1e-5)


def test_whole_word_masking_masks_words_together():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(T.NUM_SPECIAL, 50, (64, 12), generator=g)
    text[:, 0], text[:, -1] = T.BOS, T.EOS
    mask = torch.ones_like(text, dtype=torch.bool)
    word_ids = torch.arange(12).div(3, rounding_mode="floor").expand(64, -1)
    _, labels = mask_whole_words(text, mask, word_ids, 50, prob=0.3, generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    inner = chosen[:, 3:9].view(64, 2, 3)  # words 1 and 2 hold only ordinary tokens
    assert (inner.all(-1) | ~inner.any(-1)).all()  # all or none of each word
    assert chosen.any(1).all()  # every row gets a word
    assert 0.15 < chosen[:, 3:9].float().mean() < 0.5


def test_word_boundaries_from_the_byte_bpe_tokenizer():
    tok = ByteBPETokenizer.train(["a seven left of a three"] * 4, vocab_size=300)
    ids, _ = tok.batch(["a seven left of a three"], 16)
    words = word_ids_from_starts(ids, word_start_table(tok, 300))[0]
    n_tokens = len(tok.encode("a seven left of a three"))
    content = words[1:1 + n_tokens]
    assert content.unique().numel() == 6  # six words, whatever the sub-word split
    assert (content.diff() >= 0).all()


def test_roi_align_cells_and_masked_mean_on_a_known_map():
    fmap = torch.arange(64.0).view(1, 1, 8, 8)
    box = torch.tensor([[[5 / 8, 3 / 8, 2 / 8, 2 / 8]]])  # rows 2-3, cols 4-5
    torch.testing.assert_close(roi_align(fmap, box, 2)[0, 0, 0], fmap[0, 0, 2:4, 4:6])
    cells = cells_in_boxes(box, (8, 8))[0, 0].view(8, 8)
    assert cells.nonzero().tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]
    tiny = cells_in_boxes(torch.tensor([[[0.3, 0.3, 0.01, 0.01]]]), (4, 4))[0, 0]
    assert tiny.nonzero().flatten().tolist() == [5]  # no centre inside: the cell under the box centre
    tokens = fmap.flatten(2).transpose(1, 2)
    assert float(masked_mean(tokens, cells.view(1, 64))) == pytest.approx((20 + 21 + 28 + 29) / 4)


def test_mrc_kl_equals_the_kl_divergence():
    head = MaskedRegionKL(8, 5)
    h = torch.randn(2, 3, 8)
    target = torch.softmax(torch.randn(2, 3, 5), -1)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    logq = torch.log_softmax(head(h[mask]), -1)
    expected = (target[mask] * (target[mask].log() - logq)).sum(-1).mean()
    torch.testing.assert_close(head.loss(h, target, mask), expected)


def test_phrase_spans_and_tags_from_phrases():
    from vlcore.models.kdvlp import find_phrase_spans
    from vlcore.models.vinvl import tags_from_phrases
    text = torch.tensor([[1, 10, 11, 12, 13, 14, 2]])
    box_text = torch.tensor([[[1, 10, 11, 2], [1, 99, 14, 2], [1, 50, 51, 2]]])  # exact, suffix only, absent
    spans = find_phrase_spans(text, text != 0, box_text, box_text != 0)
    assert spans.tolist() == [[[1, 3], [5, 6], [-1, -1]]]
    valid = torch.tensor([[True, False, True]])
    tags, mask = tags_from_phrases(box_text, box_text != 0, valid, max_len=8)
    assert tags[mask].tolist() == [10, 11, 50, 51]
