"""How the attention launchers launch: grids within CUDA's limits for huge batches, every launch inside the
device guard. The grids are recorded without running anything (the kernels are replaced by recorders and the
tensors live on the meta device), so shapes far beyond this machine's memory are checked."""

from __future__ import annotations

import pytest
import torch
from vlcore.kernels import _launch
from vlcore.kernels import attention as ka

KERNELS = ("attention.fwd", "attention.delta", "attention.dkdv", "attention.dq")


class _Recorder:
    """Stands for a (possibly autotuned) Triton kernel: ``kernel[grid](*args, **meta)`` evaluates the grid for
    every tile config the launcher may pick (the smallest tiles give the largest grids) and launches nothing."""

    def __init__(self, configs):
        self.configs = configs

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for config in self.configs:
                if callable(grid):
                    grid(dict(meta, **config.kwargs))
        return launch


def _every_config():
    import triton

    def configs(shapes, skew=False):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"SKEW_W": 256} if skew else {})}, num_warps=w,
                              num_stages=s) for bm, bn, w, s in shapes]
    return configs(ka._FWD_SHAPES), configs(ka._DKDV_SHAPES, skew=True), configs(ka._DQ_SHAPES)


@pytest.fixture
def recorded_grids(monkeypatch):
    fwd, dkdv, dq = _every_config()
    recorders = {"fwd": _Recorder(fwd), "dkdv": _Recorder(dkdv), "dq": _Recorder(dq)}
    # autotuned handles and the plain jit functions (fixed configs: deterministic mode, autotuning off)
    monkeypatch.setattr(ka, "_tuned", lambda: tuple(recorders.values()))
    monkeypatch.setattr(ka, "_JIT", recorders)
    monkeypatch.setattr(ka, "_delta_kernel", _Recorder([None]))
    grids = []
    monkeypatch.setattr(_launch, "GRID_HOOKS", [lambda name, grid, device: grids.append((name, grid))])
    return grids


@pytest.mark.parametrize("shape", [
    # (batch, nq, nk, heads, dim, table grid): Swin-T stage 1 at batch 256 (64 windows of 7×7 folded into the
    # batch, 3 heads) and at 4 heads; CLIP-L-style embedding extraction at B = 4096 (16 heads, 257 tokens)
    (256 * 64, 49, 49, 3, 32, (7, 7)),
    (256 * 64, 49, 49, 4, 32, (7, 7)),
    (4096, 257, 257, 16, 64, None),
    (65_536, 16, 16, 2, 32, None),
], ids=["swin-b256-3h", "swin-b256-4h", "clip-l-b4096", "b65536"])
def test_grids_stay_within_cuda_limits(recorded_grids, shape):
    batch, nq, nk, heads, dim, grid = shape
    q, k, v = (torch.empty(batch, n, heads, dim, device="meta", dtype=torch.bfloat16) for n in (nq, nk, nk))
    table = None if grid is None else torch.empty((2 * grid[0] - 1) * (2 * grid[1] - 1), heads, device="meta")
    out, lse = ka.attention_fwd(q, k, v, table=table, grid=grid)
    ka.attention_bwd(torch.empty_like(out), q, k, v, out, lse, table=table, grid=grid)
    assert {name for name, _ in recorded_grids} == set(KERNELS)
    for name, g in recorded_grids:
        assert all(n <= limit for n, limit in zip(g, _launch.GRID_LIMITS)), (name, g)
        if name != "attention.delta" and not (name == "attention.dkdv" and grid):  # (b, h) pairs on axis 0
            assert g[0] >= batch * heads, (name, g)


def test_over_limit_grid_is_a_clear_error(recorded_grids):
    """Past even axis 0's limit (2^31 − 1 programs), the launch is refused before anything runs."""
    q = torch.empty(1 << 20, 4096, 16, 32, device="meta")
    with pytest.raises(_launch.LaunchError, match=r"attention.fwd: grid axis 0 is \d+, over CUDA's limit"):
        ka.attention_fwd(q, q, q)


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Triton launches on the *current* device: each launcher must enter its tensors' device first (on CPU the
    interpreter runs, and the hooks see which guard each launch entered and that it came before the grid)."""
    events = []
    monkeypatch.setattr(_launch, "GUARD_HOOKS", [lambda name, device: events.append(("guard", name, device))])
    monkeypatch.setattr(_launch, "GRID_HOOKS", [lambda name, grid, device: events.append(("grid", name, device))])
    q, k, v = torch.randn(1, 5, 2, 32), torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32)
    table = torch.randn(9, 2)
    out, lse = ka.attention_fwd(q, k, v, causal=True, table=table, grid=(2, 2), start=1)
    ka.attention_bwd(torch.randn_like(out), q, k, v, out, lse, causal=True, table=table, grid=(2, 2), start=1)
    guarded = [name for kind, name, _ in events if kind == "guard"]
    assert sorted(set(guarded)) == sorted(KERNELS)
    for i, (kind, name, _) in enumerate(events):
        if kind == "grid":  # the nearest guard entered before this grid is this kernel's
            last_guard = next(e for e in reversed(events[:i]) if e[0] == "guard")
            assert last_guard[1] == name and last_guard[2] == q.device, (events[:i + 1])


@pytest.fixture
def launched_precisions(monkeypatch):
    """DOT_PRECISION of every kernel launch (as on a GPU: the interpreter has no TF32)."""
    seen = []

    class Capture:
        configs = ()

        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta["DOT_PRECISION"])

    monkeypatch.setattr(ka, "_INTERPRET", False)
    monkeypatch.setattr(ka, "_kernel", lambda name, meta, dtype, device: (Capture(), {"BLOCK_N": 32}))
    monkeypatch.setattr(ka, "_delta_kernel", _Recorder([None]))
    return seen


def _launch_fwd_bwd(dtype):
    q = torch.empty(2, 40, 2, 32, device="meta", dtype=dtype)
    out, lse = ka.attention_fwd(q, q, q)
    ka.attention_bwd(torch.empty_like(out), q, q, q, out, lse)


@pytest.mark.parametrize("opt_in", ["none", "allow_tf32", "precision_high", "precision_medium"])
def test_fp32_uses_tf32_only_on_torch_opt_in(launched_precisions, opt_in):
    precision = torch.get_float32_matmul_precision()
    try:  # one API per case (torch refuses to read a state set through both); the precision also sets the flag
        torch.set_float32_matmul_precision(opt_in.split("_")[1] if opt_in.startswith("precision") else "highest")
        if opt_in == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        _launch_fwd_bwd(torch.float32)
    finally:
        torch.set_float32_matmul_precision(precision)
    expected = "ieee" if opt_in == "none" else "tf32"
    assert launched_precisions == [expected] * 3  # fwd, dkdv, dq
