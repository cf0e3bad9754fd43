"""Hungarian matching against scipy, DETR matching / set loss, IPOT against exact optimal transport."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from vlcore.nn.matching import detr_loss, detr_match, linear_sum_assignment
from vlcore.nn.optimal_transport import ipot_plan, wpa_distance


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 5), (6, 9), (9, 6), (17, 17), (3, 40), (40, 3)])
def test_hungarian_matches_scipy_on_random_costs(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.normal(size=shape) * rng.uniform(0.1, 100)
        r_ref, c_ref = scipy_lsa(cost)
        r, c = linear_sum_assignment(cost)
        # continuous random costs: the optimum is unique, so the assignment itself must agree
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(c, c_ref)


def test_hungarian_ties_give_an_optimal_assignment():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, m = rng.integers(1, 9, 2)
        cost = rng.integers(0, 3, (n, m)).astype(float)
        r, c = linear_sum_assignment(cost)
        r_ref, c_ref = scipy_lsa(cost)
        assert len(r) == min(n, m) and len(set(c.tolist())) == len(c) and len(set(r.tolist())) == len(r)
        assert cost[r, c].sum() == pytest.approx(cost[r_ref, c_ref].sum())


def test_hungarian_inputs():
    r, c = linear_sum_assignment(torch.tensor([[4.0, 1.0], [2.0, 0.0]]))  # torch input
    assert r.tolist() == [0, 1] and c.tolist() == [1, 0]
    r, c = linear_sum_assignment(np.zeros((0, 3)))
    assert r.size == 0 and c.size == 0
    with pytest.raises(ValueError, match="finite"):
        linear_sum_assignment(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="2-D"):
        linear_sum_assignment(np.zeros((2, 2, 2)))


def test_detr_match_recovers_a_permutation_and_loss_is_zero_for_perfect_predictions():
    targets = torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.2, 0.4]])
    labels = torch.tensor([2, 0, 1])
    perm = torch.tensor([3, 0, 4])  # query q = perm[t] predicts target t; queries 1, 2 predict nothing
    boxes = torch.rand(5, 4) * 0.2 + 0.4
    boxes[perm] = targets
    logits = torch.full((5, 4), -10.0)
    logits[:, 3] = 10.0  # "no object"
    logits[perm, labels] = 10.0
    logits[perm, 3] = -10.0
    q, t = detr_match(logits, boxes, labels, targets)
    assert dict(zip(t.tolist(), q.tolist())) == {0: 3, 1: 0, 2: 4}
    valid = torch.tensor([[True, True, True, False]])
    out = detr_loss(logits[None], boxes[None], torch.cat([labels, torch.tensor([0])])[None],
                    torch.cat([targets, torch.rand(1, 4)])[None], valid)
    assert float(out["det_l1"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["det_giou"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["det_class"]) < 1e-6


def test_detr_loss_gradients_and_label_check():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    boxes = torch.rand(2, 4, 4).mul(0.3).add(0.3).requires_grad_()
    labels = torch.tensor([[0, 1], [1, 0]])
    tboxes = torch.rand(2, 2, 4) * 0.3 + 0.3
    valid = torch.tensor([[True, True], [True, False]])
    out = detr_loss(logits, boxes, labels, tboxes, valid)
    sum(out.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target labels"):
        detr_loss(logits, boxes, torch.tensor([[0, 2], [1, 0]]), tboxes, valid)


def test_ipot_converges_to_exact_optimal_transport():
    # n = m with uniform marginals: the optimal plan is a permutation (Birkhoff), cost = assignment cost / n
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    dist = wpa_distance(x, y, valid, valid, beta=0.02, iterations=400)
    cost = 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).transpose(1, 2)
    for b in range(2):
        r, c = scipy_lsa(cost[b].double().numpy())
        assert float(dist[b]) == pytest.approx(float(cost[b].double().numpy()[r, c].sum()) / 6, abs=2e-3)


def test_ipot_plan_marginals_with_padding():
    torch.manual_seed(1)
    cost = torch.rand(2, 5, 7)
    xv = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    yv = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7]).bool()
    plan = ipot_plan(cost, xv, yv, iterations=100)
    assert plan[0, 3:].abs().max() == 0 and plan[0, :, 4:].abs().max() == 0
    torch.testing.assert_close(plan[0].sum(1)[:3], torch.full((3,), 1 / 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan[0].sum(0)[:4], torch.full((4,), 1 / 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan[1].sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
