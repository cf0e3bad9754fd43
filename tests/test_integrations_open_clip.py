"""open_clip's CoCa in vlcore's CoCa (layout="open_clip"): image / text embeddings and captioning logits equal
open_clip's, and gradients too (fp32). Real open_clip, random weights, a tiny coca_ViT-B-32-shaped model."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (pip install -e '.[interop]')")
import vlcore.models as models  # noqa: E402
from open_clip.coca_model import CoCa  # noqa: E402

from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402
from vlcore.integrations.open_clip import coca_from_open_clip, coca_state_dict, to_open_clip_state_dict  # noqa: E402,E501

PAD = 0  # open_clip's pad id: its [CLS] mask is built from it


def _tiny_open_clip_coca():
    """coca_ViT-B-32's config (attentional pooler, text [CLS], two-block multimodal layers), shrunk."""
    torch.manual_seed(0)
    model = CoCa(embed_dim=16,
                 vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, attentional_pool=True,
                                 attn_pooler_heads=2, attn_pooler_queries=5, output_tokens=True, head_width=16),
                 text_cfg=dict(context_length=7, vocab_size=20, width=16, heads=2, layers=2, embed_cls=True,
                               output_tokens=True),
                 multimodal_cfg=dict(context_length=7, vocab_size=20, width=16, heads=2, layers=2,
                                     attn_pooler_heads=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random (some are left uninitialised by open_clip's constructor)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _vlcore_outputs(model, image, text):
    caption, image_emb = model.image_features(image)
    hidden, text_emb = model.unimodal_text(text, text != PAD)
    logits = model.lm_head(model.multimodal(hidden[:, :-1], caption))
    return image_emb, text_emb, logits


def test_coca_from_open_clip_equals_open_clip():
    theirs = _tiny_open_clip_coca()
    ours = coca_from_open_clip(theirs).eval()
    image = torch.randn(3, 3, 32, 32)
    # BOS ... EOS then padding; one text fills all positions (its [CLS] also sees itself in open_clip)
    text = torch.tensor([[1, 5, 6, 7, 2, PAD, PAD], [1, 3, 4, 8, 9, 11, 2], [1, 4, 2, PAD, PAD, PAD, PAD]])
    out = theirs(image, text)
    image_emb, text_emb, logits = _vlcore_outputs(ours, image, text)
    torch.testing.assert_close(image_emb, out["image_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_emb, out["text_features"], rtol=1e-5, atol=1e-5)
    positions = out["logits"].shape[1]
    valid = (text != PAD)[:, 1:]  # logits whose target is a text token (open_clip's loss ignores PAD)
    torch.testing.assert_close(logits[:, :positions][valid], out["logits"][valid], rtol=1e-4, atol=1e-4)

    # gradients of a loss on all three outputs, through every tower
    w = [torch.randn_like(t) for t in (image_emb, text_emb)]
    loss_theirs = (out["image_features"] * w[0]).sum() + (out["text_features"] * w[1]).sum() \
        + out["logits"][valid].square().mean()
    loss_ours = (image_emb * w[0]).sum() + (text_emb * w[1]).sum() + logits[:, :positions][valid].square().mean()
    loss_theirs.backward()
    loss_ours.backward()
    pairs = {"visual.transformer.resblocks.0.mlp.c_fc.weight": ours.vision.blocks.layers[0].mlp.fc1.weight,
             "text.transformer.resblocks.1.ln_1.weight": ours.unimodal.layers[1].norm1.weight,
             "text_decoder.cross_attn.1.mlp.c_proj.weight": ours.multimodal.layers[1].mlp.fc2.weight,
             "text_decoder.resblocks.0.mlp.c_fc.weight": ours.multimodal.layers[0].self_mlp.fc1.weight,
             "visual.attn_pool.ln_q.weight": ours.pool.norm_q.weight}
    params = dict(theirs.named_parameters())
    for name, mine in pairs.items():
        torch.testing.assert_close(mine.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_the_open_clip_layout_has_two_mlps_per_multimodal_layer_and_the_paper_default_one():
    paper, oc = models.create("coca-tiny"), models.create("coca-tiny", layout="open_clip")
    assert paper.multimodal.layers[0].self_mlp is None and oc.multimodal.layers[0].self_mlp is not None
    assert paper.vision.cls_token is None and oc.vision.cls_token is not None


def test_an_unmappable_open_clip_key_is_named():
    theirs = _tiny_open_clip_coca()
    ours = coca_from_open_clip(theirs)
    state = dict(theirs.state_dict())
    state["text_decoder.resblocks.0.ls_1.gamma"] = torch.ones(16)  # layer scale: vlcore's layers have none
    with pytest.raises(UnmappableKeyError, match=r"text_decoder\.resblocks\.0\.ls_1\.gamma"):
        coca_state_dict(state, ours)
    with pytest.raises(ValueError, match="layout='open_clip'"):
        coca_state_dict(theirs, models.create("coca-tiny"))


def test_vlcore_to_open_clip_round_trip_and_fine_tuned_weights_back():
    theirs = _tiny_open_clip_coca()
    ours = coca_from_open_clip(theirs).eval()
    original = theirs.state_dict()
    back = to_open_clip_state_dict(ours, theirs)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # weights changed on the vlcore side (as fine-tuning would) go back into open_clip with equal outputs
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name not in ("vision.patch_embed.proj.bias",) and not name.startswith("pool.out_proj"):
                p.add_(torch.randn_like(p) * 0.05)
    theirs.load_state_dict(to_open_clip_state_dict(ours, theirs))
    image, text = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6, 2, PAD, PAD, PAD], [1, 3, 4, 8, 9, 11, 2]])
    out = theirs(image, text)
    image_emb, text_emb, _ = _vlcore_outputs(ours, image, text)
    torch.testing.assert_close(image_emb, out["image_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_emb, out["text_features"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours.pool.out_proj[1].weight.add_(1.0)
    with pytest.raises(ValueError, match="one output projection"):
        to_open_clip_state_dict(ours, theirs)
