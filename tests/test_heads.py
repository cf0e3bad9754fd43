"""Downstream heads: exact metric/target values on crafted inputs, each head learning a tiny synthetic task above
chance in a few steps, and the heads wired to real tiny models."""

import pytest
import torch
import vlcore.models as models

from vlcore import tokens as T
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.heads import (
    BoxRegressionHead,
    CaptionHead,
    EntailmentHead,
    MultipleChoiceHead,
    NLVR2Head,
    RegionScoringHead,
    VQAHead,
    ZeroShotClassifier,
    box_accuracy,
    generate_captions,
    rerank_with_itm,
    retrieval_metrics,
    similarity_matrix,
    vqa_accuracy,
    vqa_soft_targets,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls: one thread avoids oversubscription on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _train(module, loss_fn, steps=60, lr=1e-2):
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _clusters(n, classes, dim, noise=0.5, generator=None):
    centres = torch.randn(classes, dim, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    return centres[y] + noise * torch.randn(n, dim, generator=generator), y, centres


# ---------------------------------------------------------------- VQA scores and retrieval metrics (exact values)
def test_vqa_soft_targets_are_the_official_leave_one_out_scores():
    # answer 0 given by 1 annotator, 1 by 2, 2 by 3, 3 by 4 (10 annotators): 0.3, 0.6, 0.9, 1.0
    answers = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3, 3, 3]])
    torch.testing.assert_close(vqa_soft_targets(answers, 5), torch.tensor([[0.3, 0.6, 0.9, 1.0, 0.0]]))
    torch.testing.assert_close(vqa_soft_targets(torch.tensor([2]), 4), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    # missing annotators (negative) are left out: 3 annotators all saying 1 -> each leave-one-out subset has
    # 2 matches -> 2/3
    torch.testing.assert_close(vqa_soft_targets(torch.tensor([[1, 1, 1, -1]]), 2), torch.tensor([[0.0, 2 / 3]]))
    assert float(vqa_accuracy(torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]]), vqa_soft_targets(answers, 5))) == \
        pytest.approx(0.6)


def test_retrieval_metrics_on_a_hand_computed_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.3],
                        [0.2, 0.5, 0.7, 0.1],
                        [0.4, 0.6, 0.3, 0.2]])
    text_to_image = torch.tensor([0, 0, 1, 2])
    # text->image ranks: t0 0, t1 2 (0.1 < 0.5, 0.6), t2 1, t3 1 ; image->text best ranks: i0 0, i1 0, i2 3
    m = retrieval_metrics(sim, text_to_image, ks=(1, 2, 5))
    assert m["t2i_r1"] == pytest.approx(25.0) and m["t2i_r2"] == pytest.approx(75.0) and m["t2i_r5"] == 100.0
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r2"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["rsum"] == pytest.approx(25 + 75 + 100 + 3 * 200 / 3 + 100 - 200 / 3)
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(sim, torch.tensor([0, 1]))


def test_itm_reranking_fixes_the_top_k_and_keeps_the_rest_below():
    g = torch.Generator().manual_seed(0)
    n = 12
    images, texts = torch.arange(n).float()[:, None], torch.arange(n)[:, None]
    mask = torch.ones(n, 1, dtype=torch.bool)
    sim = torch.randn(n, n, generator=g)
    sim += 1.5 * torch.eye(n)  # the positive usually, not always, in the top 4
    score_fn = lambda im, tx, m: (im[:, 0].long() == tx[:, 0]).float() * 10  # a perfect ITM
    before = retrieval_metrics(sim, torch.arange(n), ks=(1, 4))
    s_i2t, s_t2i = rerank_with_itm(sim, score_fn, images, texts, mask, k=4)
    after = retrieval_metrics(s_i2t, torch.arange(n), s_t2i, ks=(1, 4))
    # with a perfect ITM, R@1 after re-ranking = R@4 before; R@4 is unchanged
    assert after["i2t_r1"] == pytest.approx(before["i2t_r4"]) and after["t2i_r1"] == pytest.approx(before["t2i_r4"])
    assert after["i2t_r4"] == pytest.approx(before["i2t_r4"])
    top = sim.topk(4, dim=1).indices
    outside = torch.ones(n, n, dtype=torch.bool).scatter(1, top, False)
    assert s_i2t[outside].max() < s_i2t.gather(1, top).min()


# ---------------------------------------------------------------- each head learns a synthetic task
def test_vqa_head_learns_soft_targets():
    g = torch.Generator().manual_seed(1)
    x, y, _ = _clusters(64, 6, 16, generator=g)
    # 10 annotators: 7 say the true answer, 3 a random one
    answers = torch.where(torch.rand(64, 10, generator=g) < 0.7, y[:, None], torch.randint(0, 6, (64, 10), generator=g))
    targets = vqa_soft_targets(answers, 6)
    head = VQAHead(16, 6)
    assert float(vqa_accuracy(head(x), targets)) < 0.6
    _train(head, lambda: head.loss(head(x), targets), steps=40)
    assert float(vqa_accuracy(head(x), targets)) > 0.8  # chance ~ 1/6


def test_entailment_head_learns_three_classes():
    x, y, _ = _clusters(60, 3, 12, generator=torch.Generator().manual_seed(2))
    head = EntailmentHead(12)
    _train(head, lambda: head.loss(head(x), y), steps=40)
    assert (head(x).argmax(-1) == y).float().mean() > 0.8  # chance 1/3


def test_nlvr2_head_learns_a_relation_between_two_images():
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(80, 8, generator=g), torch.randn(80, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = (left @ w > right @ w).long()  # "the left image has more of w than the right one"
    head = NLVR2Head(8)
    _train(head, lambda: head.loss(head(left, right), y), steps=60)
    assert (head(left, right).argmax(-1) == y).float().mean() > 0.8  # chance 1/2


def test_multiple_choice_head_scores_options():
    g = torch.Generator().manual_seed(4)
    b, k, d = 40, 4, 12
    joint = torch.randn(b, k, d, generator=g)
    answer = torch.randint(0, k, (b,), generator=g)
    joint[torch.arange(b), answer, 0] += 3.0  # the right option carries a marker
    head = MultipleChoiceHead(d)
    _train(head, lambda: head.loss(head(joint), answer), steps=40)
    assert (head(joint).argmax(-1) == answer).float().mean() > 0.8  # chance 1/4


def test_vcr_option_inputs_layout():
    q = torch.tensor([[T.BOS, 10, 11, T.EOS, T.PAD]])
    qm = q != T.PAD
    opts = torch.tensor([[[T.BOS, 20, T.EOS, T.PAD], [T.BOS, 30, 31, T.EOS]]])
    seq, mask = MultipleChoiceHead.option_inputs(q, qm, opts, opts != T.PAD)
    assert seq.tolist() == [[T.BOS, 10, 11, T.EOS, 20, T.EOS, T.PAD, T.PAD],
                            [T.BOS, 10, 11, T.EOS, 30, 31, T.EOS, T.PAD]]
    assert mask.sum(1).tolist() == [6, 7]


def test_box_regression_head_learns_boxes():
    g = torch.Generator().manual_seed(5)
    x, y, _ = _clusters(48, 4, 16, generator=g)
    boxes = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.75, 0.25, 0.3, 0.3], [0.25, 0.75, 0.3, 0.3],
                          [0.75, 0.75, 0.3, 0.3]])[y]
    head = BoxRegressionHead(16)
    _train(head, lambda: head.loss(head(x), boxes), steps=80)
    assert float(box_accuracy(head(x), boxes)) > 0.8  # a box in the wrong quadrant has IoU 0


def test_region_scoring_head_picks_the_referred_region():
    g = torch.Generator().manual_seed(6)
    b, r, d = 48, 5, 12
    regions = torch.randn(b, r, d, generator=g)
    target = torch.randint(0, r, (b,), generator=g)
    query = regions[torch.arange(b), target] + 0.3 * torch.randn(b, d, generator=g)
    valid = torch.ones(b, r, dtype=torch.bool)
    valid[:, -1] = target == r - 1  # invalid regions are never chosen
    head = RegionScoringHead(d)
    _train(head, lambda: head.loss(head(regions, query, valid), target), steps=60)
    scores = head(regions, query, valid)
    assert torch.isinf(scores[~valid]).all()
    assert (scores.argmax(-1) == target).float().mean() > 0.7  # chance ~ 1/4


def test_caption_head_learns_to_caption_and_generates_with_cache():
    g = torch.Generator().manual_seed(7)
    n, classes = 24, 4
    y = torch.arange(n) % classes
    context = torch.randn(classes, 3, 8, generator=g)[y] + 0.1 * torch.randn(n, 3, 8, generator=g)
    first = T.NUM_SPECIAL + y
    text = torch.stack([torch.full_like(y, T.BOS), first, first + classes, torch.full_like(y, T.EOS)], 1)
    head = CaptionHead(8, vocab_size=T.NUM_SPECIAL + 2 * classes, dim=32, depth=1, heads=2, max_len=8)
    _train(head, lambda: head.loss(context, text, torch.ones_like(text, dtype=torch.bool)), steps=60)
    head.eval()
    out = head.generate(context, max_new_tokens=5)
    assert (out[:, :3] == text[:, 1:]).all(1).float().mean() > 0.8  # chance (1/8)^2
    assert out.shape[1] == 3  # stops at EOS


def test_zero_shot_classifier_averages_templates_and_classifies():
    g = torch.Generator().manual_seed(8)
    words = ["a", "photo", "of", "an", "image", "cat", "dog", "fish"]
    table = torch.randn(T.NUM_SPECIAL + len(words), 16, generator=g)

    class Dual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode_text(self, ids, mask):
            return torch.nn.functional.normalize((table[ids] * mask[..., None]).sum(1), dim=-1)

        def encode_image(self, images):
            return torch.nn.functional.normalize(images, dim=-1)

    def tokenize(strings):
        ids = [[T.BOS] + [T.NUM_SPECIAL + words.index(w) for w in s.replace(".", "").split()] + [T.EOS]
               for s in strings]
        length = max(map(len, ids))
        out = torch.tensor([row + [T.PAD] * (length - len(row)) for row in ids])
        return out, out != T.PAD

    model, templates = Dual(), ("a photo of a {}.", "an image of a {}.")
    clf = ZeroShotClassifier.from_model(model, ["cat", "dog", "fish"], tokenize, templates)
    ids, mask = tokenize([t.format(c) for c in ["cat", "dog", "fish"] for t in templates])
    manual = torch.nn.functional.normalize(model.encode_text(ids, mask).view(3, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(clf.weights, manual)
    labels = torch.randint(0, 3, (30,), generator=g)
    images = manual[labels] + 0.05 * torch.randn(30, 16, generator=g)
    assert (clf.predict(model, images) == labels).all()


# ---------------------------------------------------------------- wiring to real tiny models
def _batch(b=4, t=10, vocab=1024, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(T.NUM_SPECIAL, vocab, (b, t), generator=g)
    text[:, 0] = T.BOS
    text[:, -1] = T.EOS
    text[1, 6:] = T.PAD
    text[1, 5] = T.EOS
    return torch.randn(b, 3, size, size, generator=g), text, text != T.PAD


@pytest.mark.parametrize("name", ["vilt-tiny", "align-tiny", "e2evlp-tiny", "kdvlp-tiny"])
def test_vqa_head_on_a_model_joint_embedding_backpropagates(name):
    model = models.create(name)
    image, text, mask = _batch()
    head = VQAHead(model.joint_dim, 5)
    loss = head.loss(head(model.joint_embedding(image, text, mask)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(x).all() for x in grads)


def test_similarity_matrix_uses_dual_embeddings_or_itm_scores():
    image, text, mask = _batch(b=3)
    align = models.create("align-tiny").eval()
    sim = similarity_matrix(align, image, text, mask, batch_size=2)
    torch.testing.assert_close(sim, align.encode_image(image) @ align.encode_text(text, mask).T)
    vilt = models.create("vilt-tiny").eval()
    sim = similarity_matrix(vilt, image, text, mask, batch_size=4)
    with torch.no_grad():
        direct = vilt.score(image[[2, 2, 2]], text, mask)
    torch.testing.assert_close(sim[2], direct, atol=1e-5, rtol=1e-5)


def test_zero_shot_and_captioning_with_real_models_and_tokenizer():
    tok = ByteBPETokenizer()
    tokenize = lambda xs: tok.batch(xs, 32)
    align = models.create("align-tiny", vocab_size=tok.vocab_size).eval()
    image = _batch(b=2)[0]
    clf = ZeroShotClassifier.from_model(align, [str(d) for d in range(10)], tokenize)
    assert clf.weights.shape == (10, 64) and clf.predict(align, image).shape == (2,)
    e2e = models.create("e2evlp-tiny", vocab_size=tok.vocab_size).eval()
    captions = generate_captions(e2e, image, tok, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    head = CaptionHead(64, tok.vocab_size, dim=32, depth=1, heads=2)
    assert len(generate_captions(align, image, tok, head=head, max_new_tokens=3)) == 2
    with pytest.raises(TypeError, match="generate"):
        generate_captions(align, image, tok)
