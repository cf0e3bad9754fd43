"""Every head dim that is a multiple of 8 up to 256 reaches the Triton kernels (padded to a power of two inside),
and every registered model's attention has a head dim the Triton backend accepts (a model whose attention fell
back to the reference on a GPU would materialise (B, H, N, N) scores)."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_check import compare_with_reference

import vlcore
from vlcore import dispatch, models
from vlcore.reference import attention as ref

os.environ.setdefault("VLCORE_ATTENTION_AUTOTUNE", "0")


@pytest.mark.parametrize("dim", [8, 24, 72, 88, 136, 256])
def test_head_dim_against_reference(dim):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v = (torch.randn(2, n, 1, dim, device=dev) for n in (20, 37, 37))
    mask = {"causal": True, "kv_lens": torch.tensor([37, 12], device=dev)}
    compare_with_reference(lambda q, k, v: vlcore.attention(q, k, v, backend="triton", **mask),
                           lambda q, k, v: ref.attention(q, k, v, **mask), {"q": q, "k": k, "v": v},
                           dtype=torch.float32)


def _triton_accepts(dim: int) -> list[str]:
    problem = dispatch.Problem(torch.device("cuda"), torch.bfloat16, {
        "head_dim": dim, "nq": 64, "nk": 64, "shared_q": False, "causal": False, "prefix": False,
        "padding": False, "rel_pos": False})
    return dispatch.get("attention", dispatch.TRITON).supports(problem)


@pytest.mark.parametrize("dim", [8, 40, 88, 136, 256])
def test_triton_backend_accepts_multiples_of_8(dim):
    assert _triton_accepts(dim) == []


@pytest.mark.parametrize("dim", [4, 44, 264])
def test_triton_backend_refuses_others_with_the_reason(dim):
    assert _triton_accepts(dim) == [f"head dim {dim} not supported (supported: multiples of 8 up to 256)"]


def _attention_head_dims(model: torch.nn.Module) -> set[int]:
    """Head dims of every module that calls vlcore.attention (they carry ``dim`` and ``heads``)."""
    return {m.dim // m.heads for m in model.modules()
            if isinstance(getattr(m, "heads", None), int) and isinstance(getattr(m, "dim", None), int)}


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_reaches_the_kernel(name):
    with torch.device("meta"):  # the large configs too: no memory, no initialisation cost
        model = models.create(name)
    dims = _attention_head_dims(model)
    assert dims, f"{name}: no attention module found"
    refused = {d: _triton_accepts(d) for d in sorted(dims) if _triton_accepts(d)}
    assert not refused, f"{name}: the Triton attention refuses {refused}"
