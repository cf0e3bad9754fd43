"""What the interpreter cannot show about the contrastive and VQ launches: CUDA's grid limits at huge shapes,
the device guard around every launch (Triton and the CUDA extension), the CUDA sources clearing a pending error
before launching, the deterministic mode, the TF32 opt-in, and the static variants for the resource report."""

import contextlib
import ctypes
import re
from pathlib import Path

import pytest
import torch
from vlcore.kernels import _launch

CSRC = Path(__file__).resolve().parent.parent / "csrc"


# ---- csrc: a pending error is cleared before each launch ------------------------------------------------

def _entry_points(source: str) -> dict[str, str]:
    """Bodies of the exported (column-0) ``std::string name(...)`` functions of a .cu file."""
    bodies = {}
    for m in re.finditer(r"^std::string (\w+)\(", source, flags=re.M):
        end = source.index("\n}\n", m.end())
        bodies[m.group(1)] = source[m.end():end]
    return bodies


def test_cuda_entry_points_clear_a_pending_error_before_launching():
    """Without it, last_error() after the launch reports another kernel's (non-sticky) error as this one's."""
    checked = []
    for name in ("vq.cu", "contrastive.cu"):
        for fn, body in _entry_points((CSRC / name).read_text()).items():
            launch = re.search(r"<<<|\blaunch_nearest\w*<|VLCORE_CONTRASTIVE_BWD\(", body)
            if launch is None:
                continue
            clear = re.search(r"cudaGetLastError\(\)|clear_pending_error\(\)", body)
            assert clear is not None and clear.start() < launch.start(), f"{name}:{fn} launches before clearing"
            checked.append(fn)
    assert sorted(checked) == ["contrastive_backward", "contrastive_forward", "vq_ema", "vq_nearest",
                               "vq_statistics"]


# ---- grids within CUDA's limits at huge shapes (recorded, never launched) --------------------------------

class _NoLaunch:
    """Stands in for a @triton.jit kernel: evaluates the grid as Triton would (a callable grid gets the
    meta-parameters), launches nothing."""

    def __getitem__(self, grid):
        def run(*args, **meta):
            if callable(grid):
                grid(meta)
        return run


@pytest.fixture
def grids(monkeypatch):
    """Every grid a launcher passes through checked_grid: (kernel name, grid)."""
    seen = []
    monkeypatch.setattr(_launch, "GRID_HOOKS", [lambda name, grid, device: seen.append((name, grid))])
    return seen


def _no_launch(monkeypatch, module, *names):
    for name in names:
        monkeypatch.setattr(module, name, _NoLaunch())


def _huge(rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """(rows, dim) without the memory: every row is the same (row stride 0)."""
    return torch.zeros(1, dim, dtype=dtype).expand(rows, dim)


@pytest.mark.parametrize("gpu_configs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contrastive_grids_fit_cuda_limits_at_one_million_rows(grids, monkeypatch, dtype, gpu_configs):
    kc = pytest.importorskip("vlcore.kernels.contrastive")
    if gpu_configs:  # the tile sizes a GPU launch would use
        monkeypatch.setattr(kc, "_INTERPRET", False)
    _no_launch(monkeypatch, kc, "_fwd_kernel", "_bwd_dx_kernel", "_bwd_dy_kernel", "_bwd_pair_kernel")
    b, d = 1 << 20, 8
    x, y = _huge(b, d, dtype), _huge(b, d, dtype)
    scale, drow = torch.tensor(10.0), torch.ones(b)
    lse = torch.zeros(b)
    for kind in ("infonce", "siglip"):
        kc.contrastive_fwd(x, y, scale, torch.tensor(-10.0), 0, kind)
        kc.contrastive_bwd(drow, x, y, scale, torch.tensor(-10.0), lse, 0, kind)
    kc.infonce_pair_bwd(drow, drow, x, y, scale, lse, lse)
    names = {name for name, _ in grids}
    assert names == {"contrastive.fwd", "contrastive.bwd_dx", "contrastive.bwd_dy", "contrastive.bwd_pair"}
    # check_grid raised for any axis over the limit; the row blocks are on axis 0, D chunks (one here) and column
    # slices (two off a GPU) after it
    assert all(g[0] >= b // 64 and all(a <= 2 for a in g[1:]) for _, g in grids), grids


def test_vq_grids_fit_cuda_limits_at_ten_million_rows(grids, monkeypatch):
    kv = pytest.importorskip("vlcore.kernels.vq")
    n, k, d = 10_000_000, 16, 8

    class Recorded(Exception):
        pass

    def stop(name, grid, device):
        raise Recorded  # recorded by the fixture's hook (registered first): stop before the launch

    _launch.GRID_HOOKS.append(stop)
    cfg = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, num_warps=4)
    monkeypatch.setattr(kv, "_tuned_nearest", lambda *args: (_NoLaunch(), cfg))
    with pytest.raises(Recorded):
        kv.vq_nearest(_huge(n, d), torch.randn(k, d))
    _launch.GRID_HOOKS.remove(stop)
    assert grids == [("vq.nearest", (-(-n // 32),))]
    # every config the autotuner may pick on a GPU
    for block_n, *_ in kv._LOWP_CONFIGS + kv._FP32_CONFIGS:
        _launch.check_grid("vq.nearest", kv.nearest_grid(n, {"BLOCK_N": block_n}))
    # K = 2^21 entries: more entry blocks than axis 1 would allow, on axis 0
    _no_launch(monkeypatch, kv, "_statistics_kernel", "_ema_kernel")
    grids.clear()
    k, d = 1 << 21, 4
    kv.vq_statistics(torch.zeros(3, d), torch.tensor([0, 5, k - 1]), k)
    state = [torch.zeros(k, d), torch.zeros(k), torch.zeros(k, d)]
    kv.ema_update(*state, torch.zeros(k, d + 1), 0.99, 1e-5)
    assert [name for name, _ in grids] == ["vq.statistics", "vq.ema"]
    assert all(g[0] > 65_535 and g[1] == 1 for _, g in grids), grids


# ---- the device guard around every launch ----------------------------------------------------------------

@pytest.fixture
def guards(monkeypatch):
    """Kernel names in the order their launcher entered the device guard."""
    seen = []
    monkeypatch.setattr(_launch, "GUARD_HOOKS", [lambda name, device: seen.append((name, device.type))])
    return seen


def test_triton_launches_enter_the_device_guard(guards):
    """Triton launches on the current device: each launcher enters its tensors' device first (a cuda:1 tensor
    while device 0 is current would fault). Under the interpreter the guard is entered for CPU tensors too."""
    kc = pytest.importorskip("vlcore.kernels.contrastive")
    kv = pytest.importorskip("vlcore.kernels.vq")
    x, y, scale, bias = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(2.0), torch.tensor(-1.0)
    rows, lse = kc.contrastive_fwd(x, y, scale, None, 0, "infonce")
    kc.contrastive_bwd(torch.ones(5), x, y, scale, bias, torch.zeros(5), 0, "siglip")
    kc.infonce_pair_bwd(torch.ones(5), torch.ones(5), x, y, scale, lse, lse)
    idx, _ = kv.vq_nearest(x, torch.randn(3, 8))
    packed = kv.vq_statistics(x, idx, 3)
    kv.ema_update(torch.randn(3, 8), torch.ones(3), torch.randn(3, 8), packed, 0.9, 1e-5)
    assert guards == [("contrastive.fwd", "cpu"), ("contrastive.bwd", "cpu"), ("contrastive.bwd_pair", "cpu"),
                      ("vq.nearest", "cpu"), ("vq.statistics", "cpu"), ("vq.ema", "cpu")]


class _FakeExtension:
    """vlcore._C without a GPU: records each entry point called and whether the device guard was held."""

    def __init__(self, inside):
        self.calls, self._inside = [], inside

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, self._inside[0]))
            if name == "vq_nearest":  # indices the host maps afterwards: make them valid (0)
                ctypes.memset(args[3], 0, args[5] * 8)
        return call


def test_cuda_extension_launches_enter_the_device_guard(guards, monkeypatch):
    from vlcore import _ext, dispatch

    inside = [False]

    @contextlib.contextmanager
    def guard(t):
        inside[0] = True
        yield
        inside[0] = False

    fake = _FakeExtension(inside)
    monkeypatch.setattr(_launch, "device_guard", guard)
    monkeypatch.setattr(_ext, "extension", lambda: fake)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    contrastive = dispatch.get("contrastive_loss", "cuda").load()
    vq = dispatch.get("vq", "cuda").load()
    x, y, scale = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(2.0)
    contrastive.forward(x, y, scale, None, 0, "infonce")
    contrastive.backward(torch.ones(5), x, y, scale, None, torch.zeros(5), 0, "infonce")
    idx, _ = vq.nearest(x, torch.randn(3, 8), "l2")
    vq.statistics(x, idx, 3)
    vq.ema_update(torch.randn(3, 8), torch.ones(3), torch.randn(3, 8), torch.zeros(3, 9), 0.9, 1e-5)
    assert fake.calls == [(name, True) for name in ("contrastive_fwd", "contrastive_bwd", "vq_nearest",
                                                     "vq_statistics", "vq_ema")]
    assert [name for name, _ in guards] == ["contrastive.fwd[cuda]", "contrastive.bwd[cuda]", "vq.nearest[cuda]",
                                            "vq.statistics[cuda]", "vq.ema[cuda]"]


# ---- TF32: fp32 dots follow torch's opt-in, through one shared helper ------------------------------------

@pytest.mark.parametrize("opt_in", ["allow_tf32", "high", None])
def test_fp32_dots_follow_torchs_tf32_opt_in(monkeypatch, opt_in):
    """As torch's fp32 matmul: IEEE products by default, TF32 after allow_tf32 / set_float32_matmul_precision
    ("high"). The VQ statistics stay IEEE (a sum of features, not a matmul)."""
    kc = pytest.importorskip("vlcore.kernels.contrastive")
    kv = pytest.importorskip("vlcore.kernels.vq")
    for module in (kc, kv):
        monkeypatch.setattr(module, "_INTERPRET", False)  # the GPU path (the interpreter has no TF32)
    matmul = torch.backends.cuda.matmul  # a module proxy: monkeypatch cannot set its flags
    before, before_tf32 = torch.get_float32_matmul_precision(), matmul.allow_tf32
    if opt_in == "high":
        torch.set_float32_matmul_precision("high")
    elif opt_in == "allow_tf32":
        matmul.allow_tf32 = True
    try:
        want = "ieee" if opt_in is None else "tf32"
        assert kv._precision(torch.float32) == want
        assert kc._precisions(torch.float32) == (want, want)
        assert kv._sum_precision(torch.float32) == "ieee"
        assert kv._precision(torch.float16) == "tf32" and kc._precisions(torch.bfloat16) == ("ieee", "tf32")
    finally:
        torch.set_float32_matmul_precision(before)
        matmul.allow_tf32 = before_tf32


# ---- deterministic mode ----------------------------------------------------------------------------------

def test_deterministic_mode_fixes_the_vq_config_without_autotuning(monkeypatch):
    """Autotuning picks block sizes by timing, and BLOCK_D changes the summation order of every distance (which of
    two near-equal entries wins): in deterministic mode the nearest search uses one fixed config per
    (operand kind, D, capability). The contrastive kernels are never autotuned."""
    kv = pytest.importorskip("vlcore.kernels.vq")
    kc = pytest.importorskip("vlcore.kernels.contrastive")
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(kv, "_INTERPRET", False)  # the GPU path
    x = torch.zeros(2, 768)
    monkeypatch.setenv("VLCORE_DETERMINISTIC", "0")
    assert isinstance(kv._tuned_nearest(True, 768, x)[0], Autotuner)
    monkeypatch.setenv("VLCORE_DETERMINISTIC", "1")
    for tensor_cores in (True, False):
        kernel, cfg = kv._tuned_nearest(tensor_cores, 768, x)
        assert kernel is kv._nearest_kernel and not isinstance(kernel, Autotuner)
        assert cfg == kv.default_nearest_config(tensor_cores, 768, (0, 0))
        assert {"BLOCK_N", "BLOCK_K", "BLOCK_D", "num_warps", "num_stages"} <= cfg.keys()
    assert kv._tuned_nearest(True, 8, x)[1]["BLOCK_D"] == 16  # small D: small chunks, still fixed
    assert not any(isinstance(v, Autotuner) for v in vars(kc).values())


_REPRO = r"""
import hashlib, os, sys
import torch, vlcore
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(7)
x = torch.randn(40, 24, generator=g).to(dev)
cb = torch.randn(30, 24, generator=g).to(dev)
img = torch.randn(20, 24, generator=g).to(dev).requires_grad_()
txt = torch.randn(20, 24, generator=g).to(dev).requires_grad_()
scale = torch.tensor(12.0, device=dev, requires_grad=True)
h = hashlib.sha256()
for dtype in (torch.float32, torch.float16):
    idx, dist = vlcore.vq_nearest(x.to(dtype), cb, backend="triton")
    counts, sums = vlcore.vq_statistics(x.to(dtype), idx, 30, backend="triton")
    loss = vlcore.contrastive_loss(img.to(dtype), txt.to(dtype), scale, backend="triton")
    loss.backward()
    for t in (idx, dist, counts, sums, loss, img.grad, txt.grad, scale.grad):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.slow
def test_results_are_bitwise_equal_across_fresh_processes():
    """Two fresh processes in deterministic mode (fresh autotuning state on a GPU) give the same bits."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLCORE_DETERMINISTIC="1")
    runs = [subprocess.run([sys.executable, "-c", _REPRO], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    digests = [run.stdout.split()[-1] for run in runs]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# ---- static variants for the resource report ---------------------------------------------------------------

@pytest.mark.parametrize("module_name", ["contrastive", "vq"])
def test_static_variants_list_every_launch_config(module_name):
    mod = pytest.importorskip(f"vlcore.kernels.{module_name}")
    variants = mod.static_variants()
    assert {v.dtype for v in variants} == {"bf16", "fp16", "fp32"}
    assert {256, 512, 768} <= {v.dim for v in variants}
    for v in variants:
        assert list(v.signature) == v.fn.arg_names, v.kernel
        assert {a for a, t in v.signature.items() if t == "constexpr"} == set(v.constexprs), v.kernel
        assert set(v.divisible) <= set(v.signature) and any(a.endswith("_ptr") for a in v.divisible), v.kernel
    keys = [(v.kernel, v.dtype, v.dim, v.flags, cc) for v in variants if v.default for cc in v.targets]
    assert len(keys) == len(set(keys)), "one deterministic default per (kernel, dtype, D, flags, target)"
    every = {(v.kernel, v.dtype, v.dim, v.flags, cc) for v in variants for cc in (90, 80)}
    assert set(keys) == every, "a case without default"


def test_static_variants_hold_the_configs_the_launchers_choose():
    kc = pytest.importorskip("vlcore.kernels.contrastive")
    kv = pytest.importorskip("vlcore.kernels.vq")
    import torch as t

    for v in kc.static_variants():
        dtype = {"bf16": t.bfloat16, "fp16": t.float16, "fp32": t.float32}[v.dtype]
        assert len(v.targets) == 1 or v.targets == (90, 80)
        fwd, bwd = kc._config(v.dim, dtype, v.constexprs["PRECISION"], interpret=False,
                              capability=(v.targets[0] // 10, v.targets[0] % 10))
        cfg = fwd if v.kernel == "contrastive.fwd" else bwd
        assert {k: cfg[k] for k in cfg if k.startswith("BLOCK")} == {k: x for k, x in v.constexprs.items()
                                                                     if k.startswith("BLOCK")}
        assert (v.num_warps, v.num_stages) == (cfg["num_warps"], cfg["num_stages"])
    nearest = [v for v in kv.static_variants() if v.kernel == "vq.nearest"]
    for tensor_cores, configs in ((True, kv._LOWP_CONFIGS), (False, kv._FP32_CONFIGS)):
        for dim in (256, 768):
            chosen = [v for v in nearest if v.dim == dim and v.dtype == ("bf16" if tensor_cores else "fp32")
                      and v.flags == "l2"]
            listed = {(v.constexprs["BLOCK_N"], v.constexprs["BLOCK_K"], v.constexprs["BLOCK_D"], v.num_warps,
                       v.num_stages) for v in chosen}
            assert set(configs) <= listed
            for cc in (90, 80):
                default = [v for v in chosen if v.default and cc in v.targets]
                want = kv.default_nearest_config(tensor_cores, dim, (cc // 10, cc % 10))
                assert len(default) == 1 and default[0].constexprs["BLOCK_D"] == want["BLOCK_D"]
                assert (default[0].num_warps, default[0].num_stages) == (want["num_warps"], want["num_stages"])


def test_default_variants_compile_for_sm90_without_spills():
    """triton.compile for sm_90 (no GPU needed) with a real launch's divisibility hints; cuobjdump's STACK is 0."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = ["vq:vq.nearest:bf16:768:l2", "vq:vq.nearest:fp32:512:cosine",
             "contrastive:contrastive.bwd_dx:bf16:768:infonce"]
    script = os.path.join(os.path.dirname(__file__), "variant_compile_check.py")
    proc = subprocess.run([sys.executable, script, "90", *specs], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert len(lines) == len(specs), proc.stdout
    for line in lines:
        assert "STACK:0 " in line, line
