"""Reference contrastive loss (InfoNCE, SigLIP) against independent float64 computations; explicit backward,
gradcheck, the documented errors, the registered op (opcheck, torch.compile) and the ContrastiveLoss module."""

import math

import pytest
import torch
import torch.nn.functional as F
from dense_oracles import contrastive_loss as independent_loss  # the textbook losses, float64

import vlcore
from vlcore.nn import ContrastiveLoss
from vlcore.ops import contrastive as op
from vlcore.reference import contrastive as ref

SIZES = [(1, 3), (7, 80), (13, 3), (13, 80)]


def _inputs(b, d, dtype=torch.float32, normalise=True):
    img, txt = torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype)
    if normalise:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img, txt


@pytest.mark.parametrize("b,d", SIZES)
@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_value_and_grads_match_independent(b, d, kind):
    img, txt = _inputs(b, d)
    scale = torch.tensor(7.5)
    bias = torch.tensor(-3.0) if kind == "siglip" else None
    leaves = [t.clone().requires_grad_() for t in (img, txt, scale)] + ([bias.clone().requires_grad_()] if bias is not None else [])
    loss = vlcore.contrastive_loss(*leaves[:3], kind=kind, logit_bias=leaves[3] if bias is not None else None,
                                   backend="reference")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = independent_loss(*leaves64[:3], kind, leaves64[3] if bias is not None else None)
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, leaves)
    truth_grads = torch.autograd.grad(truth, leaves64)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_float64_inputs_compute_in_float64(kind):
    img, txt = _inputs(6, 5, torch.float64, normalise=False)
    bias = -2.0 if kind == "siglip" else None
    loss = vlcore.contrastive_loss(img, txt, 3.0, kind=kind, logit_bias=bias)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, independent_loss(img, txt, 3.0, kind, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_large_scale_stays_finite(kind):
    img, txt = _inputs(9, 16)
    txt[3] = -img[3]  # a positive pair at logit -100: large but finite loss
    bias = torch.tensor(-10.0) if kind == "siglip" else None
    loss = vlcore.contrastive_loss(img, txt, 100.0, kind=kind, logit_bias=bias)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), independent_loss(img, txt, 100.0, kind, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_nan_input_gives_nan_loss(kind):
    img, txt = _inputs(5, 4)
    img[2, 1] = float("nan")
    bias = -1.0 if kind == "siglip" else None
    assert torch.isnan(vlcore.contrastive_loss(img, txt, 10.0, kind=kind, logit_bias=bias))


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("b,big_b,offset,d", [(1, 1, 0, 3), (3, 7, 4, 5), (5, 12, 2, 80), (4, 4, 0, 7)])
def test_explicit_backward_matches_autograd(kind, b, big_b, offset, d):
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(big_b, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True) if kind == "siglip" else None
    rows, lse = ref.row_losses(x, y, scale, bias, offset=offset, kind=kind)
    drow = torch.randn(b, dtype=torch.float64)
    leaves = [x, y, scale] + ([bias] if bias is not None else [])
    auto = torch.autograd.grad(rows, leaves, drow)
    dx, dy, dscale, dbias = ref.row_losses_backward(drow, x.detach(), y.detach(), scale.detach(),
                                                    None if bias is None else bias.detach(), offset=offset, kind=kind)
    explicit = [dx, dy, dscale] + ([dbias] if bias is not None else [])
    for name, e, a in zip(["dx", "dy", "dscale", "dbias"], explicit, auto):
        torch.testing.assert_close(e, a, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    if kind == "infonce":
        torch.testing.assert_close(lse, torch.logsumexp(scale * x @ y.t(), dim=1))


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("b,d", [(1, 2), (4, 3)])
def test_gradcheck_public_reference(kind, b, d):
    img = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    if kind == "infonce":
        fn = lambda i, t, s: vlcore.contrastive_loss(i, t, s, kind=kind, backend="reference")
        assert torch.autograd.gradcheck(fn, (img, txt, scale))
    else:
        bias = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
        fn = lambda i, t, s, bb: vlcore.contrastive_loss(i, t, s, kind=kind, logit_bias=bb, backend="reference")
        assert torch.autograd.gradcheck(fn, (img, txt, scale, bias))


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_gradcheck_registered_op_with_reference_backend(kind):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True) if kind == "siglip" else None
    fn = lambda *a: op._rows_op(a[0], a[1], a[2], a[3] if len(a) > 3 else None, 2, kind, "reference")[0]
    assert torch.autograd.gradcheck(fn, (x, y, scale) + ((bias,) if bias is not None else ()))


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_opcheck(kind):
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.randn(6, 5, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True) if kind == "siglip" else None
    torch.library.opcheck(op._rows_op, (x, y, scale, bias, 1, kind, "reference"))
    drow = torch.randn(3)
    _, lse = op._rows_op(x, y, scale, bias, 1, kind, "reference")
    torch.library.opcheck(op._rows_backward_op,
                          (drow, x.detach(), y.detach(), scale.detach(), None if bias is None else bias.detach(),
                           lse.detach(), 1, kind, "reference"))


def test_opcheck_infonce_pair_op_and_generic_backward():
    """The single-process op serving both InfoNCE directions, with a backend that has no fused pair backward."""
    img = torch.randn(4, 5, requires_grad=True)
    txt = torch.randn(4, 5, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    torch.library.opcheck(op._pair_op, (img, txt, scale, "reference"))
    r_img, _, r_txt, _ = op._pair_op(img, txt, scale, "reference")
    loss = (r_img.sum() + r_txt.sum()) / 8
    expect = independent_loss(img, txt, scale, "infonce")
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    leaves64 = [t.detach().double().requires_grad_() for t in (img, txt, scale)]
    truth = torch.autograd.grad(independent_loss(*leaves64, "infonce"), leaves64)
    for g, t in zip(grads, truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph():
    img, txt = _inputs(6, 8)
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)

    def both(i, t, s, bb):
        rows = op._rows_op(i, t, s, bb, 0, "siglip", "reference")[0]  # the registered op through its fake
        return vlcore.contrastive_loss(i, t, s, backend="reference") + rows.sum()

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    got = compiled(img, txt, scale, bias)
    expect = both(img, txt, scale, bias)
    torch.testing.assert_close(got, expect)
    g1 = torch.autograd.grad(got, (scale, bias))
    g2 = torch.autograd.grad(expect, (scale, bias))
    torch.testing.assert_close(g1, g2)


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda i, t: vlcore.contrastive_loss(i.numpy(), t, 1.0), TypeError, "`image_emb` must be a torch.Tensor"),
    (lambda i, t: vlcore.contrastive_loss(i[None], t, 1.0), ValueError, r"`image_emb` must have 2 dims"),
    (lambda i, t: vlcore.contrastive_loss(i, t[:3], 1.0), ValueError, r"`text_emb` must have shape \(5, 4\)"),
    (lambda i, t: vlcore.contrastive_loss(i, t[:, :3], 1.0), ValueError, r"`text_emb` must have shape"),
    (lambda i, t: vlcore.contrastive_loss(i, t.double(), 1.0), TypeError, "`text_emb` must have the dtype"),
    (lambda i, t: vlcore.contrastive_loss(i.long(), t.long(), 1.0), TypeError, "`image_emb` must have dtype in"),
    (lambda i, t: vlcore.contrastive_loss(i, t, 1.0, kind="clip"), ValueError, "`kind` must be one of"),
    (lambda i, t: vlcore.contrastive_loss(i, t, torch.ones(2)), ValueError, "`logit_scale` must have exactly one"),
    (lambda i, t: vlcore.contrastive_loss(i, t, "1"), TypeError, "`logit_scale` must be a float"),
    (lambda i, t: vlcore.contrastive_loss(i, t, torch.tensor(3)), TypeError, "`logit_scale` must be a floating"),
    (lambda i, t: vlcore.contrastive_loss(i, t, 1.0, kind="siglip"), ValueError, "needs `logit_bias`"),
    (lambda i, t: vlcore.contrastive_loss(i, t, 1.0, kind="siglip", logit_bias=torch.zeros(3)), ValueError,
     "`logit_bias` must have exactly one"),
    (lambda i, t: vlcore.contrastive_loss(i, t, 1.0, logit_bias=0.0), ValueError, "only used by kind='siglip'"),
    (lambda i, t: vlcore.contrastive_loss(i[:0], t[:0], 1.0), ValueError,
     r"`image_emb` must have shape \(b, D\) with b >= 1 .*got an empty batch, b = 0 \(shape \(0, 4\)"),
    (lambda i, t: vlcore.contrastive_loss(i, t[:0], 1.0), ValueError, r"`text_emb` .*b >= 1 .*b = 0 \(shape \(0, 4\)"),
    (lambda i, t: vlcore.contrastive_loss(i[:, :0], t[:, :0], 1.0), ValueError,
     r"`image_emb` must have shape \(b, D\) with D >= 1; got D = 0 \(shape \(5, 0\)"),
    (lambda i, t: vlcore.contrastive_loss(i, t[:, :0], 1.0), ValueError, r"`text_emb` .*D >= 1; got D = 0"),
    (lambda i, t: vlcore.contrastive_loss(i.t().contiguous().t(), t, 1.0), ValueError, "contiguous in its last dim"),
    (lambda i, t: vlcore.contrastive_loss(i, t, 1.0, backend="nope"), Exception, "unknown backend 'nope'"),
])
def test_bad_inputs_raise(call, exc, match):
    img, txt = _inputs(5, 4)
    with pytest.raises(exc, match=match):
        call(img, txt)


def test_scale_on_another_device_raises():
    img, txt = _inputs(5, 4)
    meta_scale = torch.tensor(1.0, device="meta")
    with pytest.raises(ValueError, match="`logit_scale` is on meta"):
        vlcore.contrastive_loss(img, txt, meta_scale)


# ---- retrieval accuracy and the module ----------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_hits_match_explicit_argmax(chunk):
    x, y = torch.randn(6, 5), torch.randn(11, 5)
    y[3:9] = x + 0.3 * torch.randn(6, 5)  # mostly retrievable at offset 3
    explicit = int(((x @ y.t()).argmax(dim=1) == 3 + torch.arange(6)).sum())
    assert int(ref.retrieval_hits(x, y, offset=3, chunk=chunk)) == explicit


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_module_defaults_clamp_and_gradients(kind):
    m = ContrastiveLoss(kind)
    expect_t = math.log(1 / 0.07) if kind == "infonce" else math.log(10)
    assert m.logit_scale.item() == pytest.approx(expect_t)
    assert (m.logit_bias is None) == (kind == "infonce")
    if kind == "siglip":
        assert m.logit_bias.item() == -10.0
    img, txt = _inputs(7, 12)
    loss = m(img, txt)
    bias = m.logit_bias.detach() if kind == "siglip" else None
    torch.testing.assert_close(loss.double(), independent_loss(img, txt, math.exp(expect_t), kind, bias),
                               rtol=1e-5, atol=1e-6)
    loss.backward()
    assert m.logit_scale.grad is not None and m.logit_scale.grad != 0
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # exp(10) > 100: clamped, no gradient to t
    m.logit_scale.grad = None
    loss = m(img, txt)
    torch.testing.assert_close(loss.double(), independent_loss(img, txt, 100.0, kind, bias), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert m.logit_scale.grad == 0


def test_module_accuracy_and_frozen_temperature():
    m = ContrastiveLoss("infonce", init_logit_scale=0.0, learnable=False)
    assert not list(m.parameters())
    img, txt = _inputs(8, 6)
    txt[:5] = img[:5]  # the first 5 pairs are exact matches, so image->text top-1 holds for them
    loss, acc = m(img, txt, return_accuracy=True)
    logits = img @ txt.t()
    i2t = (logits.argmax(1) == torch.arange(8)).float().mean()
    t2i = (logits.argmax(0) == torch.arange(8)).float().mean()
    torch.testing.assert_close(acc["i2t"], i2t)
    torch.testing.assert_close(acc["t2i"], t2i)
    assert acc["i2t"] >= 5 / 8
    with pytest.raises(ValueError, match="`kind` must be one of"):
        ContrastiveLoss("clip")
    with pytest.raises(ValueError, match="init_logit_bias"):
        ContrastiveLoss("infonce", init_logit_bias=1.0)
