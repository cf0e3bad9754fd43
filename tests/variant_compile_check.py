"""Compile kernel variants from a module's ``static_variants()`` for an NVIDIA target without a GPU, with the
divisibility hints a real launch gets, and print each one's resource usage — through the static resource report's
own compiler and cuobjdump reader (benchmarks/kernel_resources.py).

    python tests/variant_compile_check.py 90 vq:vq.nearest:bf16:768:l2 contrastive:contrastive.bwd_dx:bf16:768:infonce

Each spec picks the deterministic-default variant of (module, kernel, dtype, D, flags). Must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from kernel_resources import compile_variant  # noqa: E402


def pick(spec: str, cap: int):
    """The default variant of ``spec`` for target ``cap`` (a per-capability default lists only its target)."""
    module, kernel, dtype, dim, flags = spec.split(":")
    mod = importlib.import_module(f"vlcore.kernels.{module}")
    found = [v for v in mod.static_variants() if v.default and v.kernel == kernel and v.dtype == dtype
             and v.dim == int(dim) and v.flags == flags and cap in v.targets]
    if len(found) != 1:
        raise SystemExit(f"{spec}: {len(found)} default variants match")
    return found[0]


if __name__ == "__main__":
    cap = int(sys.argv[1])
    for spec in sys.argv[2:]:
        r = compile_variant(pick(spec, cap), cap)
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma.sync"] else "-"
        print(f"compiled {spec} sm_{cap} REG:{r['registers']} STACK:{r['spill_bytes']} SHARED:{r['smem_bytes']} "
              f"{mma}", flush=True)
