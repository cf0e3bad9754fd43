"""vlcore.integrations.open_clip.apply: open_clip's attention (vision, causal text, CoCa cross-attention) and
AttentionalPooler on vlcore's op — patched == unpatched (forward and every gradient), one graph under
torch.compile(fullgraph=True); and the drop-in ClipLoss / SigLipLoss / CoCaLoss equal open_clip's own."""

import copy

import pytest
import torch
from dist_utils import run_distributed

import vlcore.integrations  # noqa: F401  (before open_clip, also in the spawned workers: torchvision shim)

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (pip install -e '.[interop]')")
from open_clip import loss as oc_loss  # noqa: E402
from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.model import CLIP  # noqa: E402

import vlcore  # noqa: E402
from vlcore.integrations import open_clip as voc  # noqa: E402


def _filled(model):
    """Every tensor random (open_clip's constructors leave some uninitialised)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _tiny_clip():
    torch.manual_seed(0)
    return _filled(CLIP(embed_dim=16, output_dict=True, vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
                text_cfg=dict(context_length=9, vocab_size=50, width=32, heads=2, layers=2)))


def _tiny_coca():
    torch.manual_seed(0)
    return _filled(CoCa(embed_dim=16,
                vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, attentional_pool=True,
                                attn_pooler_heads=2, attn_pooler_queries=5, output_tokens=True, head_width=16),
                text_cfg=dict(context_length=7, vocab_size=20, width=16, heads=2, layers=1, embed_cls=True,
                              output_tokens=True),
                multimodal_cfg=dict(context_length=7, vocab_size=20, width=16, heads=2, layers=1,
                                    attn_pooler_heads=2)))


def _outputs(model, image, text):
    out = model(image, text)
    return [v for k, v in sorted(out.items()) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.is_floating_point()]


def _patched_equals_unpatched(model, image, text, monkeypatch):
    patched = copy.deepcopy(model)
    report = voc.apply(patched)
    calls = []
    real = vlcore.attention
    monkeypatch.setattr(vlcore, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    y0, y1 = _outputs(model, image, text), _outputs(patched, image, text)
    for a, b in zip(y1, y0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    sum(y.square().mean() for y in y0).backward()
    sum(y.square().mean() for y in y1).backward()
    for (name, p0), p1 in zip(model.named_parameters(), patched.parameters()):
        if p0.grad is not None or p1.grad is not None:
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert model.state_dict().keys() == patched.state_dict().keys()
    return report, calls, patched


def test_apply_patches_clip_vision_and_causal_text(monkeypatch):
    model = _tiny_clip()
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1, 50, (2, 9))
    report, calls, _ = _patched_equals_unpatched(model, image, text, monkeypatch)
    assert report.replaced == {"ResidualAttentionBlock": ["visual.transformer.resblocks.0",
                                                          "visual.transformer.resblocks.1"],
                               "ResidualAttentionBlock (causal)": ["transformer.resblocks.0",
                                                                   "transformer.resblocks.1"]}
    assert [kw["causal"] for kw in calls] == [False, False, True, True]  # the patched path ran, text causal


def test_apply_patches_coca_pooler_and_cross_attention(monkeypatch):
    model = _tiny_coca()
    image, text = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 3, 4, 8, 9, 11, 2]])
    report, calls, _ = _patched_equals_unpatched(model, image, text, monkeypatch)
    assert report.replaced["AttentionalPooler"] == ["visual.attn_pool"]
    # vision block, pooler, decoder self-attention (causal) and cross-attention run vlcore's op; the unimodal
    # text block passes open_clip's [CLS]/padding mask and keeps open_clip's path
    assert len(calls) == 4 and sum(kw.get("causal", False) for kw in calls) == 1


def test_patched_clip_compiles_in_one_graph():
    """torch.compile(fullgraph=True) raises on a graph break; the eager backend checks the trace only."""
    model = _tiny_clip()
    voc.apply(model)
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1, 50, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for a, b in zip(_outputs(compiled, image, text), _outputs(model, image, text), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- losses

def _features(b=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(2))
    return x.requires_grad_(), y.requires_grad_()


def _same_loss_and_grads(ours_fn, theirs_fn, scale, bias=None):
    x0, y0 = _features()
    x1, y1 = (t.detach().clone().requires_grad_() for t in (x0, y0))
    s0, s1 = (torch.tensor(scale, requires_grad=True) for _ in range(2))
    extra0, extra1 = ((), ()) if bias is None else ((torch.tensor(bias, requires_grad=True),),
                                                    (torch.tensor(bias, requires_grad=True),))
    theirs, ours = theirs_fn(x0, y0, s0, *extra0), ours_fn(x1, y1, s1, *extra1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    theirs.backward()
    ours.backward()
    for a, b in zip((x1, y1, s1, *extra1), (x0, y0, s0, *extra0)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_clip_loss_equals_open_clip():
    _same_loss_and_grads(voc.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True),
                         oc_loss.ClipLoss(), 14.3)


def test_siglip_loss_equals_open_clip():
    _same_loss_and_grads(voc.SigLipLoss(), oc_loss.SigLipLoss(), 10.0, bias=-2.5)


def test_coca_loss_equals_open_clip():
    logits = torch.randn(6, 5, 20)
    labels = torch.randint(0, 20, (6, 5))
    labels[:, 3:] = 0  # padding, ignored
    kw = dict(caption_loss_weight=2.0, clip_loss_weight=1.0)
    theirs = oc_loss.CoCaLoss(**kw)(*_features(), logits, labels, torch.tensor(14.3), output_dict=True)
    ours = voc.CoCaLoss(**kw)(*_features(), logits, labels, torch.tensor(14.3), output_dict=True)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_losses_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="use_horovod"):
        voc.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size=2 must match"):
        voc.ClipLoss(rank=0, world_size=2)
    with pytest.raises(ValueError, match="logit_bias"):
        voc.ClipLoss()(*_features(), 10.0, logit_bias=-1.0)


def _two_rank_worker(rank, world):
    """Each rank: its half of a global batch through open_clip's loss and vlcore's, with the gradients."""
    x, y = (t[rank * 3:(rank + 1) * 3].detach() for t in _features())
    out = {}
    for name, ours, theirs, bias in (
            ("clip", voc.ClipLoss(rank=rank, world_size=world),
             oc_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world), None),
            ("siglip", voc.SigLipLoss(rank=rank, world_size=world),
             oc_loss.SigLipLoss(rank=rank, world_size=world), -2.5)):
        for who, fn in (("ours", ours), ("theirs", theirs)):
            xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
            s = torch.tensor(10.0, requires_grad=True)
            extra = () if bias is None else (torch.tensor(bias, requires_grad=True),)
            loss = fn(xs, ys, s, *extra)
            loss.backward()
            out[name, who] = (loss.detach(), xs.grad, ys.grad, s.grad, *(b.grad for b in extra))
    return out


def test_losses_on_two_gloo_ranks_give_open_clip_gradients():
    """Per rank, the feature, scale and bias gradients equal open_clip's (InfoNCE with local_loss and
    gather_with_grad, SigLIP's neighbour exchange); the value is the global loss: the mean of open_clip's
    per-rank values."""
    results = run_distributed(_two_rank_worker, 2)
    for name in ("clip", "siglip"):
        for r in results:
            for a, b in zip(r[name, "ours"][1:], r[name, "theirs"][1:], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        theirs_mean = sum(r[name, "theirs"][0] for r in results) / len(results)
        for r in results:
            torch.testing.assert_close(r[name, "ours"][0], theirs_mean, rtol=1e-5, atol=1e-6)


def test_apply_patches_the_timm_trunk_of_an_open_clip_siglip(monkeypatch):
    from test_integrations_open_clip_dual import _tiny_siglip

    model = _tiny_siglip()
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1, 50, (2, 9))
    report, calls, _ = _patched_equals_unpatched(model, image, text, monkeypatch)
    assert report.replaced["timm Attention"] == ["visual.trunk.blocks.0.attn", "visual.trunk.blocks.1.attn"]
    assert len(report.replaced["ResidualAttentionBlock"]) == 2  # the bidirectional text tower
    assert len(calls) == 4 and not any(kw.get("causal") for kw in calls)
