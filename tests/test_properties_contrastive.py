"""Property tests: ``vlcore.contrastive_loss`` (InfoNCE, SigLIP) on every CPU-runnable backend against the dense
float64 oracle, forward and every gradient (image_emb, text_emb, logit_scale, logit_bias) for one upstream gradient.

Random batch sizes, embedding dims, dtypes, layouts (rows of a wider buffer), normalised or raw embeddings,
scales 0.01..100 as float or tensor, biases -15..5. The distributed decomposition is checked on the backends'
row op: a random split of the global batch into unequal local batches (one per simulated rank), each rank's rows
against all columns at its offset, must give the oracle's rows and gradients, and the shares sum to the loss.
"""

from __future__ import annotations

import dense_oracles as oracle
import pytest
import torch
from conftest import HAS_CUDA, PROPERTY_BACKENDS, check_property

import vlcore
from vlcore import dispatch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install vlcore[dev])")
from hypothesis import strategies as st  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = {"reference": (torch.float32, torch.float64), "cpu": (torch.float32, torch.float64),
          "triton": (torch.float32, torch.float16)}


@st.composite
def loss_cases(draw, backend: str, max_batch: int = 9) -> dict:
    kind = draw(st.sampled_from(["infonce", "siglip"]))
    return {
        "kind": kind, "batch": draw(st.integers(1, max_batch)), "dim": draw(st.integers(1, 20)),
        "dtype": draw(st.sampled_from(DTYPES[backend])), "sliced": draw(st.booleans()),
        "normalised": draw(st.booleans()), "scale": draw(st.floats(0.01, 100.0)),
        "scale_is_tensor": draw(st.booleans()),
        "bias": draw(st.floats(-15.0, 5.0)) if kind == "siglip" else None, "seed": draw(st.integers(0, 2**16)),
    }


def _embeddings(case: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = case["batch"], case["dim"]
    pair = torch.randn(2, b, d, generator=gen)
    if case["normalised"]:
        pair = pair / pair.norm(dim=-1, keepdim=True)
    pair = pair.to(case["dtype"])
    if case["sliced"]:  # rows of a wider buffer: row stride > D, last dim dense
        wide = torch.zeros(2, b, d + 5, dtype=case["dtype"])
        wide[..., :d] = pair
        pair = wide[..., :d]
    return pair[0], pair[1]


def _scalar(value: float | None, case: dict) -> torch.Tensor | None:
    """logit_scale / logit_bias as a tensor in the loss's dtype (fp64 for fp64 embeddings, else fp32)."""
    dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    return None if value is None else torch.tensor(value, dtype=dtype)


def _conditioning(x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    """How much wider than at |logits| <= 100 the bound must be: a low-precision logit carries an absolute error
    of about ulp(max |logit|), which a fused backward (logits recomputed tile by tile) passes on to every
    probability. Normalised CLIP embeddings with s <= 100 stay at 1."""
    bound = abs(scale) * float(x.double().norm(dim=1).max(0)[0]) * float(y.double().norm(dim=1).max(0)[0]) \
        if x.numel() and y.numel() else 0.0
    return max(1.0, bound / 100)


def _oracle_grads(fn, tensors: dict[str, torch.Tensor | None], upstream: torch.Tensor):
    """(value, grads by name) of fn(**float64 copies) through float64 autograd."""
    f64 = {n: None if t is None else t.detach().double().requires_grad_() for n, t in tensors.items()}
    value = fn(**f64)
    names = [n for n, t in f64.items() if t is not None]
    grads = torch.autograd.grad(value, [f64[n] for n in names], upstream.double())
    return value, dict(zip(names, grads))


def _check_loss(case: dict, backend: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    image, text = _embeddings(case, gen)
    image, text = image.to(DEV).requires_grad_(), text.to(DEV).requires_grad_()
    scale = _scalar(case["scale"], case).to(DEV).requires_grad_()
    bias = _scalar(case["bias"], case)
    bias = None if bias is None else bias.to(DEV).requires_grad_()
    upstream = torch.rand((), generator=gen) + 0.5
    loss = vlcore.contrastive_loss(image, text, scale if case["scale_is_tensor"] else case["scale"],
                                   kind=case["kind"], logit_bias=bias, backend=backend)
    leaves = {"image": image, "text": text, "scale": scale if case["scale_is_tensor"] else None, "bias": bias}
    names = [n for n, t in leaves.items() if t is not None]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names], upstream.to(DEV))))

    def truth(image, text, scale, bias):
        s = scale if scale is not None else torch.tensor(case["scale"], dtype=oracle.F64)
        return oracle.contrastive_loss(image, text, s, kind=case["kind"], bias=bias)

    want, want_grads = _oracle_grads(truth, {"image": image, "text": text, "scale": leaves["scale"], "bias": bias},
                                     upstream)
    assert loss.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    cond = _conditioning(image.detach().cpu(), text.detach().cpu(), case["scale"])
    oracle.assert_close_to_oracle("loss", loss, want, case["dtype"], cond)
    for name, g in grads.items():
        oracle.assert_close_to_oracle(f"d{name}", g, want_grads[name], case["dtype"], cond)


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_contrastive_loss_matches_dense_oracle(backend):
    check_property(loss_cases(backend), lambda case: _check_loss(case, backend), 6 if backend == "triton" else 15)


@st.composite
def split_cases(draw, backend: str) -> dict:
    case = draw(loss_cases(backend, max_batch=10))
    cuts = draw(st.lists(st.integers(1, case["batch"] - 1), max_size=3, unique=True)) if case["batch"] > 1 else []
    bounds = [0, *sorted(cuts), case["batch"]]
    case["sizes"] = [hi - lo for lo, hi in zip(bounds, bounds[1:])]  # unequal local batches, one per rank
    return case


def _check_split(case: dict, backend: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    image, text = _embeddings(case, gen)
    kind, impl = case["kind"], dispatch.get("contrastive_loss", backend).impl()
    scale = _scalar(case["scale"], case)
    bias = _scalar(case["bias"], case)
    total, offset = torch.zeros((), dtype=oracle.F64), 0
    cond = _conditioning(image, text, case["scale"])
    for size in case["sizes"]:  # rank r: its rows x[offset:offset+size] against the gathered columns
        x = image[offset:offset + size]
        drow = torch.rand(size, generator=gen, dtype=torch.float32) + 0.5
        rows, lse = impl.forward(x.to(DEV), text.to(DEV), scale.to(DEV), None if bias is None else bias.to(DEV),
                                 offset, kind)
        dx, dy, dscale, dbias = impl.backward(drow.to(DEV), x.to(DEV), text.to(DEV), scale.to(DEV),
                                              None if bias is None else bias.to(DEV), lse, offset, kind)

        def truth(x, y, scale, bias, offset=offset):
            if kind == "infonce":
                return oracle.infonce_rows(x, y, scale, offset)
            return oracle.siglip_rows(x, y, scale, bias, offset)

        want, want_grads = _oracle_grads(truth, {"x": x, "y": text, "scale": scale, "bias": bias}, drow)
        oracle.assert_close_to_oracle(f"rows at offset {offset}", rows, want, case["dtype"], cond)
        oracle.assert_close_to_oracle("dx", dx, want_grads["x"], case["dtype"], cond)
        oracle.assert_close_to_oracle("dy", dy, want_grads["y"], case["dtype"], cond)
        oracle.assert_close_to_oracle("dscale", dscale, want_grads["scale"], case["dtype"], cond)
        if kind == "siglip":
            oracle.assert_close_to_oracle("dbias", dbias, want_grads["bias"], case["dtype"], cond)
        total = total + rows.double().sum().cpu()
        offset += size
    if kind == "siglip":  # the image->text shares alone make up the whole SigLIP loss
        whole = oracle.contrastive_loss(image, text, scale, kind=kind, bias=bias)
        oracle.assert_close_to_oracle("sum of the shares", total / case["batch"], whole, case["dtype"], cond)


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_unequal_local_batches_match_dense_oracle(backend):
    check_property(split_cases(backend), lambda case: _check_split(case, backend), 10)
