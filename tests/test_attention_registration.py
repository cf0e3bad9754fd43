"""vlcore::attention is a proper torch.library op: opcheck (schema, fake, autograd registration) and
torch.compile(fullgraph=True) through it and through the public function."""

import pytest
import torch

import vlcore


def _args(shared=False, table=False, dtype=torch.float32):
    q = torch.randn(1 if shared else 2, 5, 2, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 6, 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 6, 2, 8, dtype=dtype, requires_grad=True)
    t = torch.randn(3 * 3, 2, dtype=dtype, requires_grad=True) if table else None
    grid = [2, 2] if table else None
    return (q, k, v, False, torch.tensor([2, 0]), torch.tensor([6, 4]), t, grid, 1, 8 ** -0.5, "reference")


@pytest.mark.parametrize("shared,table", [(False, False), (True, False), (False, True)])
def test_opcheck(shared, table):
    torch.library.opcheck(torch.ops.vlcore.attention.default, _args(shared, table))


def test_registered_op_gradients_match_public_reference():
    args = _args(shared=True, table=True)
    q, k, v, _, prefix, kv, t, grid = args[:8]
    out, lse = torch.ops.vlcore.attention(*args)
    ref = vlcore.attention(q, k, v, prefix_lens=prefix, kv_lens=kv, rel_pos_table=t, rel_pos_grid=tuple(grid),
                           rel_pos_start=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, t), g)
    want = torch.autograd.grad(ref, (q, k, v, t), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert lse.shape == (2, 2, 5)


class TinyBlock(torch.nn.Module):
    def __init__(self, backend=None):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.backend = backend

    def forward(self, x, prefix_lens):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).unbind(2)
        return vlcore.attention(q, k, v, prefix_lens=prefix_lens, backend=self.backend).sum()


@pytest.mark.parametrize("via_op", [False, True])
def test_compile_fullgraph(via_op):
    torch._dynamo.reset()
    block = TinyBlock()
    x = torch.randn(2, 7, 16)
    prefix = torch.tensor([3, 7])
    if via_op:  # the registered op path (what the compiled backends use), with the reference implementation
        def f(x, prefix):
            b, n, _ = x.shape
            q, k, v = block.qkv(x).view(b, n, 3, 2, 8).unbind(2)
            out, _ = torch.ops.vlcore.attention(q, k, v, False, prefix, None, None, None, 0, 8 ** -0.5, "reference")
            return out.sum()
    else:
        f = block
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(x, prefix)
    got = compiled(x, prefix)
    torch.testing.assert_close(got, expected)
    g1 = torch.autograd.grad(got, block.qkv.weight)[0]
    g2 = torch.autograd.grad(f(x, prefix), block.qkv.weight)[0]
    torch.testing.assert_close(g1, g2)
