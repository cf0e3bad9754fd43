"""``python -m vlcore.info`` (also ``vlcore info``): versions, the CUDA extension's build, and per op which
backends are available here and why the others are not."""

from __future__ import annotations

import platform
import sys

import torch

import vlcore
from vlcore import _ext, dispatch


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError as e:
        return f"not importable ({e})"


def report() -> str:
    lines = [f"vlcore {vlcore.__version__}  (python {platform.python_version()}, {sys.platform})",
             f"torch {torch.__version__}  (CUDA build {torch.version.cuda or 'none'})",
             f"triton {_triton_version()}" + ("  [TRITON_INTERPRET=1: kernels run in the interpreter]"
                                              if dispatch.triton_interpreter() else "")]
    if torch.cuda.is_available():
        devs = ", ".join(f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                         for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA devices: {devs}")
    else:
        lines.append("CUDA devices: none")
    mod, why = _ext.load()
    if mod is None:
        lines.append(f"vlcore._C: {why}")
    else:
        b = mod.build_info()
        lines.append(f"vlcore._C: built {b['date']} with CUDA {b['cuda_version']} for sm {b['archs']} "
                     f"({b['compiler']})")
        rt = mod.runtime_info()
        if rt["error"]:
            lines.append(f"  runtime: no usable CUDA device here (cudart: {rt['error']})")
        kernels = sorted(n for n in dir(mod) if not n.startswith("_") and n not in ("build_info", "runtime_info"))
        lines.append(f"  kernels: {', '.join(kernels) if kernels else 'none'}")
    lines.append("")
    rows = dispatch.describe()
    width = max((len(r["op"]) for r in rows), default=2)
    lines.append(f"{'op':<{width}}  {'backend':<10} {'status':<11} devices / dtypes / why not")
    for r in rows:
        status = "available" if r["available"] else "unavailable"
        detail = f"{r['devices']} / {r['dtypes']}" + (f" / {r['why_not']}" if r["why_not"] else "")
        lines.append(f"{r['op']:<{width}}  {r['backend']:<10} {status:<11} {detail}")
    lines.append("")
    lines.append("Automatic choice: CUDA tensors -> the highest-priority available backend that accepts the inputs; "
                 "CPU tensors -> cpu when it accepts them, else reference. Override with backend=... or "
                 "VLCORE_BACKEND.")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
