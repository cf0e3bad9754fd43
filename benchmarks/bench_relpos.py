"""Attention with a learnable 2-D relative position table (Swin/BEiT/SimVLM): vlcore vs dense bias and FlexAttention.

    python benchmarks/bench_relpos.py            # GPU: grids 14², 16², 24², 32², with and without text, bf16
    python benchmarks/bench_relpos.py --quick    # tiny CPU smoke run (Triton interpreter, reference, dense + SDPA)
    python benchmarks/bench_relpos.py --size cpu # CPU sizes: grids 7² and 14², H 8, D 64, fp32 (default without CUDA)

The image grid comes first, then ``text`` tokens; with text, a PrefixLM mask (SimVLM encoder: image + a random
per-sample text prefix bidirectional, the rest causal). The table ((2gh−1)(2gw−1), H) receives a gradient in
``bwd``/``fwd_bwd``. Providers:
  vlcore-triton          vlcore.attention(rel_pos_table=...): the table is read inside the kernel, dtable summed
                         deterministically, no N×N tensor
  vlcore-cpu             vlcore.attention(..., backend="cpu"): the table gathered once per call, SDPA's CPU kernels
  vlcore-reference       the PyTorch reference (small cases only)
  timm-dense+sdpa        timm/Swin: table[relative_position_index] gathered into a dense (H, N, N) bias every step
                         (+ the prefix mask as −inf), F.scaled_dot_product_attention(attn_mask=bias); the table's
                         gradient flows through autograd's index backward
  flex-score_mod         FlexAttention with a score_mod adding the captured learnable table (its gradient is
                         accumulated atomically) and, with text, a block mask built every step
  xformers-dense         memory_efficient_attention with the same dense bias, when importable
Targets (ANCHORS.md, issue 4, H100 bf16): fwd+bwd ≥ 2× timm-dense+sdpa and ≥ 1.3× flex-score_mod; no N×N
allocation (peak memory column); dtable bitwise deterministic (tests/test_relpos_kernels.py).
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
import harness  # noqa: E402
from harness import DTYPES, Bench, Suite, Unsupported, default_device  # noqa: E402

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402
from vlcore.reference import attention as ref  # noqa: E402


def _n(case):
    return case["gh"] * case["gw"] + case["text"]


def _prefix(case, device):
    """SimVLM encoder: image + a random text prefix per sample is bidirectional (None without text)."""
    if not case["text"]:
        return None
    g = case["gh"] * case["gw"]
    gen = torch.Generator().manual_seed(1)
    return torch.randint(g, g + case["text"] + 1, (case["B"],), generator=gen).to(device)


def _inputs(case):
    device, dtype = default_device(), DTYPES[case["dtype"]]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case["B"], _n(case), case["H"], case["D"])
    q, k, v = (torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    size = (2 * case["gh"] - 1) * (2 * case["gw"] - 1)
    table = (0.02 * torch.randn(size, case["H"], device=device, generator=gen)).to(dtype).requires_grad_()
    return q, k, v, table


def flops(case, mode):
    n, b = _n(case), case["B"]
    prefix = _prefix(case, torch.device("cpu"))
    pairs = b * n * n if prefix is None else sum(p * p + n * (n + 1) // 2 - p * (p + 1) // 2 for p in prefix.tolist())
    fwd = 4.0 * case["H"] * case["D"] * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def _vlcore(backend):
    def factory(case):
        device, dtype = default_device(), DTYPES[case["dtype"]]
        n = _n(case)
        prefix = _prefix(case, device)
        problem = dispatch.Problem(device, dtype, {
            "head_dim": case["D"], "nq": n, "nk": n, "shared_q": False, "causal": False,
            "prefix": prefix is not None, "padding": False, "rel_pos": True})
        reasons = dispatch.get("attention", backend).refusals(problem)
        if reasons:
            raise Unsupported("; ".join(reasons))
        if backend == dispatch.REFERENCE and case["B"] * case["H"] * n * n > 2**28:
            raise Unsupported("the reference would materialise (B, H, N, N) scores of more than 2^28 elements")
        q, k, v, table = _inputs(case)
        grid = (case["gh"], case["gw"])
        return Bench(fwd=lambda: vlcore.attention(q, k, v, prefix_lens=prefix, rel_pos_table=table, rel_pos_grid=grid,
                                                  backend=backend), inputs=[q, k, v, table])
    return factory


def _dense_bias_fn(case, table):
    """timm/Swin: gather the table into a dense bias every step (plus the PrefixLM mask as −inf)."""
    gh, gw, n, text = case["gh"], case["gw"], _n(case), case["text"]
    index = ref.rel_pos_index(gh, gw, table.device).view(-1)  # the Swin/timm relative_position_index
    prefix = _prefix(case, table.device)

    def bias():
        g = gh * gw
        b = table[index].view(g, g, -1).permute(2, 0, 1)  # (H, G, G)
        if text:
            b = F.pad(b, (0, text, 0, text))
            mask = ref.visibility_mask(case["B"], n, n, table.device, prefix_lens=prefix)[:, None]
            b = b.masked_fill(~mask, float("-inf"))  # (B, H, N, N)
        return b.unsqueeze(0) if b.dim() == 3 else b

    return bias


def _dense_sdpa(case):
    q, k, v, table = _inputs(case)
    bias = _dense_bias_fn(case, table)

    def run():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias().to(q.dtype))
        return out.transpose(1, 2)

    return Bench(fwd=run, inputs=[q, k, v, table])


def _xformers_dense(case):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise Unsupported(f"xformers is not importable ({e})") from None
    q, k, v, table = _inputs(case)
    bias = _dense_bias_fn(case, table)

    def run():
        b = bias().to(q.dtype).expand(case["B"], case["H"], _n(case), _n(case))
        return xops.memory_efficient_attention(q, k, v, attn_bias=b)

    return Bench(fwd=run, inputs=[q, k, v, table])


_FLEX = {}


def _flex(case):
    if default_device().type == "cpu":
        raise Unsupported("FlexAttention has no CPU backward and score_mod's table needs one; the forward alone "
                          "compiles C++ for ~50 s per shape on 2 cores")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unsupported(f"FlexAttention is not available ({e})") from None
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    q, k, v, table = _inputs(case)
    device = q.device
    gh, gw, n = case["gh"], case["gw"], _n(case)
    g = gh * gw
    prefix = _prefix(case, device)

    def score_mod(score, b, h, qi, ki):
        inside = (qi < g) & (ki < g)
        qs, ks = torch.where(inside, qi, 0), torch.where(inside, ki, 0)
        idx = (qs // gw - ks // gw + gh - 1) * (2 * gw - 1) + (qs % gw - ks % gw + gw - 1)
        return score + torch.where(inside, table[idx, h], 0.0)

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) | (ki < prefix[b])

    state = {}

    def setup():  # per-sample prefix lengths change every batch: the block mask is rebuilt (and counted)
        state["mask"] = (None if prefix is None else
                         create_block_mask(mask_mod, case["B"], None, n, n, device=device, _compile=True))

    def run():
        out = _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                          block_mask=state["mask"])
        return out.transpose(1, 2)

    return Bench(fwd=run, inputs=[q, k, v, table], setup=setup)


def cases(size, opts):
    if size == "quick":
        return [{"gh": 3, "gw": 5, "text": t, "B": 2, "H": 2, "D": 32, "dtype": "fp32"} for t in (0, 9)]
    sides, dtype = ((7, 14), opts.get("dtype") or "fp32") if size == "cpu" else ((14, 16, 24, 32), opts.get("dtype") or "bf16")
    tokens = 2048 if size == "cpu" else 16384
    out = []
    for text in (0, 64):
        for side in sides:
            n = side * side + text
            out.append({"gh": side, "gw": side, "text": text, "B": max(tokens // n, 1), "H": 8 if size == "cpu" else 12,
                        "D": 64, "dtype": dtype})
    return out


PROVIDERS = {
    "vlcore-triton": _vlcore(dispatch.TRITON),
    "vlcore-cpu": _vlcore(dispatch.CPU),
    "vlcore-reference": _vlcore(dispatch.REFERENCE),
    "timm-dense+sdpa": _dense_sdpa,
    "flex-score_mod": _flex,
    "xformers-dense": _xformers_dense,
}

SUITE = Suite("relpos", "Attention with a learnable 2-D relative position table", x="N", cases=cases,
              providers=PROVIDERS, flops=flops, derived=lambda case: {"N": _n(case)}, along=("gh", "gw", "B"),
              modes=lambda size: ("fwd", "fwd_bwd") if size == "cpu" else harness.MODES,
              reps={"quick": 2, "cpu": 3, "gpu": 10}, warmup={"quick": 1, "cpu": 1, "gpu": 3})


def _add_args(parser):
    parser.add_argument("--dtype", default="", choices=["", *sorted(DTYPES)], help="default bf16 (gpu), fp32 (cpu)")


def main(argv=None):
    harness.main(SUITE, argv, _add_args)


if __name__ == "__main__":
    main()
