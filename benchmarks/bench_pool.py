"""Attentional pooling (CoCa): vlcore's pooler and its shared-query attention vs the open_clip-style module.

    python benchmarks/bench_pool.py            # GPU: n_query 1 / 256 / 256+1, context 196-1024, width 768-1408, bf16
    python benchmarks/bench_pool.py --quick    # tiny CPU smoke run (Triton interpreter, reference, open_clip-style)
    python benchmarks/bench_pool.py --size cpu # CPU sizes: B 4, N 196/576, width 768, fp32 (default without CUDA)

Two kinds of work:
  ``attention``  the attention alone on projected q (one shared query set), k, v (B, N, H, 64): vlcore.attention
                 with batch-shared queries vs SDPA on the query set expanded over the batch. GB/s counts the
                 bytes that must move (K and V read once, the output written): the n_query = 1 case is bandwidth
                 bound, its target is >= 70 % of HBM bandwidth.
  ``module``     the whole pooler forward (+ backward): vlcore.nn.MultiAttentionPool (one launch for all query sets,
                 context LayerNorm and K/V projection shared) vs open_clip's AttentionalPooler (LayerNorm +
                 nn.MultiheadAttention -> SDPA), one module per query set as open_clip's CoCa has.
Providers: vlcore-triton, vlcore-cpu, vlcore-reference, open_clip (when importable) or open_clip-style (reimpl.), sdpa
(attention work only). Target (ANCHORS.md, issue 4, H100 bf16): n_query = 256 module >= 1.3x open_clip's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if "--quick" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU smoke run executes the Triton kernels interpreted

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import DTYPES, Bench, Suite, Unsupported, default_device  # noqa: E402

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402

HEAD_DIM = 64


def _queries(case) -> tuple[int, ...]:
    return tuple(int(x) for x in str(case["n_query"]).split("+"))


def _refuse(backend, case):
    problem = dispatch.Problem(default_device(), DTYPES[case["dtype"]], {
        "head_dim": HEAD_DIM, "nq": sum(_queries(case)), "nk": case["N"], "shared_q": True, "causal": False,
        "prefix": False, "padding": False, "rel_pos": False})
    reasons = dispatch.get("attention", backend).refusals(problem)
    if reasons:
        raise Unsupported("; ".join(reasons))


def _context(case):
    gen = torch.Generator(device=default_device()).manual_seed(0)
    x = torch.randn(case["B"], case["N"], case["width"], device=default_device(), generator=gen)
    return x.to(DTYPES[case["dtype"]]).requires_grad_()


def _qkv(case):
    gen = torch.Generator(device=default_device()).manual_seed(0)
    heads, dtype, dev = case["width"] // HEAD_DIM, DTYPES[case["dtype"]], default_device()
    q = torch.randn(1, sum(_queries(case)), heads, HEAD_DIM, device=dev, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(case["B"], case["N"], heads, HEAD_DIM, device=dev, generator=gen).to(dtype).requires_grad_()
            for _ in range(2))
    return q, k, v


def bytes_moved(case, mode):
    """Bytes the attention must move at least (forward): K, V read once, queries and output."""
    if case["work"] != "attention" or mode != "fwd":
        return float("nan")
    elem = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    nq = sum(_queries(case))
    return elem * case["width"] * (2 * case["B"] * case["N"] + nq + case["B"] * nq)


def flops(case, mode):
    if case["work"] != "attention":
        return float("nan")
    fwd = 4.0 * case["B"] * sum(_queries(case)) * case["N"] * case["width"]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def _vlcore(backend):
    def factory(case):
        _refuse(backend, case)
        dtype = DTYPES[case["dtype"]]
        if case["work"] == "attention":
            q, k, v = _qkv(case)
            return Bench(fwd=lambda: vlcore.attention(q, k, v, backend=backend), inputs=[q, k, v])
        pool = vlcore.nn.MultiAttentionPool(case["width"], _queries(case), heads=case["width"] // HEAD_DIM,
                                            backend=backend).to(default_device(), dtype)
        x = _context(case)
        return Bench(fwd=lambda: pool(x), inputs=[x, *pool.parameters()])
    return factory


class OpenClipStylePooler(nn.Module):
    """open_clip.transformer.AttentionalPooler, reimplemented: LayerNorm(context), LayerNorm(queries),
    nn.MultiheadAttention (separate q / kv projections, SDPA inside)."""

    def __init__(self, d_model, context_dim, n_head, n_queries):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]


def _open_clip_cls(reimplemented: bool):
    if reimplemented:
        return OpenClipStylePooler
    try:
        from open_clip.transformer import AttentionalPooler
    except ImportError as e:
        raise Unsupported(f"open_clip is not importable ({e}); see open_clip-style (reimpl.)") from None
    return lambda d, c, h, n: AttentionalPooler(d, c, n_head=h, n_queries=n)


def _open_clip(reimplemented):
    def factory(case):
        if case["work"] != "module":
            raise Unsupported("module work only (see sdpa for the attention alone)")
        cls = _open_clip_cls(reimplemented)
        width, dtype = case["width"], DTYPES[case["dtype"]]
        pools = [cls(width, width, width // HEAD_DIM, n).to(default_device(), dtype) for n in _queries(case)]
        x = _context(case)
        params = [p for pool in pools for p in pool.parameters()]
        return Bench(fwd=lambda: tuple(pool(x) for pool in pools), inputs=[x, *params])
    return factory


def _sdpa(case):
    if case["work"] != "attention":
        raise Unsupported("attention work only")
    q, k, v = _qkv(case)

    def run():  # the query set expanded over the batch (a view), (B, H, N, D) views for SDPA
        qb = q.expand(case["B"], -1, -1, -1)
        return F.scaled_dot_product_attention(qb.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return Bench(fwd=run, inputs=[q, k, v])


def cases(size, opts):
    if size == "quick":
        return [{"work": w, "n_query": nq, "B": 2, "N": 40, "width": 128, "dtype": "fp32"}
                for w in ("attention", "module") for nq in ("1", "6+1")]
    if size == "cpu":
        return [{"work": w, "n_query": nq, "B": 4, "N": n, "width": 768, "dtype": opts.get("dtype") or "fp32"}
                for w in ("attention", "module") for nq in ("1", "256+1") for n in (196, 576)]
    out = []
    for work in ("attention", "module"):
        for nq in ("1", "256", "256+1"):
            for n in (196, 576, 1024):
                for width in (768, 1408):
                    out.append({"work": work, "n_query": nq, "B": 128, "N": n, "width": width,
                                "dtype": opts.get("dtype") or "bf16"})
    return out


PROVIDERS = {
    "vlcore-triton": _vlcore(dispatch.TRITON),
    "vlcore-cpu": _vlcore(dispatch.CPU),
    "vlcore-reference": _vlcore(dispatch.REFERENCE),
    "open_clip": _open_clip(reimplemented=False),
    "open_clip-style (reimpl.)": _open_clip(reimplemented=True),
    "sdpa": _sdpa,
}

SUITE = Suite("pool", "Attentional pooling (CoCa)", x="N", cases=cases, providers=PROVIDERS, flops=flops,
              bytes_moved=bytes_moved, modes=lambda size: ("fwd", "fwd_bwd") if size == "cpu" else harness.MODES,
              reps={"quick": 2, "cpu": 3, "gpu": 10}, warmup={"quick": 1, "cpu": 1, "gpu": 3})


def _add_args(parser):
    parser.add_argument("--dtype", default="", choices=["", *sorted(DTYPES)], help="default bf16 (gpu), fp32 (cpu)")


def main(argv=None):
    harness.main(SUITE, argv, _add_args)


if __name__ == "__main__":
    main()
