"""The four core models (CoCa, SimVLM, SOHO, X-VLM): registry, tiny configs train on CPU, hand-computed checks of
each objective on crafted mini-batches, KV-cache decoding, paper parameter counts."""

import pytest
import torch
import torch.nn.functional as F

import vlcore
from vlcore import dispatch, models
from vlcore import tokens as T
from vlcore.nn import generation
from vlcore.nn.objectives import IGNORE, token_cross_entropy
from vlcore.nn.text import lengths

TINY = ["coca-tiny", "simvlm-tiny", "soho-tiny", "xvlm-tiny"]
SIMVLM_DEC = "simvlm-tiny/decoder_only"  # the same config with one PrefixLM-masked stack
SIMVLM = ["simvlm-tiny", SIMVLM_DEC]
NAMES = ["coca", "coca-base", "coca-large", "coca-tiny", "simvlm-base", "simvlm-huge", "simvlm-large", "simvlm-tiny",
         "soho-base", "soho-tiny", "xvlm-base", "xvlm-tiny"]


def texts(n, t, vocab, g, min_len=3):
    text = torch.randint(T.NUM_SPECIAL, vocab, (n, t), generator=g)
    lens = torch.randint(min_len, t + 1, (n,), generator=g)
    lens[0] = t
    ar = torch.arange(t)
    mask = ar < lens[:, None]
    text[:, 0] = T.BOS
    text[ar == (lens - 1)[:, None]] = T.EOS
    text[~mask] = T.PAD
    return text, mask


def make_batch(config, b=4, t=10, r=3, tr=5, seed=0):
    """A contract batch: image, BOS..EOS texts, boxes with phrases and labels, a text-only batch."""
    g = torch.Generator().manual_seed(seed)
    text, mask = texts(b, t, config.vocab_size, g)
    box_text, box_mask = texts(b * r, tr, config.vocab_size, g)
    valid = torch.ones(b, r, dtype=torch.bool)
    valid[1, 2] = False
    lm_text, lm_mask = texts(b + 1, t + 2, config.vocab_size, g)
    return {"image": torch.randn(b, 3, config.image_size, config.image_size, generator=g), "text": text,
            "text_mask": mask, "boxes": torch.rand(b, r, 4, generator=g) * 0.5 + 0.25,
            "box_text": box_text.view(b, r, tr), "box_text_mask": box_mask.view(b, r, tr), "box_valid": valid,
            "box_labels": torch.randint(0, 10, (b, r), generator=g), "lm_text": lm_text, "lm_text_mask": lm_mask}


@pytest.fixture(scope="module")
def tiny():
    """One model per tiny config (built once; tests that train deep-copy it)."""
    torch.manual_seed(0)
    built = {name: models.create(name) for name in TINY}
    built[SIMVLM_DEC] = models.create("simvlm-tiny", decoder_only=True)
    return built



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's spinning
    multiplies the run time; restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---- registry and sizes --------------------------------------------------------------------------------------

def test_registry_lists_every_config():
    assert set(NAMES) <= set(models.list_models())
    for name in NAMES:
        config = models.get_config(name)
        assert {"vocab_size", "image_size", "max_text_len"} <= set(vars(config))


def count_on_meta(name):
    with torch.device("meta"):
        model = models.create(name)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,paper,tolerance", [("coca-base", 383e6, 0.02), ("xvlm-base", 216e6, 0.03)])
def test_paper_parameter_counts(name, paper, tolerance):
    n = count_on_meta(name)
    assert abs(n - paper) <= tolerance * paper, f"{name}: {n / 1e6:.1f}M parameters, paper {paper / 1e6:.0f}M"


def test_coca_base_is_the_paper_architecture():
    config = models.get_config("coca-base")
    assert (config.vocab_size, config.image_size, config.patch_size) == (64000, 288, 18)
    assert (config.image_size // config.patch_size) ** 2 == 256 == config.caption_queries
    assert (config.caption_weight, config.contrastive_weight) == (2.0, 1.0)
    with torch.device("meta"):
        model = models.create("coca-base")
    layer = model.multimodal.layers[0]
    assert layer.cross and layer.mlp is not None and not hasattr(layer, "mlp2")
    assert sum(p.numel() for p in model.vision.parameters()) == pytest.approx(86e6, rel=0.01)


def test_overrides_from_the_cli():
    model = models.create("coca-tiny", vocab_size=300, image_size=32, max_text_len=12)
    out = model(make_batch(model.config, b=2, t=12))
    assert torch.isfinite(out["loss"])
    with pytest.raises(TypeError, match="unknown config fields"):
        models.create("coca-tiny", width=3)


# ---- every tiny model trains ---------------------------------------------------------------------------------

EXPECTED_LOSSES = {
    "coca-tiny": {"contrastive", "caption"},
    "simvlm-tiny": {"prefix_lm", "prefix_lm_text"},
    SIMVLM_DEC: {"prefix_lm", "prefix_lm_text"},
    "soho-tiny": {"mlm", "mvm", "itm"},
    "xvlm-tiny": {"itc_image", "itm_image", "mlm", "itc_object", "itm_object", "box_l1", "box_giou"},
}


# the last layer's 2-D table only biases image-token queries, whose last-layer outputs no loss reads
NO_GRADIENT_BY_DESIGN = {SIMVLM_DEC: {"stack.layers.3.attn.rel_pos_table"}}


@pytest.mark.parametrize("name", TINY + [SIMVLM_DEC])
def test_forward_backward_every_parameter_gets_gradient(tiny, name):
    model = tiny[name]
    model.train()
    model.zero_grad()
    out = model(make_batch(model.config))
    assert set(out) == EXPECTED_LOSSES[name] | {"loss"}
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{name}: {key} = {value}"
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if (p.grad is None or not bool(p.grad.abs().sum() > 0))
               and n not in NO_GRADIENT_BY_DESIGN.get(name, ())]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_overfit_one_batch(tiny, name):
    torch.manual_seed(0)
    model = models.create(name)
    batch = make_batch(model.config, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # the same masks, prefixes and negatives every step
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < 0.6 * losses[0], f"{name}: {losses}"


@pytest.mark.parametrize("name", ["coca-tiny", "xvlm-tiny"])
def test_activation_checkpointing_changes_nothing(name):
    torch.manual_seed(0)
    plain = models.create(name)
    ckpt = models.create(name, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch(plain.config, b=3)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        out = model(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_text_mask_must_be_a_prefix(tiny, name):
    batch = make_batch(tiny[name].config)
    batch["text_mask"] = batch["text_mask"].clone()
    batch["text_mask"][2, 1] = False  # a hole: lengths taken from the mask would be silently wrong
    with pytest.raises(ValueError, match="prefix"):
        tiny[name](batch)


def test_wrong_image_size_is_a_clear_error(tiny):
    model = tiny["coca-tiny"]
    batch = make_batch(model.config)
    batch["image"] = batch["image"][:, :, :32, :32]
    with pytest.raises(ValueError, match="image"):
        model(batch)


@pytest.mark.parametrize("name", TINY)
def test_missing_key_is_named(tiny, name):
    batch = make_batch(tiny[name].config)
    del batch["text_mask"]
    with pytest.raises(KeyError, match="text_mask"):
        tiny[name](batch)


# ---- SimVLM: PrefixLM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SIMVLM)
def test_simvlm_prefix_lm_targets_are_the_suffix_only(tiny, name):
    model = tiny[name].eval()
    batch = make_batch(model.config, b=3, t=8)
    text, mask = batch["text"], batch["text_mask"]
    lens = lengths(mask)
    p = torch.tensor([1, 3, int(lens[2]) - 1])
    logits, targets = model.prefix_lm(batch["image"], text, mask, p)
    assert int((targets != IGNORE).sum()) == int((lens - p).sum())
    for b in range(3):
        n = int(lens[b] - p[b])
        assert targets[b, :n].tolist() == text[b, p[b]:lens[b]].tolist()
        assert (targets[b, n:] == IGNORE).all()


@pytest.mark.parametrize("name", SIMVLM)
def test_simvlm_padded_batch_loss_equals_per_example_sums(tiny, name):
    """Mean over suffix tokens of the batch == (sum of each example's own unpadded suffix NLL) / token count."""
    model = tiny[name].eval()
    batch = make_batch(model.config, b=3, t=9)
    text, mask, image = batch["text"], batch["text_mask"], batch["image"]
    lens = lengths(mask)
    p = torch.tensor([2, 1, 4])
    with torch.no_grad():
        logits, targets = model.prefix_lm(image, text, mask, p)
        batched = token_cross_entropy(logits, targets)
        total = 0.0
        for b in range(3):
            L = int(lens[b])
            lg, tg = model.prefix_lm(image[b:b + 1], text[b:b + 1, :L], mask[b:b + 1, :L], p[b:b + 1])
            logp = torch.log_softmax(lg[0].double(), -1)
            assert tg[0].tolist() == text[b, p[b]:L].tolist()  # no padding in a single example
            total -= logp.gather(1, tg[0, :, None]).sum()
    torch.testing.assert_close(batched.double(), total / (lens - p).sum(), rtol=1e-5, atol=1e-6)


def test_simvlm_prefix_never_shorter_than_the_image():
    from vlcore.models.simvlm import sample_prefix_lens
    lens = torch.tensor([2, 3, 7] * 400)
    p = sample_prefix_lens(lens, torch.Generator().manual_seed(0))
    assert ((p >= 1) & (p <= lens - 1)).all()
    assert set(p[lens == 7].tolist()) == set(range(1, 7))  # every split point occurs


@pytest.mark.parametrize("name", SIMVLM)
def test_simvlm_suffix_loss_ignores_prefix_tokens_targets(tiny, name):
    """Changing a prefix token changes the conditioning but never adds a target: the count stays L - p."""
    model = tiny[name].eval()
    batch = make_batch(model.config, b=2, t=8)
    text = batch["text"].clone()
    p = torch.tensor([4, 2])
    _, t1 = model.prefix_lm(batch["image"], text, batch["text_mask"], p)
    text[:, 1] = 9
    _, t2 = model.prefix_lm(batch["image"], text, batch["text_mask"], p)
    assert torch.equal(t1, t2)


@pytest.mark.parametrize("name", SIMVLM)
def test_simvlm_text_only_batch_and_score(tiny, name):
    model = tiny[name].eval()
    batch = make_batch(model.config, b=2)
    out = model(batch)
    torch.testing.assert_close(out["loss"], out["prefix_lm"] + out["prefix_lm_text"])
    text, mask = batch["text"], batch["text_mask"]
    score = model.score(batch["image"], text, mask)
    logits, targets = model.prefix_lm(batch["image"], text, mask, torch.ones(2, dtype=torch.long))
    ref = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(score, ref.view(2, -1).sum(1))


# ---- CoCa ----------------------------------------------------------------------------------------------------

def test_coca_cls_is_the_last_token(tiny):
    model = tiny["coca-tiny"].eval()
    batch = make_batch(model.config, b=3, t=7)
    text, mask = batch["text"], batch["text_mask"]
    x, lens = model.text_with_cls(text, mask)
    assert x.shape[1] == text.shape[1] + 1
    for b in range(3):
        L = int(lens[b])
        assert text[b, L - 1] == T.EOS
        torch.testing.assert_close(x[b, L], model.cls_embed + model.pos_embed[L])
        torch.testing.assert_close(x[b, :L], model.token_embed(text[b, :L]) + model.pos_embed[:L])


def test_coca_text_embedding_comes_from_cls(tiny):
    model = tiny["coca-tiny"].eval()
    batch = make_batch(model.config, b=3, t=7)
    text, mask = batch["text"], batch["text_mask"]
    emb = model.encode_text(text, mask)
    x, lens = model.text_with_cls(text, mask)
    hidden = model.unimodal(x)
    ref = F.normalize(model.text_proj(model.text_norm(hidden[torch.arange(3), lens])), dim=-1)
    torch.testing.assert_close(emb, ref)
    other = text.clone()
    other[~mask] = 11  # padding after the [CLS] slot cannot matter (causal)
    torch.testing.assert_close(model.encode_text(other, mask), emb)
    with torch.no_grad():
        model.cls_embed.add_(1.0)
        moved = model.encode_text(text, mask)
        model.cls_embed.sub_(1.0)
    assert not torch.allclose(moved, emb)


def test_coca_losses_from_one_pass_match_hand_computation(tiny):
    model = tiny["coca-tiny"].eval()
    batch = make_batch(model.config, b=3, t=7)
    image, text, mask = batch["image"], batch["text"], batch["text_mask"]
    out = model(batch)
    con = vlcore.contrastive_loss(model.encode_image(image), model.encode_text(text, mask), model.contrastive.scale())
    torch.testing.assert_close(out["contrastive"], con)
    # captioning without any [CLS]: causal attention means the text positions never see it
    caption_tokens, _ = model.image_features(image)
    x = model.token_embed(text) + model.pos_embed[: text.shape[1]]
    logits = model.lm_head(model.multimodal(model.unimodal(x), caption_tokens))
    keep = mask[:, 1:]
    cap = F.cross_entropy(logits[:, :-1][keep], text[:, 1:][keep])
    torch.testing.assert_close(out["caption"], cap, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], con + 2 * cap, rtol=1e-5, atol=1e-5)
    assert torch.allclose(model.encode_image(image).norm(dim=-1), torch.ones(3))


# ---- generation with the KV cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["coca-tiny"] + SIMVLM)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_generation_equals_recomputation(tiny, name, strategy, monkeypatch):
    model = tiny[name].eval()
    with torch.no_grad():  # a less degenerate random model: spread the output distribution
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    try:
        logits = []
        real_step = generation.DecodingState.step

        def recording_step(self, new):
            out = real_step(self, new)
            logits.append(out)
            return out

        monkeypatch.setattr(generation.DecodingState, "step", recording_step)
        image = torch.randn(3, 3, model.config.image_size, model.config.image_size)
        prompt = torch.tensor([[9, 10]] * 3)
        cached = model.generate(image, prompt, max_new_tokens=6, strategy=strategy, beam_size=2)
        n = len(logits)
        full = model.generate(image, prompt, max_new_tokens=6, strategy=strategy, beam_size=2, use_cache=False)
        assert torch.equal(cached, full)
        assert len(logits) == 2 * n
        for a, b in zip(logits[:n], logits[n:]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.div_(3.0)


@pytest.mark.parametrize("name", ["coca-tiny"] + SIMVLM)
def test_generate_contract(tiny, name):
    model = tiny[name].eval()
    image = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    for strategy in ("greedy", "beam", "top_p"):
        out = model.generate(image, max_new_tokens=5, strategy=strategy, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.long and out.shape[0] == 2 and 1 <= out.shape[1] <= 5
        for row in out.tolist():  # PAD only after an EOS
            if T.PAD in row:
                assert T.EOS in row[: row.index(T.PAD)]
    with pytest.raises(ValueError, match="strategy"):
        model.generate(image, strategy="sample")


# ---- SOHO: MVM and ITM ---------------------------------------------------------------------------------------

def test_soho_mvm_masks_exactly_the_chosen_index(tiny):
    model = tiny["soho-tiny"].eval()
    n = model.num_visual
    indices = torch.tensor([[1, 1, 2, 3, 1, 2] + [3] * (n - 6), [5] * n, [0, 4, 0, 4, 7, 7] + [0] * (n - 6)])
    feats = torch.randn(3, n, model.config.dim)
    clean = model.visual_tokens(feats)
    seen = [set(), set(), set()]
    for seed in range(20):
        tokens, masked, targets = model.mvm_inputs(feats, indices, torch.Generator().manual_seed(seed))
        for b in range(3):
            chosen = indices[b][masked[b]].unique()
            assert chosen.numel() == 1
            assert torch.equal(masked[b], indices[b] == chosen)
            seen[b].add(int(chosen))
        torch.testing.assert_close(tokens[~masked], clean[~masked])
        mask_token = model.visual_norm(model.mask_embed + model.visual_pos + model.text_embed.segments.weight[1])
        torch.testing.assert_close(tokens[masked], mask_token.expand(3, -1, -1)[masked])
        assert torch.equal(targets, torch.where(masked, indices, torch.full_like(indices, IGNORE)))
    assert seen == [{1, 2, 3}, {5}, {0, 4, 7}]  # any present index can be drawn, nothing else


def test_soho_score_never_updates_the_dictionary(tiny):
    model = tiny["soho-tiny"].train()
    batch = make_batch(model.config, b=2)
    before = model.dictionary.codebook.clone(), int(model.dictionary.step)
    score = model.score(batch["image"], batch["text"], batch["text_mask"])
    assert score.shape == (2,) and torch.equal(model.dictionary.codebook, before[0])
    assert int(model.dictionary.step) == before[1]
    model(batch)
    assert int(model.dictionary.step) == before[1] + 1


# ---- X-VLM: concepts and boxes -------------------------------------------------------------------------------

def test_xvlm_box_patches_and_concept(tiny):
    model = tiny["xvlm-tiny"].eval()
    assert model.grid == (4, 4)
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.6, 0.6, 0.01, 0.01], [0.5, 0.5, 1.0, 1.0]])
    inside = model.box_patch_mask(boxes)
    assert inside[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert inside[1].nonzero().flatten().tolist() == [10]
    assert inside[2].all()
    patches = torch.randn(2, 16, model.vision.out_dim)
    image_index = torch.tensor([1, 0, 1])
    concept, lens = model.box_concept(patches, image_index, boxes)
    assert lens.tolist() == [5, 2, 17]
    torch.testing.assert_close(concept[0, 0], patches[1, [0, 1, 4, 5]].mean(0))
    torch.testing.assert_close(concept[0, 1:5], patches[1, [0, 1, 4, 5]])
    torch.testing.assert_close(concept[1, :2], torch.stack([patches[0, 10], patches[0, 10]]))
    full, full_lens = model.image_concept(patches)
    torch.testing.assert_close(concept[2], full[1])
    assert full_lens.tolist() == [17, 17]


def test_xvlm_without_boxes_and_region_level_names(tiny):
    model = tiny["xvlm-tiny"].train()
    batch = make_batch(model.config, b=3)
    image_only = {k: batch[k] for k in ("image", "text", "text_mask")}
    assert set(model(image_only)) == {"itc_image", "itm_image", "mlm", "loss"}
    del batch["box_labels"]
    assert {"itc_region", "itm_region", "box_l1", "box_giou"} <= set(model(batch))
    emb = model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["text_mask"])
    for e in emb:
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    box = model.predict_box(batch["image"], batch["text"], batch["text_mask"])
    assert box.shape == (3, 4) and bool(((box > 0) & (box < 1)).all())


# ---- X-VLM across ranks ----------------------------------------------------------------------------------------

def _xvlm_worker(rank, world):
    torch.manual_seed(0)  # the same weights on every rank
    model = models.create("xvlm-tiny")
    batch = make_batch(model.config, b=3 if rank == 0 else 2, seed=rank)
    if rank == 1:
        batch["box_valid"][:] = False  # no valid box here: this rank joins the collectives with empty tensors
    out = model(batch)
    out["loss"].backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return {k: float(v) for k, v in out.items()}, finite


@pytest.mark.distributed
def test_xvlm_two_ranks_unequal_batches_and_a_rank_without_boxes():
    from dist_utils import run_distributed

    (out0, finite0), (out1, finite1) = run_distributed(_xvlm_worker, 2)
    assert finite0 and finite1
    assert set(out0) == set(out1)
    for key in ("itc_image", "itc_object"):  # the contrastive losses are global-batch values, equal on every rank
        assert out0[key] == pytest.approx(out1[key], rel=1e-5)
    assert out1["box_l1"] == 0.0 and out0["box_l1"] > 0


# ---- the same model through the Triton attention kernel --------------------------------------------------------

@pytest.mark.skipif(not dispatch.triton_interpreter() or dispatch.triton_missing() is not None,
                    reason="runs the Triton kernel on CPU under TRITON_INTERPRET=1 (GPU numerics: the kernel tests)")
def test_simvlm_prefix_stack_through_the_triton_kernel_matches_reference(monkeypatch):
    """One PrefixLM stack = the op's prefix mask + padding + 2-D table + strided fused-QKV views in one call:
    the loss and every gradient agree with the reference backend (fp32, Triton interpreter)."""
    device = "cpu"
    torch.manual_seed(0)
    model = models.create("simvlm-tiny", decoder_only=True).to(device)
    batch = {k: v.to(device) for k, v in make_batch(model.config, b=2, t=8).items()}
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("VLCORE_BACKEND", f"attention={backend}")
        model.zero_grad()
        torch.manual_seed(1)
        out = model(batch)
        out["loss"].backward()
        results[backend] = (out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_tri[name], g, rtol=1e-3, atol=1e-5 * max(1.0, float(g.abs().max())),
                                   msg=lambda m, name=name: f"{name}: {m}")
