"""2-process gloo tests: the all_gather with reduce-scatter backward (variable sizes, clear errors instead of
hangs) and the distributed contrastive loss against the single-process loss on the concatenated batch."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

import vlcore
from vlcore import distributed as vdist
from vlcore.nn import ContrastiveLoss

pytestmark = pytest.mark.distributed

GATHER_SIZES = (3, 5)
D = 4


def _rank_rows(rank, n, d):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _rank_weights(rank, total, d):
    g = torch.Generator().manual_seed(200 + rank)
    return torch.randn(total, d, generator=g, dtype=torch.float64)


def _gather_worker(rank, world):
    out = {"world_info": vdist.world_info()}
    sizes = vdist.gather_sizes(GATHER_SIZES[rank])
    out["sizes"], out["offset"] = sizes, vdist.local_offset(sizes)
    x = _rank_rows(rank, GATHER_SIZES[rank], D).requires_grad_()
    y = vdist.all_gather(x)
    (y * _rank_weights(rank, sum(GATHER_SIZES), D)).sum().backward()  # a different loss on every rank
    out["gathered"], out["grad"] = y.detach(), x.grad
    y2, sizes2 = vdist.all_gather_with_sizes(x.detach()[:, :2])
    out["gathered2"], out["sizes2"] = y2, sizes2
    errors = []
    for bad in (torch.zeros(2, D + rank), torch.zeros(2, D, dtype=torch.float64 if rank else torch.float32),
                torch.zeros(2, D, 1 + rank)):
        try:
            vdist.all_gather(bad)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def test_all_gather_values_sum_gradients_and_errors():
    results = run_distributed(_gather_worker, 2)
    xs = [_rank_rows(r, n, D) for r, n in enumerate(GATHER_SIZES)]
    total = sum(GATHER_SIZES)
    weight_sum = _rank_weights(0, total, D) + _rank_weights(1, total, D)
    for rank, res in enumerate(results):
        assert res["world_info"] == (rank, 2, True)
        assert res["sizes"] == list(GATHER_SIZES) and res["sizes2"] == list(GATHER_SIZES)
        assert res["offset"] == sum(GATHER_SIZES[:rank])
        torch.testing.assert_close(res["gathered"], torch.cat(xs), rtol=0, atol=0)
        torch.testing.assert_close(res["gathered2"], torch.cat(xs)[:, :2], rtol=0, atol=0)
        start = res["offset"]
        torch.testing.assert_close(res["grad"], weight_sum[start:start + GATHER_SIZES[rank]], rtol=0, atol=1e-15)
        for err in res["errors"]:  # every rank raises, none hangs
            assert err is not None and "ranks disagree" in err and "rank 1" in err


def test_not_initialised_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert vdist.world_info() == (0, 1, False)
    assert vdist.all_gather(x) is x
    assert vdist.gather_sizes(3) == [3] and vdist.local_offset([3]) == 0
    with pytest.raises(ValueError, match="at least 1 dim"):
        vdist.all_gather(torch.tensor(1.0))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        vdist.all_gather([1.0])


# ---- distributed contrastive loss ---------------------------------------------------------------------

CASES = [(kind, sizes) for kind in ("infonce", "siglip") for sizes in ((4, 4), (3, 5), (0, 3))]
DIM = 6


def _global_batch(total, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(total, DIM, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(total, DIM, generator=g), dim=-1).to(dtype)
    txt[: total // 2] = F.normalize(img[: total // 2].float() + 0.3 * txt[: total // 2].float(), dim=-1).to(dtype)
    return img, txt


def _loss_and_grads(img, txt, kind, backend=None):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(9.0, requires_grad=True)
    bias = torch.tensor(-2.5, requires_grad=True) if kind == "siglip" else None
    loss = vlcore.contrastive_loss(img, txt, scale, kind=kind, logit_bias=bias, backend=backend)
    loss.backward()
    return {"loss": loss.detach(), "dimg": img.grad, "dtxt": txt.grad, "dscale": scale.grad,
            "dbias": None if bias is None else bias.grad}


def _contrastive_worker(rank, world, backend, cases=CASES):
    results = []
    for kind, sizes in cases:
        img, txt = _global_batch(sum(sizes))
        start = sum(sizes[:rank])
        res = _loss_and_grads(img[start:start + sizes[rank]], txt[start:start + sizes[rank]], kind, backend)
        module = ContrastiveLoss(kind, group=None, backend=backend)
        _, acc = module(img[start:start + sizes[rank]], txt[start:start + sizes[rank]], return_accuracy=True)
        res["acc"] = acc
        results.append(res)
    return results


def _check_against_single_process(results, backend=None, tol=1e-6, cases=CASES):
    world = len(results)
    for case, (kind, sizes) in enumerate(cases):
        img, txt = _global_batch(sum(sizes))
        truth = _loss_and_grads(img, txt, kind, "reference")
        _, truth_acc = ContrastiveLoss(kind)(img, txt, return_accuracy=True)
        for rank in range(world):
            res = results[rank][case]
            start, n = sum(sizes[:rank]), sizes[rank]
            msg = f"{kind} sizes {sizes} rank {rank} backend {backend}"
            torch.testing.assert_close(res["loss"], truth["loss"], rtol=tol, atol=tol, msg=msg)
            # DDP divides by W: the local embedding gradient / W is the global-batch gradient of those rows
            torch.testing.assert_close(res["dimg"] / world, truth["dimg"][start:start + n], rtol=tol, atol=tol,
                                       msg=msg)
            torch.testing.assert_close(res["dtxt"] / world, truth["dtxt"][start:start + n], rtol=tol, atol=tol,
                                       msg=msg)
            assert res["acc"] == truth_acc, msg
        for name in ("dscale", "dbias"):
            if truth[name] is None:
                continue
            averaged = sum(results[r][case][name] for r in range(world)) / world  # DDP's all_reduce average
            torch.testing.assert_close(averaged, truth[name], rtol=tol, atol=tol, msg=f"{name} {kind} {sizes}")


def test_distributed_contrastive_reference_matches_single_process():
    _check_against_single_process(run_distributed(_contrastive_worker, 2, "reference"), "reference")
