"""Property tests: ``vlcore.attention`` on every CPU-runnable backend against the dense float64 oracle.

Random shapes (Nq != Nk, batch 1..3, heads 1..2), head dims, layouts (transposed, sliced, shared queries by
batch 1 or stride 0), causal, prefix and padding lengths that include 0 and N, relative position tables on random
grids and starts, scales; the forward output and the gradients of q, k, v and the table for one upstream gradient.
The triton backend runs under TRITON_INTERPRET=1 (tiny shapes, its head dims only).
"""

from __future__ import annotations

import dense_oracles as oracle
import pytest
import torch
from conftest import HAS_CUDA, PROPERTY_BACKENDS, check_property

import vlcore

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install vlcore[dev])")
from hypothesis import strategies as st  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
# head dims each backend accepts; triton's smallest (the interpreter's cost grows with the tile)
HEAD_DIMS = {"reference": (1, 3, 8, 16), "cpu": (1, 3, 8, 16), "triton": (16,)}
DTYPES = {"reference": (torch.float32, torch.float64), "cpu": (torch.float32, torch.float64),
          "triton": (torch.float32, torch.float16)}
EXAMPLES = {"reference": 20, "cpu": 20, "triton": 4}  # + the 2 EXTREMES each
# always run (before the random ones): every sample at length 0 or N, Nq > Nk and Nq < Nk, a grid at the end
_BASE = {"batch": 2, "heads": 2, "dim": 16, "dtype": torch.float32, "shared": "no", "layout": "contiguous",
         "scale": None, "grid": None, "start": 0, "seed": 3}
EXTREMES = [
    {**_BASE, "nq": 9, "nk": 5, "causal": True, "prefix_lens": None, "kv_lens": [0, 5]},
    {**_BASE, "nq": 5, "nk": 9, "causal": False, "prefix_lens": [0, 9], "kv_lens": [9, 0], "grid": (2, 2),
     "start": 1},
]


def _length(nk: int):
    return st.one_of(st.sampled_from([0, nk]), st.integers(0, nk))


@st.composite
def attention_cases(draw, backend: str) -> dict:
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    nk = draw(st.integers(1, 12))
    nq = draw(st.one_of(st.just(nk), st.integers(1, 12)))
    case = {
        "batch": batch, "heads": heads, "nq": nq, "nk": nk, "dim": draw(st.sampled_from(HEAD_DIMS[backend])),
        "dtype": draw(st.sampled_from(DTYPES[backend])),
        "shared": draw(st.sampled_from(["no", "batch1", "stride0"])),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "causal": draw(st.booleans()),
        "prefix_lens": draw(st.none() | st.lists(_length(nk), min_size=batch, max_size=batch)),
        "kv_lens": draw(st.none() | st.lists(_length(nk), min_size=batch, max_size=batch)),
        "scale": draw(st.none() | st.floats(0.05, 2.0)),
        "grid": None, "start": 0, "seed": draw(st.integers(0, 2**16)),
    }
    if draw(st.booleans()):  # a grid inside both sequences (larger ones are rejected, see the validation tests)
        room = min(nq, nk)
        gh = draw(st.integers(1, room))
        gw = draw(st.integers(1, room // gh))
        case["grid"], case["start"] = (gh, gw), draw(st.integers(0, room - gh * gw))
    return case


def _layout(t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values in another memory layout (last dim always dense, as the op requires)."""
    if layout == "transposed":  # (B, H, N, D) storage seen as (B, N, H, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # a view into a wider head dim
        wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, generator=gen, dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    return t


def _inputs(case: dict):
    gen = torch.Generator().manual_seed(case["seed"])
    b, nq, nk, h, d, dt = case["batch"], case["nq"], case["nk"], case["heads"], case["dim"], case["dtype"]
    qb = b if case["shared"] == "no" else 1
    leaves = {
        "q": torch.randn(qb, nq, h, d, generator=gen).to(dt),
        "k": torch.randn(b, nk, h, d, generator=gen).to(dt),
        "v": torch.randn(b, nk, h, d, generator=gen).to(dt),
    }
    if case["grid"] is not None:
        gh, gw = case["grid"]
        leaves["table"] = torch.randn((2 * gh - 1) * (2 * gw - 1), h, generator=gen).to(dt)
    dout = torch.randn(b, nq, h, d, generator=gen).to(dt)
    leaves = {n: _layout(t, case["layout"], gen).requires_grad_() if n != "table" else t.requires_grad_()
              for n, t in leaves.items()}
    return leaves, dout


def _lens(values):
    return None if values is None else torch.tensor(values, dtype=torch.int64)


def _run_backend(case, leaves, dout, backend):
    """(out, grads by name) of vlcore.attention on the backend."""
    dev = {n: t.to(DEV) for n, t in leaves.items()}
    q = dev["q"]
    if case["shared"] == "stride0":  # one query set expanded over the batch (stride 0)
        q = q.expand(case["batch"], -1, -1, -1)
    out = vlcore.attention(q, dev["k"], dev["v"], causal=case["causal"],
                           prefix_lens=None if case["prefix_lens"] is None else _lens(case["prefix_lens"]).to(DEV),
                           kv_lens=None if case["kv_lens"] is None else _lens(case["kv_lens"]).to(DEV),
                           rel_pos_table=dev.get("table"), rel_pos_grid=case["grid"], rel_pos_start=case["start"],
                           scale=case["scale"], backend=backend)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dout.to(DEV))
    return out, dict(zip(names, grads))


def _run_oracle(case, leaves, dout):
    f64 = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    out = oracle.attention(f64["q"], f64["k"], f64["v"], causal=case["causal"], prefix_lens=case["prefix_lens"],
                           kv_lens=case["kv_lens"], table=f64.get("table"), grid=case["grid"], start=case["start"],
                           scale=case["scale"])
    names = list(f64)
    grads = torch.autograd.grad(out, [f64[n] for n in names], dout.double())
    return out, dict(zip(names, grads))


def _check(case: dict, backend: str) -> None:
    leaves, dout = _inputs(case)
    out, grads = _run_backend(case, leaves, dout, backend)
    want, want_grads = _run_oracle(case, leaves, dout)
    assert out.dtype == case["dtype"]
    oracle.assert_close_to_oracle("out", out, want, case["dtype"])
    for name, g in grads.items():
        oracle.assert_close_to_oracle(f"d{name}", g, want_grads[name], case["dtype"])


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_attention_matches_dense_oracle(backend):
    check_property(attention_cases(backend), lambda case: _check(case, backend), EXAMPLES[backend],
                   always=EXTREMES)
