"""Attentional pooling through the Triton attention kernels (batch-shared queries, the dq split over batch chunks):
vlcore.nn.MultiAttentionPool with backend="triton" against the same module run by the reference in float64,
forward and the gradients of the context and of every parameter."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from kernel_check import assert_close

import vlcore

# GPU runs: one fixed config per kernel (autotuning every tested key would compile for a long time);
# the benchmarks autotune.
os.environ.setdefault("VLCORE_ATTENTION_AUTOTUNE", "0")


def _run(pool, context, grads):
    context = context.detach().clone().requires_grad_()
    outs = pool(context)
    leaves = [context, *pool.parameters()]
    return outs, torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads, outs)])


@pytest.mark.parametrize("n_queries,batch,n", [((1,), 3, 37), ((6, 1), 2, 50)])
def test_pool_triton_matches_reference(n_queries, batch, n):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pool = vlcore.nn.MultiAttentionPool(64, n_queries, heads=2, context_dim=48, backend="triton").to(dev)
    truth_pool = copy.deepcopy(pool).double()
    truth_pool.backend = "reference"
    lowp_pool = copy.deepcopy(pool)
    lowp_pool.backend = "reference"
    context = torch.randn(batch, n, 48, device=dev)
    grads = [torch.randn(batch, q, 64, device=dev, dtype=torch.float64) for q in n_queries]
    outs, g = _run(pool, context, grads)
    t_outs, t_g = _run(truth_pool, context.double(), grads)
    r_outs, r_g = _run(lowp_pool, context, grads)
    names = ["context"] + [name for name, _ in pool.named_parameters()]
    for i, (o, t, r) in enumerate(zip(outs, t_outs, r_outs)):
        assert_close(f"output {i}", o, t, dtype=torch.float32, reference_lowp=r)
    for name, a, t, r in zip(names, g, t_g, r_g):
        assert_close(f"d{name}", a, t, dtype=torch.float32, reference_lowp=r)
