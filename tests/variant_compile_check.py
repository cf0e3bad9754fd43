"""Compile kernel variants from a module's ``static_variants()`` for an NVIDIA target without a GPU, with the
divisibility hints a real launch gets, and print each one's resource usage (bundled cuobjdump).

    python tests/variant_compile_check.py 90 vq:vq.nearest:bf16:768:l2 contrastive:contrastive.bwd_dx:bf16:768:infonce

Each spec picks the deterministic-default variant of (module, kernel, dtype, D, flags). Must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_variant(v, cap: int):
    names = list(v.signature)  # the kernel's argument order
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in v.divisible}
    src = ASTSource(v.fn, v.signature, v.constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": v.num_warps, "num_stages": v.num_stages})


def resources(compiled) -> str:
    """'REG:n STACK:n SHARED:n ...' from cuobjdump, or why not."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        except OSError as err:
            return f"(no cuobjdump: {err})"
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", out)
    return m.group(0) if m else "(no resource line)"


def pick(spec: str):
    module, kernel, dtype, dim, flags = spec.split(":")
    mod = importlib.import_module(f"vlcore.kernels.{module}")
    found = [v for v in mod.static_variants() if v.default and v.kernel == kernel and v.dtype == dtype
             and v.dim == int(dim) and v.flags == flags]
    if len(found) != 1:
        raise SystemExit(f"{spec}: {len(found)} default variants match")
    return found[0]


if __name__ == "__main__":
    cap = int(sys.argv[1])
    for spec in sys.argv[2:]:
        v = pick(spec)
        compiled = compile_variant(v, cap)
        mma = "wgmma" if "wgmma" in compiled.asm["ptx"] else "mma.sync" if "mma.sync" in compiled.asm["ptx"] else "-"
        print(f"compiled {spec} sm_{cap} {resources(compiled)} dynamic-shared:{compiled.metadata.shared} {mma}",
              flush=True)
