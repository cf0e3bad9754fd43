"""Native checks of the GPU session (benchmarks/gpu_session.py) that are not pytest tests: each prints one line per
case and exits 0 (all passed), 1 (a case failed) or 3 (skipped: what it needs is missing here).

    python benchmarks/gpu_checks.py determinism     # dtable (and dq/dk/dv) bitwise equal across two processes
    python benchmarks/gpu_checks.py cuda-backends   # vlcore._C (backend="cuda") against the references
    python benchmarks/gpu_checks.py compile         # torch.compile(fullgraph=True) against eager

On CPU (the session's --dry-run) the same code runs at tiny fp32 shapes under the Triton interpreter, ``compile``
with the aot_eager backend (inductor would need minutes of C++ compiles there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch

SKIPPED = 3
CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernels run in the interpreter; must be set before vlcore imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32) if CUDA else (torch.float32,)
# allowed |kernel - reference| relative to max|reference|: a kernel and the reference at the same precision differ
# by a few roundings of that precision
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _report(name: str, got, want, dtype) -> bool:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-6)
    err = (got - want).abs().max().item() / scale if want.numel() else 0.0
    ok = got.shape == want.shape and err <= TOL[dtype] and not got.isnan().any().item()
    print(f"{'ok  ' if ok else 'FAIL'} {name} {str(dtype).replace('torch.', '')}: max rel err {err:.2e} "
          f"(allowed {TOL[dtype]:.0e})", flush=True)
    return ok


# ---- dtable determinism across processes ------------------------------------------------------------------------
def _relpos_grads() -> dict[str, str]:
    """sha256 of dq, dk, dv, dtable of one rel-pos attention backward (fixed seed)."""
    torch.manual_seed(0)
    b, grid, h, d = (16, (14, 14), 12, 64) if CUDA else (2, (5, 5), 2, 16)
    n, dtype = grid[0] * grid[1], torch.bfloat16 if CUDA else torch.float32
    q, k, v = (torch.randn(b, n, h, d, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), h, device=DEV, requires_grad=True)
    dout = torch.randn(b, n, h, d, device=DEV, dtype=dtype)
    out = vlcore.attention(q, k, v, rel_pos_table=table, rel_pos_grid=grid, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v, table), dout)
    return {name: hashlib.sha256(g.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, g in zip(("dq", "dk", "dv", "dtable"), grads)}


def determinism() -> int:
    env = dict(os.environ, VLCORE_DETERMINISTIC="1")
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, __file__, "_relpos-hashes"], env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"FAIL the rel-pos backward process exited {out.returncode}:\n{out.stderr[-3000:]}")
            return 1
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ok = True
    for name in runs[0]:
        same = runs[0][name] == runs[1][name]
        ok &= same
        print(f"{'ok  ' if same else 'FAIL'} {name} bitwise equal across two processes: {same} "
              f"({runs[0][name][:12]} / {runs[1][name][:12]})")
    return 0 if ok else 1


# ---- the CUDA extension against the references ------------------------------------------------------------------
def _available(op: str, name: str) -> str | None:
    backend = dispatch.get(op, name)
    return backend.environment_refusal()


def cuda_backends(require: bool) -> int:
    why = _available("contrastive_loss", "cuda") or _available("vq", "cuda")
    if why:
        print(f"{'FAIL' if require else 'skip'} backend 'cuda' unavailable: {why}")
        return 1 if require else SKIPPED
    ok = True
    torch.manual_seed(0)
    for dtype in DTYPES:
        for kind in ("infonce", "siglip"):
            x = torch.nn.functional.normalize(torch.randn(300, 256, device=DEV), dim=-1).to(dtype)
            y = torch.nn.functional.normalize(torch.randn(300, 256, device=DEV), dim=-1).to(dtype)
            results = {}
            for backend in ("cuda", "reference"):
                xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
                bias = torch.tensor(-10.0, device=DEV) if kind == "siglip" else None
                loss = vlcore.contrastive_loss(xi, yi, 10.0, kind=kind, logit_bias=bias, backend=backend)
                loss.backward()
                results[backend] = (loss.detach(), xi.grad, yi.grad)
            for part, got, want in zip(("loss", "dx", "dy"), results["cuda"], results["reference"]):
                ok &= _report(f"contrastive {kind} {part}", got, want, dtype)
        x = torch.randn(4000, 96, device=DEV).to(dtype)
        codebook = torch.randn(1000, 96, device=DEV)
        for distance in ("l2", "cosine"):
            (idx, dist), (ridx, rdist) = (vlcore.vq_nearest(x, codebook, distance=distance, backend=b)
                                          for b in ("cuda", "reference"))
            agree = (idx == ridx).float().mean().item()
            print(f"{'ok  ' if agree > 0.99 else 'FAIL'} vq {distance} {str(dtype).replace('torch.', '')}: "
                  f"{agree:.4f} of the indices agree (near-ties may differ)")
            ok &= agree > 0.99 and _report(f"vq {distance} distance", dist, rdist, dtype)
        idx = torch.randint(0, 1000, (4000,), device=DEV)
        (counts, sums), (rcounts, rsums) = (vlcore.vq_statistics(x, idx, 1000, backend=b) for b in ("cuda", "reference"))
        ok &= _report("vq statistics counts", counts, rcounts, dtype) and _report("vq statistics sums", sums, rsums,
                                                                                  dtype)
    return 0 if ok else 1


# ---- torch.compile ------------------------------------------------------------------------------------------------
def compile_check(backend: str) -> int:
    torch._dynamo.reset()
    ok = True
    b, n, h, d = (4, 200, 8, 64) if CUDA else (1, 9, 1, 16)
    grid = (14, 14) if CUDA else (3, 3)
    dtype = torch.bfloat16 if CUDA else torch.float32
    cases = {
        "attention causal": lambda q, k, v, t: vlcore.attention(q, k, v, causal=True, backend="triton"),
        "attention rel-pos": lambda q, k, v, t: vlcore.attention(q, k, v, rel_pos_table=t, rel_pos_grid=grid,
                                                                 backend="triton"),
    }
    for name, fn in cases.items():
        torch.manual_seed(0)
        n_tokens = grid[0] * grid[1] if "rel-pos" in name else n
        q, k, v = (torch.randn(b, n_tokens, h, d, device=DEV, dtype=dtype) for _ in range(3))
        t = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), h, device=DEV)
        dout = torch.randn(b, n_tokens, h, d, device=DEV, dtype=dtype)
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, t)]
            out = f(*leaves)
            out.backward(dout)
            results.append([out.detach()] + [x.grad if x.grad is not None else torch.zeros(0) for x in leaves])
        for part, got, want in zip(("out", "dq", "dk", "dv", "dtable"), results[1], results[0]):
            ok &= _report(f"compile[{backend}] {name} {part}", got, want, dtype)
    x = torch.randn(64 if CUDA else 8, 32, device=DEV, dtype=dtype)
    y = torch.randn_like(x)
    loss_fn = lambda a, c: vlcore.contrastive_loss(a, c, 10.0, backend="triton")
    ok &= _report(f"compile[{backend}] contrastive", torch.compile(loss_fn, fullgraph=True, backend=backend)(x, y),
                  loss_fn(x, y), dtype)
    codebook = torch.randn(50, 32, device=DEV)
    vq = lambda a, c: vlcore.vq_nearest(a, c, backend="triton")[1]
    ok &= _report(f"compile[{backend}] vq_nearest", torch.compile(vq, fullgraph=True, backend=backend)(x, codebook),
                  vq(x, codebook), dtype)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=["determinism", "cuda-backends", "compile", "_relpos-hashes"])
    p.add_argument("--require-cuda", action="store_true", help="cuda-backends: unavailable is a failure")
    p.add_argument("--backend", default="inductor" if CUDA else "aot_eager", help="compile: torch.compile backend")
    args = p.parse_args(argv)
    print(f"# device {DEV}" + (f" ({torch.cuda.get_device_name()})" if CUDA else " (Triton interpreter)"), flush=True)
    if args.check == "_relpos-hashes":
        print(json.dumps(_relpos_grads()))
        return 0
    if args.check == "determinism":
        return determinism()
    if args.check == "cuda-backends":
        return cuda_backends(args.require_cuda)
    return compile_check(args.backend)


if __name__ == "__main__":
    sys.exit(main())
