"""The ``cpu`` backends (vlcore/cpu/) against independent dense computations and the reference backend, forward
and backward with the same upstream gradient; and the dispatch rule that makes them the default on CPU."""

import pytest
import torch

import vlcore
from test_attention_reference import naive_attention
from vlcore import dispatch
from vlcore.cpu import attention as cpu_attention

# ---- attention -----------------------------------------------------------------------------------------

ATTN_CASES = {
    "none": {},
    "causal_square": {"causal": True},
    "causal_fewer_queries": {"causal": True, "nq": 3},
    "causal_more_queries": {"causal": True, "nq": 9},  # the first rows see no key
    "prefix": {"prefix_lens": [0, 4]},
    "padding_empty_row": {"kv_lens": [0, 5]},
    "prefix_padding": {"prefix_lens": [5, 1], "kv_lens": [3, 7]},
    "shared_queries": {"shared": True, "kv_lens": [7, 2]},
    "rel_pos": {"rel_pos": True},
    "rel_pos_causal_padding": {"rel_pos": True, "causal": True, "kv_lens": [4, 0], "nq": 5},
    "rel_pos_shared_prefix": {"rel_pos": True, "shared": True, "prefix_lens": [2, 6]},
}


def _attention_inputs(case, dtype, batch=2, nk=7, heads=2, dim=4):
    spec = dict(ATTN_CASES[case])
    nq = spec.pop("nq", nk)
    q = torch.randn(1 if spec.pop("shared", False) else batch, nq, heads, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, nk, heads, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, nk, heads, dim, dtype=dtype, requires_grad=True)
    kw = {key: (torch.tensor(val) if isinstance(val, list) else val) for key, val in spec.items() if key != "rel_pos"}
    leaves = [q, k, v]
    if spec.get("rel_pos"):
        grid = (2, 3)
        table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), heads, dtype=dtype, requires_grad=True)
        kw.update(rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=1)
        leaves.append(table)
    return leaves, kw


def _grads(out, leaves, upstream):
    return torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_cpu_matches_naive_float64_forward_and_backward(case):
    leaves, kw = _attention_inputs(case, torch.float64)
    out = vlcore.attention(*leaves[:3], backend="cpu", **kw)
    naive_kw = {key: val for key, val in kw.items() if not key.startswith("rel_pos")}
    if "rel_pos_table" in kw:
        naive_kw.update(table=kw["rel_pos_table"], grid=kw["rel_pos_grid"], start=kw["rel_pos_start"])
    expected = naive_attention(*leaves[:3], **naive_kw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, upstream), _grads(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_cpu_matches_reference_float32(case):
    leaves, kw = _attention_inputs(case, torch.float32, nk=33, heads=4, dim=16)
    out = vlcore.attention(*leaves[:3], backend="cpu", **kw)
    expected = vlcore.attention(*leaves[:3], backend="reference", **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, upstream), _grads(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _sdpa_nan_on_empty_rows(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """SDPA as older torch versions compute it: a plain softmax, so a row with no visible key is NaN (and so is its
    gradient)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("nan_sdpa", [False, True])
def test_attention_cpu_fully_masked_rows_output_zero_and_zero_gradient(nan_sdpa, monkeypatch):
    """SDPA alone gives NaN on such rows in some torch versions; the backend must give 0 and zero gradient."""
    if nan_sdpa:
        monkeypatch.setattr(cpu_attention.F, "scaled_dot_product_attention", _sdpa_nan_on_empty_rows)
    (q, k, v), _ = _attention_inputs("none", torch.float32)
    kv_lens = torch.tensor([0, 3])
    out = vlcore.attention(q, k, v, kv_lens=kv_lens, backend="cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dk[0], torch.zeros_like(dk[0]))
    assert torch.equal(dk[1, 3:], torch.zeros_like(dk[1, 3:]))  # padding keys get nothing


def test_attention_cpu_expanded_queries_get_the_batch_summed_gradient():
    (q1, k, v), _ = _attention_inputs("shared_queries", torch.float64)
    expanded = q1.expand(k.shape[0], -1, -1, -1)
    out = vlcore.attention(expanded, k, v, backend="cpu")
    explicit = q1.detach().repeat(k.shape[0], 1, 1, 1).requires_grad_()
    expected = naive_attention(explicit, k, v)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, q1, upstream)
    (want,) = torch.autograd.grad(expected, explicit, upstream)
    torch.testing.assert_close(got, want.sum(0, keepdim=True))


def test_attention_cpu_rel_pos_bias_built_once_per_call(monkeypatch):
    """The table is gathered once for all heads and the batch, not once per head or sample."""
    calls = []
    real = cpu_attention.ref.rel_pos_bias
    monkeypatch.setattr(cpu_attention.ref, "rel_pos_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    leaves, kw = _attention_inputs("rel_pos", torch.float32, batch=3, heads=4)
    vlcore.attention(*leaves[:3], backend="cpu", **kw).sum().backward()
    assert len(calls) == 1


# ---- dispatch ------------------------------------------------------------------------------------------

def _attention_problem(dtype, device="cpu"):
    return dispatch.Problem(torch.device(device), dtype, {"head_dim": 16})


@pytest.mark.parametrize("op", ["attention"])
def test_cpu_tensors_pick_the_cpu_backend(op):
    assert dispatch.choose(op, _attention_problem(torch.float32)).name == "cpu"
    assert dispatch.choose(op, _attention_problem(torch.float64)).name == "cpu"
    # dtypes it declines fall back to the reference
    assert dispatch.choose(op, _attention_problem(torch.float16)).name == "reference"
    assert dispatch.choose(op, _attention_problem(torch.float32), backend="reference").name == "reference"


def test_cpu_backend_never_chosen_for_cuda_tensors():
    for b in dispatch.backends("attention"):
        if b.name == "cpu":
            assert b.refusals(_attention_problem(torch.float32, "cuda"))
    names = [b.name for b in dispatch.backends("attention") if "cuda" in b.devices]
    assert "cpu" not in names


def test_public_attention_runs_the_cpu_backend_by_default(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    (q, k, v), _ = _attention_inputs("none", torch.float32)
    auto = vlcore.attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(auto, vlcore.attention(q, k, v, backend="reference"))
    assert calls == [1]  # the explicit reference request does not go through the cpu backend
