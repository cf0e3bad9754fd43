"""Masked attention (PrefixLM, causal, full, padded) forward/backward: vlcore vs SDPA, FlexAttention, xformers.

    python benchmarks/bench_attention.py            # GPU: B·N = 16k tokens, N 512-8192, H·D 1024/2048, D 64/128, bf16
                                                    # CPU: B 4, H 8, D 64, N 128/256/512, fp32, 2 threads
    python benchmarks/bench_attention.py --quick    # tiny CPU smoke run (Triton interpreter, reference, SDPA math)
    python benchmarks/bench_attention.py --kinds prefix,causal --n 2048,4096
    pytest benchmarks/ --benchmark-only -k attention   # the same cases under pytest-benchmark

Cases: ``prefix`` (PrefixLM, random per-sample prefix lengths in [0, N]), ``causal``, ``full``, ``padded`` (random
per-sample kv lengths in [N/2, N]). Providers:
  vlcore-triton            vlcore.attention(..., backend="triton"): masks as parameters, no mask tensor
  vlcore-cpu               vlcore.attention(..., backend="cpu"): SDPA's CPU kernels, mask built once per call
  vlcore-reference         the PyTorch reference (materialises (B, H, N, N) scores; small cases only)
  sdpa (dense mask)        F.scaled_dot_product_attention with torch's own kernel choice and a boolean (B, 1, N, N)
                           mask built every call (is_causal for causal): what a user writes (the CPU target's peer)
  sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math
                           F.scaled_dot_product_attention restricted to that backend: is_causal for causal, nothing
                           for full, an explicit boolean (B, 1, N, N) mask for prefix/padded (built every call, as
                           per-batch lengths require); a backend that refuses the case is reported, not dropped
  flex (+block mask)       torch.compile'd flex_attention with create_block_mask rebuilt for every batch (counted)
  flex (cached mask)       the same with the block mask built once outside the timing; on CPU forward only
                           (FlexAttention has no CPU backward) and at the CPU target shape only (each shape
                           compiles C++ for ~50 s on 2 cores)
  xformers                 memory_efficient_attention (LowerTriangularMask for causal, a dense bias otherwise)
TFLOP/s counts only the unmasked FLOPs (4·D per visible (query, key) pair forward, 2.5× that backward).
Targets (ANCHORS.md, issue 3, H100 bf16): PrefixLM fwd+bwd ≥ 1.2× flex (+block mask); causal fwd+bwd ≥ 0.9×
sdpa-flash; forward ≥ 50 % of dense bf16 peak at D = 128, N ≥ 4096; peak memory linear in N.
CPU target (issue 19): PrefixLM B 4, N 256, H 8, D 64, fp32 fwd+bwd, 2 threads: vlcore-cpu ≥ 1.0× sdpa (dense mask).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if "--quick" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU smoke run executes the Triton kernels interpreted

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import DTYPES, Bench, Suite, Unsupported, default_device  # noqa: E402

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


def _sdpa(backend_name: str | None):
    """SDPA restricted to one backend (None: torch's own choice); prefix/padded masks built every call."""
    def factory(case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def restrict():
            return contextlib.nullcontext() if backend_name is None else sdpa_kernel(getattr(SDPBackend, backend_name))

        q, k, v = _inputs(case)
        device = q.device
        kind = case["kind"]
        if device.type == "cpu" and backend_name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            raise Unsupported(f"SDPA's {backend_name.lower()} backend runs on CUDA only")
        if backend_name == "MATH" and case["B"] * case["H"] * case["N"] ** 2 > 2**28:
            raise Unsupported("SDPA's math backend would materialise (B, H, N, N) scores of more than 2^28 elements")

        def run():
            mask = _bool_mask(case, device) if kind in ("prefix", "padded") else None
            with restrict():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask, is_causal=kind == "causal")
            return out.transpose(1, 2)

        try:
            run()
        except RuntimeError as e:  # this backend refuses the case (no kernel for it): a refusal, not an error
            raise Unsupported(f"SDPA {backend_name}: {str(e).splitlines()[0][:200]}") from None
        return Bench(fwd=run, inputs=[q, k, v])
    return factory


_FLEX = {}


def _flex(rebuild_mask: bool):
    def factory(case):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unsupported(f"FlexAttention is not available ({e})") from None
        on_cpu = default_device().type == "cpu"
        if on_cpu and any(case.get(k) != v for k, v in TARGET.items()):
            raise Unsupported("on CPU FlexAttention runs at the target shape (prefix, B 4, N 256, H 8, D 64, fp32) "
                              "only: ~50 s of C++ compilation per shape on 2 cores")
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        flex = _FLEX["fn"]
        q, k, v = _inputs(case)
        if on_cpu:  # FlexAttention refuses inputs that require grad on CPU: forward only
            q, k, v = (t.detach() for t in (q, k, v))
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

        return Bench(fwd=run, inputs=[] if on_cpu else [q, k, v], setup=setup,
                     no_backward="FlexAttention does not support backward on CPU" if on_cpu else "")
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


def cases(size, opts):
    kinds = opts["kinds"].split(",") if opts.get("kinds") else KINDS
    if size == "quick":
        return [{"kind": kind, "B": 2, "N": 64, "H": 2, "D": 32, "dtype": "fp32"} for kind in kinds]
    if size == "cpu":  # the issue-19 shape (B 4, N 256, H 8, D 64, fp32) and its neighbours in N
        ns = [int(x) for x in opts["n"].split(",")] if opts.get("n") else [128, 256, 512]
        kinds = opts["kinds"].split(",") if opts.get("kinds") else ("prefix", "causal")
        return [{"kind": kind, "B": 4, "N": n, "H": 8, "D": 64, "dtype": opts.get("dtype") or "fp32"}
                for kind in kinds for n in ns]
    ns = [int(x) for x in opts["n"].split(",")] if opts.get("n") else [512, 1024, 2048, 4096, 8192]
    out = []
    for kind in kinds:
        for h, d in ((16, 64), (8, 128), (32, 64), (16, 128)):  # H·D = 1024, 1024, 2048, 2048
            for n in ns:
                out.append({"kind": kind, "B": max(16384 // n, 1), "N": n, "H": h, "D": d,
                            "dtype": opts.get("dtype") or "bf16"})
    return out


PROVIDERS = {
    "vlcore-triton": _vlcore(dispatch.TRITON),
    "vlcore-cpu": _vlcore(dispatch.CPU),
    "vlcore-reference": _vlcore(dispatch.REFERENCE),
    "sdpa (dense mask)": _sdpa(None),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
    "flex (+block mask)": _flex(rebuild_mask=True),
    "flex (cached mask)": _flex(rebuild_mask=False),
    "xformers": _xformers,
}
TARGET = {"kind": "prefix", "B": 4, "N": 256, "H": 8, "D": 64, "dtype": "fp32"}


def paired(mode: str, rounds: int = 15) -> dict[str, float]:
    """vlcore-cpu and sdpa (dense mask) at the target shape, their calls interleaved (A B A B ...) so that both
    see the same load: the minimum of each, and the median over rounds of the round's ratio sdpa / vlcore (a
    paired statistic: load that changes between rounds cancels). On a shared machine rows measured one after the
    other can land in different load; this is the fair comparison."""
    steps = {name: harness._make_step(PROVIDERS[name](TARGET), mode) for name in ("vlcore-cpu", "sdpa (dense mask)")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [s / v for s, v in zip(times["sdpa (dense mask)"], times["vlcore-cpu"])]
    return {**{name: min(ts) for name, ts in times.items()}, "median_ratio": statistics.median(ratios)}


def summary(rows):
    """The CPU target: sdpa (dense mask) time / vlcore-cpu time at the target shape — from the table's rows and
    from an interleaved re-measurement (:func:`paired`), both as the minimum over the repeats."""
    lines = []
    for mode in ("fwd", "fwd_bwd"):
        pick = {r["provider"]: r["min_ms"] for r in rows if r["mode"] == mode and r["provider"] in
                ("vlcore-cpu", "sdpa (dense mask)") and all(r.get(k) == v for k, v in TARGET.items())}
        if len(pick) != 2 or not pick["vlcore-cpu"] > 0:
            continue
        best = paired(mode)
        lines.append(f"- {mode}: table {pick['sdpa (dense mask)']:.2f} / {pick['vlcore-cpu']:.2f} ms = "
                     f"{pick['sdpa (dense mask)'] / pick['vlcore-cpu']:.2f}×; interleaved, 15 rounds: "
                     f"{best['sdpa (dense mask)']:.2f} / {best['vlcore-cpu']:.2f} ms = "
                     f"{best['sdpa (dense mask)'] / best['vlcore-cpu']:.2f}×, median of the rounds' ratios "
                     f"**{best['median_ratio']:.2f}×**")
    if not lines:
        return ""
    return ("CPU target (issue 19: PrefixLM B 4, N 256, H 8, D 64, fp32, ≥ 1.0×): sdpa (dense mask) / vlcore-cpu, "
            f"min of repeats, {torch.get_num_threads()} threads:\n" + "\n".join(lines))


def _modes(size):
    return ("fwd", "fwd_bwd") if size == "cpu" else harness.MODES


SUITE = Suite("attention", "Masked attention (PrefixLM, causal, full, padded)", x="N", cases=cases,
              providers=PROVIDERS, modes=_modes, flops=flops, along=("B",), summary=summary,
              reps={"quick": 2, "cpu": 5, "gpu": 10}, warmup={"quick": 1, "cpu": 1, "gpu": 3})


def _add_args(parser):
    parser.add_argument("--kinds", default="", help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--n", default="", help="comma-separated sequence lengths")
    parser.add_argument("--dtype", default="", choices=["", *sorted(DTYPES)], help="default bf16 (gpu), fp32 (cpu)")


def main(argv=None):
    if "--quick" in (argv if argv is not None else sys.argv) and not torch.cuda.is_available():
        for name in ("flex (+block mask)", "flex (cached mask)"):  # C++ compilation: too slow for a smoke run
            PROVIDERS[name] = _skip("FlexAttention compiles C++ on CPU: not in the quick smoke run")
    harness.main(SUITE, argv, _add_args)


def _skip(reason):
    def factory(case):
        raise Unsupported(reason)
    return factory


if __name__ == "__main__":
    main()
