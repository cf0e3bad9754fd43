"""Masked attention (PrefixLM, causal, full, padded) forward/backward: vlcore vs SDPA, FlexAttention, xformers.

    python benchmarks/bench_attention.py            # GPU: B·N = 16k tokens, N 512-8192, H·D 1024/2048, D 64/128, bf16
    python benchmarks/bench_attention.py --quick    # tiny CPU smoke run (Triton interpreter, reference, SDPA math)
    python benchmarks/bench_attention.py --kinds prefix,causal --n 2048,4096

Cases: ``prefix`` (PrefixLM, random per-sample prefix lengths in [0, N]), ``causal``, ``full``, ``padded`` (random
per-sample kv lengths in [N/2, N]). Providers:
  vlcore-triton            vlcore.attention(..., backend="triton"): masks as parameters, no mask tensor
  vlcore-reference         the PyTorch reference (materialises (B, H, N, N) scores; small cases only)
  sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math
                           F.scaled_dot_product_attention restricted to that backend: is_causal for causal, nothing
                           for full, an explicit boolean (B, 1, N, N) mask for prefix/padded (built every call, as
                           per-batch lengths require); a backend that refuses the case is reported, not dropped
  flex (+block mask)       torch.compile'd flex_attention with create_block_mask rebuilt for every batch (counted)
  flex (cached mask)       the same with the block mask built once outside the timing
  xformers                 memory_efficient_attention (LowerTriangularMask for causal, a dense bias otherwise)
TFLOP/s counts only the unmasked FLOPs (4·D per visible (query, key) pair forward, 2.5× that backward).
Targets (ANCHORS.md, issue 3, H100 bf16): PrefixLM fwd+bwd ≥ 1.2× flex (+block mask); causal fwd+bwd ≥ 0.9×
sdpa-flash; forward ≥ 50 % of dense bf16 peak at D = 128, N ≥ 4096; peak memory linear in N.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if "--quick" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU smoke run executes the Triton kernels interpreted

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DTYPES, Bench, Unsupported, arg_parser, default_device, finish, select_providers, sweep  # noqa: E402

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402
from vlcore.reference import attention as ref  # noqa: E402

KINDS = ("prefix", "causal", "full", "padded")


def _lengths(case, device):
    """(prefix_lens, kv_lens) of the case: random per sample, fixed by the seed."""
    gen = torch.Generator().manual_seed(1)
    b, n = case["B"], case["N"]
    prefix = torch.randint(0, n + 1, (b,), generator=gen) if case["kind"] == "prefix" else None
    kv = torch.randint(n // 2, n + 1, (b,), generator=gen) if case["kind"] == "padded" else None
    return (None if prefix is None else prefix.to(device)), (None if kv is None else kv.to(device))


def _inputs(case):
    device, dtype = default_device(), DTYPES[case["dtype"]]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case["B"], case["N"], case["H"], case["D"])
    return [torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def visible_pairs(case) -> int:
    """Number of (query, key) pairs the mask leaves visible, summed over the batch."""
    n, b = case["N"], case["B"]
    prefix, kv = _lengths(case, torch.device("cpu"))
    if case["kind"] == "full":
        return b * n * n
    if case["kind"] == "causal":
        return b * n * (n + 1) // 2
    if case["kind"] == "padded":
        return int(kv.sum()) * n
    total = 0
    for p in prefix.tolist():  # row i sees max(p, i + 1) keys
        total += p * p + n * (n + 1) // 2 - p * (p + 1) // 2
    return total


def flops(case, mode):
    fwd = 4.0 * case["H"] * case["D"] * visible_pairs(case)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def _mask_kwargs(case):
    prefix, kv = _lengths(case, default_device())
    return {"causal": case["kind"] == "causal", "prefix_lens": prefix, "kv_lens": kv}


def _vlcore(backend):
    def factory(case):
        device, dtype = default_device(), DTYPES[case["dtype"]]
        kw = _mask_kwargs(case)
        problem = dispatch.Problem(device, dtype, {
            "head_dim": case["D"], "nq": case["N"], "nk": case["N"], "shared_q": False, "causal": kw["causal"],
            "prefix": kw["prefix_lens"] is not None, "padding": kw["kv_lens"] is not None, "rel_pos": False})
        reasons = dispatch.get("attention", backend).refusals(problem)
        if reasons:
            raise Unsupported("; ".join(reasons))
        if backend == dispatch.REFERENCE and case["B"] * case["H"] * case["N"] ** 2 > 2**28:
            raise Unsupported("the reference would materialise (B, H, N, N) scores of more than 2^28 elements")
        q, k, v = _inputs(case)
        return Bench(fwd=lambda: vlcore.attention(q, k, v, backend=backend, **kw), inputs=[q, k, v])
    return factory


def _bool_mask(case, device):
    """(B, 1, N, N) boolean mask (True = attend): what SDPA and xformers need for prefix/padded batches."""
    prefix, kv = _lengths(case, device)
    return ref.visibility_mask(case["B"], case["N"], case["N"], device, prefix_lens=prefix, kv_lens=kv)[:, None]


def _sdpa(backend_name):
    def factory(case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        q, k, v = _inputs(case)
        device = q.device
        kind = case["kind"]

        def run():
            mask = _bool_mask(case, device) if kind in ("prefix", "padded") else None
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask, is_causal=kind == "causal")
            return out.transpose(1, 2)

        run()  # raises here (recorded as the row's note) when this backend refuses the case
        return Bench(fwd=run, inputs=[q, k, v])
    return factory


_FLEX = {}


def _flex(rebuild_mask: bool):
    def factory(case):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unsupported(f"FlexAttention is not available ({e})") from None
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        flex = _FLEX["fn"]
        q, k, v = _inputs(case)
        device = q.device
        prefix, kv = _lengths(case, device)
        kind, b, n = case["kind"], case["B"], case["N"]
        mask_mod = {
            "causal": lambda b_, h, qi, ki: ki <= qi,
            "prefix": lambda b_, h, qi, ki: (ki <= qi) | (ki < prefix[b_]),
            "padded": lambda b_, h, qi, ki: ki < kv[b_],
        }.get(kind)

        def build():
            if mask_mod is None:
                return None
            return create_block_mask(mask_mod, b, None, n, n, device=device, _compile=device.type == "cuda")

        state = {"mask": build()}

        def setup():
            if rebuild_mask:
                state["mask"] = build()

        def run():
            out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=state["mask"])
            return out.transpose(1, 2)

        return Bench(fwd=run, inputs=[q, k, v], setup=setup)
    return factory


def _xformers(case):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise Unsupported(f"xformers is not importable ({e})") from None
    q, k, v = _inputs(case)
    kind = case["kind"]
    if kind == "causal":
        bias = xops.LowerTriangularMask()
    elif kind == "full":
        bias = None
    else:  # no prefix-LM bias class: a dense additive bias, built every call like the SDPA mask
        bias = "dense"

    def run():
        b = bias
        if b == "dense":
            mask = _bool_mask(case, q.device).expand(-1, case["H"], -1, -1)
            b = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        return xops.memory_efficient_attention(q, k, v, attn_bias=b)

    return Bench(fwd=run, inputs=[q, k, v])


def cases(args):
    kinds = args.kinds.split(",") if args.kinds else KINDS
    if args.quick:
        return [{"kind": kind, "B": 2, "N": 64, "H": 2, "D": 32, "dtype": "fp32"} for kind in kinds]
    ns = [int(x) for x in args.n.split(",")] if args.n else [512, 1024, 2048, 4096, 8192]
    out = []
    for kind in kinds:
        for h, d in ((16, 64), (8, 128), (32, 64), (16, 128)):  # H·D = 1024, 1024, 2048, 2048
            for n in ns:
                out.append({"kind": kind, "B": max(16384 // n, 1), "N": n, "H": h, "D": d, "dtype": args.dtype})
    return out


def main(argv=None):
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="", help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--n", default="", help="comma-separated sequence lengths")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    providers = {
        "vlcore-triton": _vlcore(dispatch.TRITON),
        "vlcore-reference": _vlcore(dispatch.REFERENCE),
        "sdpa-flash": _sdpa("FLASH_ATTENTION"),
        "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
        "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
        "flex (+block mask)": _flex(rebuild_mask=True),
        "flex (cached mask)": _flex(rebuild_mask=False),
        "xformers": _xformers,
    }
    if args.quick:
        providers["sdpa-math"] = _sdpa("MATH")
        if not torch.cuda.is_available():  # FlexAttention needs torch.compile with a C++ toolchain on CPU: skip
            providers = {k: p for k, p in providers.items() if not k.startswith("flex")}
    providers = select_providers(providers, args.providers)
    rows = sweep("attention", cases(args), providers, flops=flops, reps=2 if args.quick else 10,
                 warmup=1 if args.quick else 3)
    finish(args, "attention", rows, x="N", title="Masked attention (PrefixLM, causal, full, padded)")


if __name__ == "__main__":
    main()
