"""open_clip CLIP / SigLIP ViTs in vlcore's dual encoder (ALIGN, layout "clip" / "siglip"): embeddings, the
open_clip loss and every gradient equal open_clip's (fp32), and the weights go back. Real open_clip and timm,
random weights, tiny towers built locally."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (pip install -e '.[interop]')")
import timm  # noqa: E402
from open_clip.loss import ClipLoss, SigLipLoss  # noqa: E402
from open_clip.model import CLIP, CustomTextCLIP  # noqa: E402

from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402
from vlcore.integrations.open_clip import (  # noqa: E402
    dual_encoder_from_open_clip,
    dual_encoder_state_dict,
    to_open_clip_dual_state_dict,
)

EOT, PAD = 49, 0  # EOT is the highest id: open_clip's CLIP pools at the argmax


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("logit_scale", "logit_bias"):
                norm_weight = name.endswith("weight") and ("norm" in name or "ln_" in name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if norm_weight else 0.0))
    return model.eval()


def _tiny_clip():
    torch.manual_seed(0)
    return _randomise(CLIP(embed_dim=16, quick_gelu=True, output_dict=True,
                           vision_cfg=dict(image_size=32, layers=2, width=48, head_width=24, patch_size=8, mlp_ratio=2),
                           text_cfg=dict(context_length=9, vocab_size=50, width=32, heads=2, layers=2)))


def _tiny_siglip():
    """ViT-B-16-SigLIP's structure (timm trunk + MAP head, bidirectional text pooled last, biased projection)
    with a tiny trunk: built on the meta device, the trunk swapped for a small real timm one, then filled."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CustomTextCLIP(embed_dim=48, init_logit_bias=-10, output_dict=True,
                               vision_cfg=dict(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                                               timm_proj="none", image_size=32),
                               text_cfg=dict(context_length=9, vocab_size=50, width=32, heads=2, layers=2,
                                             no_causal_mask=True, proj_bias=True, pool_type="last",
                                             norm_kwargs={"eps": 1e-6}))
        model.visual.trunk = timm.create_model("vit_base_patch16_siglip_224", img_size=32, patch_size=8,
                                               embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0,
                                               global_pool="map")
    assert not list(model.buffers())  # to_empty leaves buffers unset: there must be none
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    return _randomise(model)


def _texts(full: bool):
    text = torch.tensor([[1, 5, 6, 7, EOT, PAD, PAD, PAD, PAD], [1, 3, 4, 8, 9, 11, 12, 13, EOT],
                         [1, 4, EOT, PAD, PAD, PAD, PAD, PAD, PAD]])
    return text, torch.ones_like(text, dtype=torch.bool) if full else text != PAD


def _assert_equal(theirs, ours, loss_fn, full_mask):
    image = torch.randn(3, 3, 32, 32)
    text, mask = _texts(full_mask)
    out = theirs(image, text)
    torch.testing.assert_close(ours.encode_image(image), out["image_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode_text(text, mask), out["text_features"], rtol=1e-5, atol=1e-5)
    bias = (out["logit_bias"],) if "logit_bias" in out else ()
    loss_theirs = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], *bias)
    loss = ours({"image": image, "text": text, "text_mask": mask})["loss"]
    torch.testing.assert_close(loss, loss_theirs, rtol=1e-5, atol=1e-5)
    loss_theirs.backward()
    loss.backward()
    grads = to_open_clip_dual_state_dict(ours, theirs, {n: p.grad for n, p in ours.named_parameters()})
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_open_clip_clip_equals_open_clip_with_every_gradient():
    theirs = _tiny_clip()
    ours = dual_encoder_from_open_clip(theirs).eval()
    assert ours.config.layout == "clip" and ours.config.act == "quick_gelu"
    _assert_equal(theirs, ours, ClipLoss(), full_mask=False)


def test_open_clip_siglip_equals_open_clip_with_every_gradient():
    theirs = _tiny_siglip()
    ours = dual_encoder_from_open_clip(theirs).eval()
    assert (ours.config.layout, ours.config.contrastive) == ("siglip", "siglip") and ours.image_pool is not None
    _assert_equal(theirs, ours, SigLipLoss(), full_mask=True)  # open_clip's SigLIP text has no mask


@pytest.mark.parametrize("make", [_tiny_clip, _tiny_siglip])
def test_round_trip_is_bit_exact_and_fine_tuned_weights_go_back(make):
    theirs = make()
    ours = dual_encoder_from_open_clip(theirs).eval()
    original = theirs.state_dict()
    back = to_open_clip_dual_state_dict(ours, theirs)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.load_state_dict(to_open_clip_dual_state_dict(ours, theirs))
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.encode_image(image), theirs.encode_image(image, normalize=True),
                               rtol=1e-5, atol=1e-5)


def test_an_unmappable_open_clip_key_is_named():
    theirs = _tiny_clip()
    ours = dual_encoder_from_open_clip(theirs)
    state = dict(theirs.state_dict())
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(48)  # layer scale: vlcore has none
    with pytest.raises(UnmappableKeyError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        dual_encoder_state_dict(state, ours)
