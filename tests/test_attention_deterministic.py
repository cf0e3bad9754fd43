"""Deterministic mode (kernels/_launch.deterministic()): the attention launchers never autotune (a fixed config
per dtype, head dim and device capability) and give bitwise-identical results in two fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from vlcore.kernels import attention as ka

import vlcore


class _Counting:
    """An autotuned handle that counts its launches (each would time its configs the first time per key)."""

    def __init__(self, handle, calls):
        self.handle, self.calls, self.configs = handle, calls, handle.configs

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.handle[grid]


def _run_attention():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v = (torch.randn(2, 40, 2, 24, device=dev, requires_grad=True) for _ in range(3))
    table = torch.randn(9, 2, device=dev, requires_grad=True)
    out = vlcore.attention(q, k, v, causal=True, rel_pos_table=table, rel_pos_grid=(2, 2), backend="triton")
    return (out, *torch.autograd.grad(out, (q, k, v, table), torch.randn_like(out)))


@pytest.mark.parametrize("mode", ["deterministic", "torch_deterministic", "autotuned"])
def test_deterministic_mode_never_autotunes(monkeypatch, mode):
    calls = []
    tuned = ka._tuned()
    monkeypatch.setattr(ka, "_tuned", lambda: tuple(_Counting(h, calls) for h in tuned))
    monkeypatch.setenv("VLCORE_ATTENTION_AUTOTUNE", "1")
    monkeypatch.delenv("VLCORE_DETERMINISTIC", raising=False)
    if mode == "deterministic":
        monkeypatch.setenv("VLCORE_DETERMINISTIC", "1")
    if mode == "torch_deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    _run_attention()
    assert (len(calls) == 0) == (mode != "autotuned"), calls


def test_fixed_configs_depend_on_dtype_head_dim_and_capability(monkeypatch):
    monkeypatch.setattr(ka, "_INTERPRET", False)  # the GPU table (the interpreter always runs 32×32 tiles)
    shape = lambda *a: ka._fixed_shape(*a)
    assert shape("fwd", torch.bfloat16, 128, (9, 0), 128) != shape("fwd", torch.bfloat16, 256, (9, 0), 128)
    # fp32 (FMA dots hold whole operand rows per thread): smaller tiles than 16-bit, cp.async (2 stages) kept
    assert shape("fwd", torch.float32, 128, (9, 0), 128)[:2] < shape("fwd", torch.bfloat16, 128, (9, 0), 128)[:2]
    assert shape("fwd", torch.float32, 256, (8, 0), 128)[3] == 2
    assert shape("dkdv", torch.bfloat16, 64, (7, 5), 128)[3] == 1  # no cp.async before Ampere
    assert shape("fwd", torch.bfloat16, 64, (9, 0), 16)[0] == 16  # pooling: 16-row blocks
    for kernel in ("fwd", "dkdv", "dq"):  # same arguments, same config: nothing timed, nothing random
        assert shape(kernel, torch.float16, 128, (8, 0), 128) == shape(kernel, torch.float16, 128, (8, 0), 128)


_SCRIPT = r"""
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from test_attention_deterministic import _run_attention
torch.manual_seed(0)
digest = hashlib.sha256()
for t in _run_attention():
    digest.update(bytes(t.detach().cpu().contiguous().view(-1).view(torch.uint8).tolist()))
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_bitwise_identical_across_two_fresh_processes():
    env = dict(os.environ, VLCORE_DETERMINISTIC="1")
    env.pop("VLCORE_ATTENTION_AUTOTUNE", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    here = os.path.dirname(__file__)
    digests = [subprocess.run([sys.executable, "-c", _SCRIPT, here], env=env, capture_output=True, text=True,
                              timeout=300, check=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1], digests


@pytest.mark.gpu
def test_gpu_deterministic_mode_times_no_config(monkeypatch):
    """On a GPU the autotuner would time configs (Autotuner._bench): deterministic mode must time none."""
    from triton.runtime import autotuner

    timed = []
    bench = autotuner.Autotuner._bench
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *a, **kw: timed.append(1) or bench(self, *a, **kw))
    monkeypatch.setenv("VLCORE_DETERMINISTIC", "1")
    monkeypatch.setenv("VLCORE_ATTENTION_AUTOTUNE", "1")
    _run_attention()
    assert timed == []
