"""VisualDictionary under torch.distributed (2 gloo processes): identical dictionaries on every rank after several
steps with different local data (including dead-entry restarts), equal to one process on the concatenated data."""

import pytest
import torch
from dist_utils import run_distributed

from vlcore.nn import VisualDictionary

pytestmark = pytest.mark.distributed

K, D, STEPS = 16, 6, 4
STATE = ("codebook", "ema_counts", "ema_sums", "step", "initialized")


def _batches():
    """Per step: rank 0 gets 23 rows, rank 1 gets 14 (unequal; at step 2 rank 1 gets none), drawn from 5 clusters
    so most entries die."""
    gen = torch.Generator().manual_seed(123)
    centers = torch.randn(5, D, generator=gen) * 4
    steps = []
    for _ in range(STEPS):
        rows = centers[torch.randint(0, 5, (37,), generator=gen)] + 0.5 * torch.randn(37, D, generator=gen)
        cut = 37 if len(steps) == 2 else 23
        steps.append((rows[:cut], rows[cut:]))
    return steps


def _train(vd, batches):
    dead = []
    for x in batches:
        vd(x)
        dead.append(int(vd.dead_codes))
    return {name: getattr(vd, name).clone() for name in STATE}, dead


def _worker(rank, world, batches):
    # different seeds: rank 0's initial state is broadcast on the first step. Both configurations run in one
    # process group (spawning is the slow part of this test).
    out = {}
    for kmeans in (False, True):
        vd = VisualDictionary(K, D, dead_code_threshold=0.8, kmeans_init=kmeans, seed=rank).train()
        out[kmeans] = _train(vd, [b[rank] for b in batches])
    return out


def test_two_ranks_agree_and_equal_one_process():
    batches = _batches()
    results = run_distributed(_worker, 2, batches)
    for kmeans in (False, True):
        (s0, dead0), (s1, dead1) = results[0][kmeans], results[1][kmeans]
        for name in STATE:
            assert torch.equal(s0[name], s1[name]), f"{name} differs between ranks (kmeans_init={kmeans})"
        assert dead0 == dead1 and max(dead0) > 0  # restarts happened, identically
        assert int(s0["step"]) == STEPS
    # without k-means (whose start samples per-rank keys) the result equals one process on the global batch
    s0, dead0 = results[0][False]
    single = VisualDictionary(K, D, dead_code_threshold=0.8, seed=0).train()
    s_single, dead_single = _train(single, [torch.cat(b) for b in batches])
    assert dead_single == dead0
    for name in STATE:
        assert torch.allclose(s0[name].double(), s_single[name].double(), rtol=1e-5, atol=1e-5), name
