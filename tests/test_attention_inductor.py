"""vlcore.attention under torch.compile(fullgraph=True, backend="inductor"), forward and backward, against eager.

Inductor checks that a custom op's outputs have the strides its fake promised (contiguous): a backward that
returned a transposed dtable view or gradients laid out like permuted inputs crashed in the compiled backward.
One compiled graph holds every mask combination with and without a rel-pos table (a contiguous table and a
transposed view of an (H, T) parameter), shared queries and head-major (non-contiguous) inputs; under
TRITON_INTERPRET=1 on CPU the Triton backend runs in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import vlcore

GRID, START = (2, 2), 1  # a 2×2 token grid starting at token 1
MASKS = {
    "none": {},
    "causal": {"causal": True},
    "prefix": {"prefix_lens": "plens"},
    "pad": {"kv_lens": "klens"},
    "prefix_pad": {"prefix_lens": "plens", "kv_lens": "klens"},
    "causal_pad": {"causal": True, "kv_lens": "klens"},
}


def _losses(q, k, v, qs, hm, table, table_hm, weights, plens, klens, masks=tuple(MASKS)):
    """Σ over every call of ⟨weight, output⟩: each call's output reaches the gradients with its own weights."""
    lens = {"plens": plens, "klens": klens}
    calls = []
    for mask in (MASKS[m] for m in masks):
        kw = {n: lens.get(x, x) if isinstance(x, str) else x for n, x in mask.items()}
        calls.append((q, kw))
        calls.append((q, dict(kw, rel_pos_table=table, rel_pos_grid=GRID, rel_pos_start=START)))
    calls.append((qs, {"prefix_lens": plens, "rel_pos_table": table_hm.t(), "rel_pos_grid": GRID}))  # shared q
    calls.append((qs, {"kv_lens": klens}))
    total = 0.0
    for i, (query, kw) in enumerate(calls):
        out = vlcore.attention(query, k, v, backend="triton", **kw)
        total = total + (out * weights[i, :, :out.shape[1]]).sum()
    # head-major storage (B, H, N, D) seen as (B, N, H, D): strided q, k, v
    out = vlcore.attention(*(t.transpose(1, 2) for t in hm.unbind(0)), causal=True, rel_pos_table=table,
                           rel_pos_grid=GRID, backend="triton")
    return total + (out * weights[len(calls)]).sum()


def _compare(masks):
    b, n, h, d = 2, 9, 2, 16
    torch.manual_seed(0)
    leaves = {
        "q": torch.randn(b, n, h, d), "k": torch.randn(b, n, h, d), "v": torch.randn(b, n, h, d),
        "qs": torch.randn(1, 5, h, d), "hm": torch.randn(3, b, h, n, d),
        "table": torch.randn(9, h), "table_hm": torch.randn(h, 9),
    }
    weights = torch.randn(len(MASKS) * 2 + 3, b, n, h, d)
    plens, klens = torch.tensor([3, 0]), torch.tensor([9, 4])

    def run(fn):
        args = {name: t.clone().requires_grad_() for name, t in leaves.items()}
        loss = fn(**args, weights=weights, plens=plens, klens=klens, masks=masks)
        grads = torch.autograd.grad(loss, list(args.values()))
        return loss.detach(), dict(zip(args, grads))

    eager_loss, eager_grads = run(_losses)
    compiled_loss, compiled_grads = run(torch.compile(_losses, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-4, rtol=1e-5)
    for name in leaves:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_inductor_table_and_strided_inputs():
    """The crash's minimal trigger (a table; gradients of head-major inputs), shared queries included (~60 s on 2 cores)."""
    _compare(("prefix_pad",))


@pytest.mark.slow
def test_inductor_every_mask_and_table_combination():
    _compare(tuple(MASKS))
