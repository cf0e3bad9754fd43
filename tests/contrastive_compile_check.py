"""Compile the Triton contrastive kernels for NVIDIA targets without a GPU (ptxas bundled with triton).

    python tests/contrastive_compile_check.py 90:bfloat16:infonce 80:float32:siglip ...

Uses the launcher's own tile configurations (kernels/contrastive.py ``static_variants``, built from ``_config``),
so a configuration that does not compile for sm_80/sm_90 fails here, on a CPU-only machine. Must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import sys

import torch
from vlcore.kernels import contrastive as kc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from kernel_resources import compile_variant  # noqa: E402

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_all(cap: int, dtype: torch.dtype, kind: str, dim: int = 768) -> list[str]:
    """Compile every kernel a launch of (dtype, kind, D) uses: the launcher's own variants (static_variants)."""
    precision, _ = kc._precisions(dtype)
    flags = kind + (",tf32" if dtype == torch.float32 and precision == "tf32" else "")
    done = []
    for v in kc.static_variants(dims=(dim,)):
        if v.dtype == _TRITON_TYPES[dtype] and v.flags == flags and cap in v.targets:
            compile_variant(v, cap)
            done.append(f"{v.fn.fn.__name__} sm_{cap} {v.dtype} {kind}")
    return done


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        cap, dtype, kind = spec.split(":")
        for line in compile_all(int(cap), getattr(torch, dtype), kind):
            print("compiled", line, flush=True)
