"""timm ViT / Swin weights in vlcore's ViT / SwinEncoder: outputs and gradients equal timm's (fp32), and the
torchvision shim that lets timm import beside the CPU torch wheel. Real timm, random weights, tiny shapes."""

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm not installed (pip install -e '.[interop]')")

from vlcore.integrations import timm as vtimm  # noqa: E402
from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms and tables included), so a misplaced tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model.eval()


def _tiny_vit(**kw):
    return _randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                        embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw))


def _tiny_swin():
    # 32 px / patch 4 = 8 x 8 map, window 4: stage 0 has plain and shifted windows, stage 1 one 4 x 4 window
    return _randomise(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                                        window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                        num_classes=5))


def _assert_same_forward_and_grads(theirs, ours, reshape=lambda y: y):
    x = torch.randn(2, 3, 32, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = reshape(theirs.forward_features(x1)), ours(x2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y_theirs)
    (y_theirs * w).sum().backward()
    (y_ours * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("class_token", [True, False])
def test_vit_from_timm_equals_timm(class_token):
    kw = {} if class_token else {"class_token": False, "global_pool": "avg", "fc_norm": False}
    theirs = _tiny_vit(**kw)
    ours = vtimm.vit_from_timm(theirs).eval()
    assert (ours.cls_token is not None) == class_token
    _assert_same_forward_and_grads(theirs, ours)


def test_swin_from_timm_equals_timm_with_the_table_copied_as_is():
    theirs = _tiny_swin()
    ours = vtimm.swin_from_timm(theirs).eval()
    table = theirs.layers[0].blocks[1].attn.relative_position_bias_table
    assert torch.equal(ours.blocks[1].attn.rel_pos_table, table)
    _assert_same_forward_and_grads(theirs, ours, reshape=lambda y: y.flatten(1, 2))


def test_an_unmappable_key_is_named():
    theirs = _tiny_vit(init_values=1e-5)  # layer scale: vlcore's blocks have none
    with pytest.raises(UnmappableKeyError, match=r"blocks\.0\.ls1\.gamma"):
        vtimm.vit_from_timm(theirs)


def test_a_missing_key_and_a_wrong_shape_are_named():
    theirs = _tiny_vit()
    ours = vtimm.vit_from_timm(theirs)
    state = dict(theirs.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(UnmappableKeyError, match=r"blocks\.layers\.1\.mlp\.fc2\.bias"):
        vtimm.load_vit(ours, state)
    state = dict(theirs.state_dict())
    state["pos_embed"] = state["pos_embed"][:, :-1]
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 16, 32\).*expects \(1, 17, 32\)"):
        vtimm.load_vit(ours, state)



# ---------------------------------------------------------------------------------------------- apply(model)

def _patched_equals_unpatched(model, monkeypatch):
    """Forward and parameter gradients of ``model`` before and after ``apply``; returns (report, op calls)."""
    import copy

    import vlcore

    x = torch.randn(2, 3, 32, 32)
    patched = copy.deepcopy(model)
    report = vtimm.apply(patched)
    calls = []
    real = vlcore.attention
    monkeypatch.setattr(vlcore, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    y0, y1 = model(x), patched(x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for (name, p0), p1 in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert dict(model.state_dict()).keys() == dict(patched.state_dict()).keys()
    return report, calls


def test_apply_patches_timm_vit_attention(monkeypatch):
    report, calls = _patched_equals_unpatched(_tiny_vit(), monkeypatch)
    assert report.replaced == {"Attention": ["blocks.0.attn", "blocks.1.attn"]}
    assert len(calls) == 2  # one fused attention call per block: the patched path really ran
    assert "2 x Attention" in str(report)


def test_apply_patches_timm_swin_window_attention_with_the_table(monkeypatch):
    report, calls = _patched_equals_unpatched(_tiny_swin(), monkeypatch)
    assert report.count == 4
    # stage 0: plain windows (patched) then shifted ones (timm's masked path); stage 1: one window, no shift
    assert len(calls) == 3
    assert all(kw["rel_pos_table"] is not None and kw["rel_pos_grid"] == (4, 4) for kw in calls)


def test_patched_vit_traces_in_one_graph():
    """torch.compile(fullgraph=True) raises on a graph break; the eager backend checks the trace only."""
    model = _tiny_vit()
    vtimm.apply(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
