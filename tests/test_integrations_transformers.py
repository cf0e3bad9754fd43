"""transformers' BertModel in vlcore's TextEncoder (post-norm switch): last_hidden_state and gradients equal
BERT's at the valid positions of right-padded text (fp32). Real transformers, random weights, tiny shapes."""

import pytest
import torch

pytest.importorskip("vlcore.integrations.transformers", exc_type=ImportError,
                    reason="transformers not installed (pip install -e '.[interop]')")
import transformers  # noqa: E402

from vlcore.integrations import transformers as vtf  # noqa: E402
from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402


def _tiny_bert(**kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **kw)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases random too, so a swapped tensor shows
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bert


def test_bert_equals_transformers_forward_and_gradients():
    bert = _tiny_bert()
    ours = vtf.text_encoder_from_bert(bert).eval()
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    valid = mask.bool()
    theirs_out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ours_out = ours(ids, valid)
    torch.testing.assert_close(ours_out[valid], theirs_out[valid], rtol=1e-5, atol=1e-5)

    w = torch.randn_like(theirs_out)
    (theirs_out[valid] * w[valid]).sum().backward()
    (ours_out[valid] * w[valid]).sum().backward()
    theirs_grad = bert.encoder.layer[0].intermediate.dense.weight.grad
    ours_grad = ours.blocks.layers[0].mlp.fc1.weight.grad
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)
    q = bert.encoder.layer[1].attention.self.query.weight.grad
    torch.testing.assert_close(ours.blocks.layers[1].attn.qkv.weight.grad[:32], q, rtol=1e-4, atol=1e-5)


def test_the_default_text_encoder_stays_pre_norm():
    from vlcore.nn.text import TextEncoder

    enc = TextEncoder(50, 32, 1, 2, 16)
    assert not enc.blocks.layers[0].post_norm and isinstance(enc.blocks.norm, torch.nn.LayerNorm)


def test_an_unmappable_bert_key_is_named():
    bert = _tiny_bert()
    ours = vtf.text_encoder_from_bert(bert)
    state = dict(bert.state_dict())
    state["encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 32)
    with pytest.raises(UnmappableKeyError, match="distance_embedding"):
        vtf.bert_state_dict(state, ours)


def test_relative_position_bert_is_refused_by_name():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        vtf.text_encoder_from_bert(_tiny_bert(position_embedding_type="relative_key"))


# ---------------------------------------------------------------- CLIPModel / SiglipModel <-> vlcore ALIGN

EOS, PAD = 49, 0


def _randomise(model, seed=0):
    """Every parameter perturbed (LayerNorms, biases, probe ...) so that a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("logit_"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _towers(**common):
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=9, **common)
    vision = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, **common)
    return text, vision


def _tiny_clip():
    torch.manual_seed(0)
    text, vision = _towers(hidden_act="quick_gelu")
    config = transformers.CLIPConfig(text_config=dict(text, eos_token_id=EOS), vision_config=vision, projection_dim=16)
    return _randomise(transformers.CLIPModel(config))


def _tiny_siglip():
    torch.manual_seed(0)
    text, vision = _towers(hidden_act="gelu_pytorch_tanh")
    text["hidden_size"] = text["projection_size"] = 48
    text["intermediate_size"] = 80
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    return _randomise(model)


def _texts():
    """BOS(1) ... EOS then padding; one text fills every position."""
    text = torch.tensor([[1, 5, 6, 7, EOS, PAD, PAD, PAD, PAD], [1, 3, 4, 8, 9, 11, 12, 13, EOS],
                         [1, 4, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])
    return text, text != PAD


def _assert_dual_equal(theirs, ours, text, mask, hf_mask):
    image = torch.randn(3, 3, 32, 32)
    out = theirs(input_ids=text, pixel_values=image, attention_mask=hf_mask, return_loss=True)
    torch.testing.assert_close(ours.encode_image(image), out.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode_text(text, mask), out.text_embeds, rtol=1e-5, atol=1e-5)
    loss = ours({"image": image, "text": text, "text_mask": mask})["loss"]
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    # every parameter's gradient, moved into transformers' keys by the same links as the weights
    out.loss.backward()
    loss.backward()
    grads = vtf.to_transformers_state_dict(ours, theirs, {n: p.grad for n, p in ours.named_parameters()})
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_clip_equals_transformers_forward_loss_and_every_gradient():
    theirs = _tiny_clip()
    ours = vtf.dual_encoder_from_clip(theirs).eval()
    assert ours.config.layout == "clip" and ours.config.act == "quick_gelu"
    text, mask = _texts()
    _assert_dual_equal(theirs, ours, text, mask, mask.long())


@pytest.mark.parametrize("padded", [False, True])
def test_siglip_equals_transformers_forward_loss_and_every_gradient(padded):
    """SigLIP's own use: text padded to the fixed length, no mask (all positions valid); and with a mask."""
    theirs = _tiny_siglip()
    ours = vtf.dual_encoder_from_siglip(theirs).eval()
    assert ours.config.contrastive == "siglip" and ours.image_pool is not None
    text, mask = _texts()
    if not padded:
        mask = torch.ones_like(mask)
    _assert_dual_equal(theirs, ours, text, mask, mask.long() if padded else None)


@pytest.mark.parametrize("make", [_tiny_clip, _tiny_siglip])
def test_dual_encoder_round_trip_and_fine_tuned_weights_back(make):
    theirs = make()
    from_peer = vtf.dual_encoder_from_clip if isinstance(theirs, transformers.CLIPModel) \
        else vtf.dual_encoder_from_siglip
    ours = from_peer(theirs).eval()
    original = theirs.state_dict()
    back = vtf.to_transformers_state_dict(ours, theirs)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    with torch.no_grad():  # as fine-tuning would
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.load_state_dict(vtf.to_transformers_state_dict(ours, theirs))
    text, mask = _texts()
    image = torch.randn(3, 3, 32, 32)
    out = theirs(input_ids=text, pixel_values=image, attention_mask=mask.long())
    torch.testing.assert_close(ours.encode_text(text, mask), out.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode_image(image), out.image_embeds, rtol=1e-5, atol=1e-5)


def test_an_unmappable_clip_key_is_named_and_the_paper_layout_refused():
    import vlcore.models as models

    theirs = _tiny_clip()
    ours = vtf.dual_encoder_from_clip(theirs)
    state = dict(theirs.state_dict())
    state["vision_model.encoder.layers.1.layer_scale.gamma"] = torch.ones(48)
    with pytest.raises(UnmappableKeyError, match=r"vision_model\.encoder\.layers\.1\.layer_scale\.gamma"):
        vtf.dual_encoder_state_dict(state, ours)
    state = dict(theirs.state_dict())
    del state["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(UnmappableKeyError, match=r"v_proj\.bias"):
        vtf.dual_encoder_state_dict(state, ours)
    with pytest.raises(ValueError, match="layout='clip' or 'siglip'"):
        vtf.dual_encoder_state_dict(theirs, models.create("align-tiny", image_tower="vit"))


# ---------------------------------------------------------------------------------------------- apply(model)

def _patched_equals_unpatched(model, run, monkeypatch, *, valid=None):
    """Outputs (at ``valid`` positions) and every parameter gradient of ``model`` before and after ``apply``."""
    import copy

    import vlcore

    patched = copy.deepcopy(model)
    report = vtf.apply(patched)
    calls = []
    real = vlcore.attention
    monkeypatch.setattr(vlcore, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    y0, y1 = run(model), run(patched)
    if valid is not None:
        y0, y1 = y0[valid], y1[valid]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y0)
    (y0 * w).sum().backward()
    (y1 * w).sum().backward()
    for (name, p0), p1 in zip(model.named_parameters(), patched.parameters(), strict=True):
        if p0.grad is not None or p1.grad is not None:
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    return report, calls, patched


def test_apply_bert_passes_padding_as_lengths(monkeypatch):
    bert = _tiny_bert()
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    report, calls, _ = _patched_equals_unpatched(
        bert, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, monkeypatch, valid=mask.bool())
    assert report.replaced == {"BertSelfAttention": ["encoder.layer.0.attention.self",
                                                     "encoder.layer.1.attention.self"]}
    assert len(calls) == 2 and all(kw["kv_lens"].tolist() == [9, 6, 2] and not kw["causal"] for kw in calls)


def test_apply_bert_left_padding_falls_back_to_transformers(monkeypatch):
    bert = _tiny_bert()
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: not expressible as lengths
    _, calls, _ = _patched_equals_unpatched(
        bert, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, monkeypatch, valid=mask.bool())
    assert calls == []


@pytest.mark.parametrize("make", [_tiny_clip, _tiny_siglip])
def test_apply_clip_and_siglip_attention(make, monkeypatch):
    model = make()
    text, mask = _texts()
    image = torch.randn(3, 3, 32, 32)

    def run(m):
        out = m(input_ids=text, pixel_values=image, attention_mask=mask.long(), return_loss=True)
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten(), out.loss.reshape(1)])

    import vlcore

    losses = []
    real_loss = vlcore.contrastive_loss
    monkeypatch.setattr(vlcore, "contrastive_loss", lambda *a, **kw: losses.append(kw["kind"]) or real_loss(*a, **kw))
    report, calls, patched = _patched_equals_unpatched(model, run, monkeypatch)
    clip = isinstance(model, transformers.CLIPModel)
    assert report.count == 5 and report.replaced[f"{type(model).__name__} (loss)"] == ["<model>"]
    assert losses == ["infonce" if clip else "siglip"]  # the patched loss ran on vlcore's op
    # text: causal for CLIP, padding as lengths in both; vision: bidirectional, no padding
    text_calls = [kw for kw in calls if kw["kv_lens"] is not None]
    assert len(calls) == 4 and len(text_calls) == 2
    assert all(kw["causal"] == clip and kw["kv_lens"].tolist() == [5, 9, 3] for kw in text_calls)
    if not clip:
        assert list(report.skipped) == ["vision_model.head.attention"]


def test_patched_bert_compiles_in_one_graph():
    bert = _tiny_bert()
    vtf.apply(bert)
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    compiled = torch.compile(lambda i, m: bert(input_ids=i, attention_mask=m).last_hidden_state, fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(ids, mask), bert(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_patched_clip_with_its_loss_compiles_in_one_graph():
    model = _tiny_clip()
    vtf.apply(model)
    text, mask = _texts()
    image = torch.randn(3, 3, 32, 32)

    def run(i, t, m):
        out = model(input_ids=t, pixel_values=i, attention_mask=m, return_loss=True)
        return out.loss, out.text_embeds

    compiled = torch.compile(run, fullgraph=True, backend="eager")
    for a, b in zip(compiled(image, text, mask.long()), run(image, text, mask.long()), strict=True):
        torch.testing.assert_close(a, b)
