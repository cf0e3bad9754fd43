"""Compile the Triton attention kernels for NVIDIA targets without a GPU (ptxas bundled with triton).

    python tests/attention_compile_check.py 90:bfloat16:64:causal,prefix,kvlen,bias [--all-configs] ...

Each spec is cap:dtype:head_dim:flags (flags from causal, prefix, kvlen, bias). By default every kernel compiles
with its smallest tile config (fast); --all-configs compiles every autotune config the launcher may pick for that
problem (slow: minutes). Type errors, layout/lowering failures (tl.gather, dot precisions) and shared-memory
overruns surface here on a CPU-only machine. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlcore.kernels import attention as ka


def compile_spec(cap: int, dtype: torch.dtype, head_dim: int, flags: set[str], all_configs: bool) -> list[str]:
    meta = ka._flag_meta(head_dim, dtype, ",".join(flags))
    prune_args = {"Q_BUCKET": 128, "HAS_BIAS": meta["HAS_BIAS"]}
    done = []
    prune_args["D_PAD"] = meta["D_PAD"]
    for fn, shapes, large, skew, prune in (
            (ka._fwd_kernel, ka._FWD_SHAPES, ka._FWD_SHAPES_LARGE_D, False, ka._PRUNERS["fwd"]),
            (ka._dq_kernel, ka._DQ_SHAPES, ka._DQ_SHAPES_LARGE_D, False, ka._PRUNERS["dq"]),
            (ka._dkdv_kernel, ka._DKDV_SHAPES, ka._DKDV_SHAPES_LARGE_D, True, ka._PRUNERS["dkdv"])):
        configs = _configs(list(dict.fromkeys(shapes + large)), skew)
        configs = prune(configs, {}, **prune_args)
        if not all_configs:
            configs = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        for cfg in configs:
            constexprs = dict(meta, **cfg.kwargs)
            src = ASTSource(fn, ka.kernel_signature(fn, dtype, constexprs), constexprs)
            triton.compile(src, target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            done.append(f"{fn.fn.__name__} sm_{cap} {ka._TYPE_NAMES[dtype]} d{head_dim} {sorted(flags)} {cfg.kwargs}")
    return done


def _configs(shapes, skew):
    out = []
    for bm, bn, warps, stages in shapes:
        kw = {"BLOCK_M": bm, "BLOCK_N": bn}
        if skew:  # the dK/dV kernel: dtable skew width and register accumulator (a 16×16 grid's table)
            kw["SKEW_W"] = triton.next_power_of_2(bm + bn - 1)
            kw["T_PAD"] = ka._table_pad(961)
            kw["ACC_IN_REGS"] = True
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


if __name__ == "__main__":
    every = "--all-configs" in sys.argv
    for spec in [a for a in sys.argv[1:] if not a.startswith("--")]:
        cap, dtype, dim, flags = spec.split(":")
        for line in compile_spec(int(cap), getattr(torch, dtype), int(dim), set(filter(None, flags.split(","))),
                                 every):
            print("compiled", line, flush=True)
