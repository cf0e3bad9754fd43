"""kernels/attention.static_variants(): the record the resource report compiles — every config the launchers may
launch (autotune lists after pruning, the deterministic-mode fixed configs), with the real signature."""

from __future__ import annotations

import pytest
import torch
from vlcore.kernels import attention as ka


def _shape(v):
    return (v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"], v.num_warps, v.num_stages)


def test_variants_cover_every_kernel_dtype_dim_and_the_fixed_configs():
    variants = ka.static_variants()
    assert {v.kernel for v in variants} == {"attention.fwd", "attention.delta", "attention.dkdv", "attention.dq"}
    assert {v.dtype for v in variants} == {"bf16", "fp16", "fp32"}
    assert {v.dim for v in variants} == {64, 128, 256}
    assert {"", "causal", "prefix,kvlen,bias"} <= {v.flags for v in variants}
    for v in variants:
        assert list(v.signature) == v.fn.arg_names, v.kernel
        assert {n for n, t in v.signature.items() if t == "constexpr"} == set(v.constexprs), v.kernel
        assert set(v.divisible) <= set(v.fn.arg_names) and "Q" in v.divisible or v.kernel == "attention.delta"
    # the fixed (deterministic-mode) config of each (kernel, dtype, dim, flags, capability) is there, marked default
    for name in ("fwd", "dkdv", "dq"):
        for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for dim, d_pad in ((64, 64), (256, 256)):
                for cap in (90, 80):
                    want = ka._gpu_fixed_shape(name, dtype, d_pad, (cap // 10, cap % 10), 128)
                    got = [_shape(v) for v in variants if v.kernel == f"attention.{name}" and v.dtype == tname
                           and v.dim == dim and v.flags == "" and v.default and cap in v.targets]
                    assert got == [want], (name, tname, dim, cap, got)
    # every autotune config the pruner keeps for D = 128 / 256 is listed
    fwd128 = {_shape(v) for v in variants if v.kernel == "attention.fwd" and v.dim == 128 and not v.default}
    assert fwd128 == {s for s in ka._FWD_SHAPES if s[0] >= 64}
    fwd256 = {_shape(v) for v in variants if v.kernel == "attention.fwd" and v.dim == 256 and not v.default}
    assert fwd256 == {s for s in ka._FWD_SHAPES_LARGE_D if s[0] >= 64}


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from vlcore.kernels import attention as ka

kernel, dtype, dim, flags = sys.argv[1:5]
variant = next(v for v in ka.static_variants() if v.kernel == "attention." + kernel and v.dtype == dtype
               and v.dim == int(dim) and v.flags == flags.replace("none", "") and v.default and 90 in v.targets)
target = GPUTarget("cuda", 90, 64)
backend = make_backend(target)
parse = getattr(backend, "parse_attr", None)
attr = parse("D") if parse is not None else [["tt.divisibility", 16]]
attrs = {(variant.fn.arg_names.index(n),): attr for n in variant.divisible}
compiled = triton.compile(ASTSource(variant.fn, variant.signature, variant.constexprs, attrs), target=target,
                          options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
ptx = compiled.asm["ptx"]
print("compiled", variant.kernel, len(compiled.asm["cubin"]), "bytes", "cp.async", ptx.count("cp.async.cg") + ptx.count("cp.async.ca"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("pick", ["fwd bf16 128 none", "dkdv bf16 128 prefix,kvlen,bias", "delta fp32 256 none"])
def test_some_variants_compile_for_sm90(pick):
    """A few default variants compile with triton.compile for sm_90 without a GPU, with their divisibility hints
    (in a process without TRITON_INTERPRET: the interpreter replaces the jit functions)."""
    _compile_for_sm90(pick)


def _compile_for_sm90(pick: str) -> str:
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, *pick.split()], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_dkdv_query_loop_is_pipelined_with_a_table():
    """With a rel-pos table the dK/dV query loop keeps its cp.async prefetch of Q and dO: the dtable sums stay in
    registers (a sliding window of diagonals) instead of a barrier-ordered read-modify-write in the loop, which
    left the loop with no cp.async at all."""
    copies = int(_compile_for_sm90("dkdv bf16 64 prefix,kvlen,bias").split("cp.async")[-1])
    assert copies > 0


def test_dq_keeps_32_row_blocks_for_large_head_dims():
    # at D = 256 a 64-row dQ block spills on sm_90 (its (64, 256) fp32 accumulator); the deterministic config
    # (32 rows, 8 warps: no spills) must also be one the autotuner may pick for many queries
    dq256 = {_shape(v) for v in ka.static_variants() if v.kernel == "attention.dq" and v.dim == 256 and not v.default}
    fixed = ka._gpu_fixed_shape("dq", torch.bfloat16, 256, (9, 0), 128)
    assert fixed[0] == 32 and fixed in dq256, (fixed, dq256)
