"""Compile the Triton contrastive kernels for NVIDIA targets without a GPU (ptxas bundled with triton).

    python tests/contrastive_compile_check.py 90:bfloat16:infonce 80:float32:siglip ...

Uses the launcher's own tile configuration (kernels/contrastive.py ``_config``), so a configuration that does
not compile for sm_80/sm_90 fails here, on a CPU-only machine. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlcore.kernels import contrastive as kc

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INTS = ["n_rows", "n_cols", "dim", "offset", "sx0", "sx1", "sy0", "sy1"]


def compile_all(cap: int, dtype: torch.dtype, kind: str, dim: int = 768) -> list[str]:
    ptr = "*" + _TRITON_TYPES[dtype]
    precision, grad_precision = kc._precisions(dtype)
    fwd_cfg, bwd_cfg = kc._config(dim, dtype, precision)
    ints = {n: "i32" for n in _INTS}
    kernels = [
        (kc._fwd_kernel, {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                          "rows_out_ptr": "*fp32", "lse_out_ptr": "*fp32", **ints}, fwd_cfg, {}),
        (kc._bwd_dx_kernel, {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "lse_ptr": "*fp32",
                             "drow_ptr": "*fp32", "dx_ptr": ptr, "partial_ptr": "*fp32", **ints, "sdx0": "i32",
                             "n_row_blocks": "i32"}, bwd_cfg, {"GRAD_PRECISION": grad_precision}),
        (kc._bwd_dy_kernel, {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "lse_ptr": "*fp32",
                             "drow_ptr": "*fp32", "dy_ptr": ptr, **ints, "sdy0": "i32"}, bwd_cfg,
         {"GRAD_PRECISION": grad_precision}),
    ]
    if kind == "infonce":
        pair_cfg = {k: v for k, v in bwd_cfg.items()}
        kernels.append((kc._bwd_pair_kernel, {"x_ptr": ptr, "y_ptr": ptr, "scale_ptr": "*fp32", "lse_row_ptr": "*fp32",
                                              "lse_col_ptr": "*fp32", "drow_ptr": "*fp32", "dcol_ptr": "*fp32",
                                              "dx_ptr": ptr, "partial_ptr": "*fp32", "n": "i32", "dim": "i32",
                                              "sx0": "i32", "sx1": "i32", "sy0": "i32", "sy1": "i32", "sdx0": "i32"},
                        pair_cfg, {"GRAD_PRECISION": grad_precision, "NO_SIGLIP": True}))
    done = []
    for fn, signature, cfg, extra in kernels:
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        constexprs.update(extra, PRECISION=precision)
        if not constexprs.pop("NO_SIGLIP", False):
            constexprs["SIGLIP"] = kind == "siglip"
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32), options=options)
        done.append(f"{fn.fn.__name__} sm_{cap} {_TRITON_TYPES[dtype]} {kind}")
    return done


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        cap, dtype, kind = spec.split(":")
        for line in compile_all(int(cap), getattr(torch, dtype), kind):
            print("compiled", line, flush=True)
