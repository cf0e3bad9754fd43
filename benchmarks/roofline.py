"""On-paper roofline of every Triton kernel at the benchmark shapes of ``../shared/ANCHORS.md`` (H100/H200).

    python benchmarks/roofline.py            # writes benchmarks/roofline.md

For each kernel and shape: the FLOPs and HBM bytes the *design* performs (its fixed deterministic-mode tiles from
``vlcore.kernels.*``: tile-granular masking, recomputations, D-chunk repeats, partial buffers), the minimum any
design needs, and a predicted time from a three-unit model of one H100 SXM / H200:

    t = max(t_mma + t_exp·(1 − overlap), t_hbm),   t_mma = FLOPs / (peak · e_mma),   t_exp = exps / SFU rate,
    t_hbm = bytes / bandwidth,   fraction of peak = useful FLOPs / (t · peak)

``e_mma`` is the issue efficiency the resource report justifies for the kernel's sm_90 default config
(benchmarks/results/static/resources.csv): wgmma in the PTX → 0.75 (FA3's measured ceiling for a pipelined
wgmma loop, Shah et al. 2024, arXiv:2407.08608), mma.sync only → 0.45 (FA2 on H100 reaches 35–50 %, ibid.),
neither (FMA) → 0.06 (67 TFLOP/s fp32 of 989); halved when the config spills. ``overlap`` is 0: Triton without
warp specialisation runs the softmax exponentials and the MMAs of one warp in turn (FA3's ping-pong is what
hides them). The exponential unit: 16 ex2 / clock / SM × 132 SMs × 1.83 GHz = 3.9·10¹² /s (FA3, §3.1).
The peers' fractions are their published numbers (ANCHORS.md); nothing here is measured.

These are upper bounds: occupancy (registers per thread), the non-exponential softmax / argmin arithmetic,
masking, pipeline prologues and tail waves are outside the model. Their use is the ratio "done / min" (work the
design wastes) and the ranking of the kernels, not an absolute prediction.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESOURCES = HERE / "results" / "static" / "resources.csv"

GPUS = {  # dense bf16 tensor-core FLOP/s, HBM bytes/s, exponentials/s
    "H100 SXM": (989e12, 3.35e12, 3.9e12),
    "H200": (989e12, 4.8e12, 3.9e12),
}
E_MMA = {"wgmma": 0.75, "mma.sync": 0.45, "fma": 0.06}
SMS = 132
BYTES = 2  # bf16


@dataclasses.dataclass
class Estimate:
    kernel: str
    shape: str
    flops: float        # performed by the design
    flops_min: float    # useful (the minimum any design performs)
    bytes: float        # HBM traffic of the design
    bytes_min: float
    exps: float
    unit: str           # "wgmma" / "mma.sync" / "fma"
    spills: bool
    peers: str
    resources: str = ""  # registers / spills / config of the sm_90 default in the resource report
    note: str = ""
    programs: int = 1 << 30  # programs of the launch: fewer than SMS leave SMs idle
    slow_share: float = 0.0  # share of the FLOPs at half the MMA rate (TF32 operands)

    def time(self, gpu: str) -> float:
        peak, bw, sfu = GPUS[gpu]
        e = E_MMA[self.unit] * (0.5 if self.spills else 1.0) * min(1.0, self.programs / SMS)
        return max(self.flops * (1 + self.slow_share) / (peak * e) + self.exps / sfu, self.bytes / bw)

    def fraction(self, gpu: str) -> float:
        return self.flops_min / (self.time(gpu) * GPUS[gpu][0])


# ---- what the resource report says about a kernel's default sm_90 config ------------------------------------
def report_unit(rows: list[dict], kernel: str, dim: int | None, flags: str = "") -> tuple[str, bool, str]:
    """(MMA unit, spills?, 'regs/spill B') of the bf16 default sm_90 row of ``kernel`` (fma when absent)."""
    for r in rows:
        if (r["kernel"] == kernel and r["dtype"] == "bf16" and r["target"] == "sm_90" and r["default"] == "True"
                and (dim is None or str(r["dim"]) == str(dim)) and r["flags"] == flags):
            unit = "wgmma" if int(r["wgmma"] or 0) else "mma.sync" if int(r["mma.sync"] or 0) else "fma"
            return unit, int(r["spill_bytes"] or 0) > 0, f"{r['registers']} regs / {r['spill_bytes']} B, {r['config']}"
    return "fma", False, "not in the report"


# ---- the kernels' designs -------------------------------------------------------------------------------------
def _tiles_visible(n: int, bm: int, bn: int, causal: bool) -> tuple[float, float]:
    """(pairs the tiles cover, pairs visible) for an n × n causal (or full) score matrix in bm × bn tiles."""
    if not causal:
        return float(n * n), float(n * n)
    covered = sum(min(n, (i + 1) * bm) // bn * bn + (bn if min(n, (i + 1) * bm) % bn else 0)
                  for i in range(math.ceil(n / bm)))
    covered *= bm
    return float(covered), n * (n + 1) / 2


def attention(rows, b, h, n, d, causal, table, shape_name, fwd_tiles=(64, 32), dkdv_tiles=(32, 64)):
    flags = "causal" if causal else ("prefix,kvlen,bias" if table else "")
    out = []
    covered, visible = _tiles_visible(n, *fwd_tiles, causal)
    io = b * h * n * d * BYTES
    # forward: QKᵀ and PV over the covered tiles; K, V re-read per query block (from L2 when co-scheduled:
    # blocks of one (b, h) are adjacent on grid axis 0), Q read and O written once; lse fp32
    unit, spills, res = report_unit(rows, "attention.fwd", d, flags)
    table_bytes = 0  # the per-call (H, R) table copy is L2-resident: no HBM traffic per pair
    out.append(Estimate("attention.fwd", shape_name, 4 * b * h * covered * d, 4 * b * h * visible * d,
                        4 * io + b * h * n * 4 + table_bytes, 4 * io, b * h * covered, unit, spills,
                        "FA2 50–70 %, FA3 ~75 %, FlexAttention ~85–90 % of FA2", resources=res,
                        note="bias gather (L2, head-major copy) not in the model" if table else ""))
    # backward: dK/dV 4 tile matmuls (S, dP, dV, dK) + dQ 3 (S, dP, dQ) = 7; FA2 5 (dQ by atomics)
    unit, spills, res = report_unit(rows, "attention.dkdv", d, flags)
    covered_b, _ = _tiles_visible(n, dkdv_tiles[1], dkdv_tiles[0], causal)
    flops = 14 * b * h * covered_b * d
    bytes_ = 9 * io + 2 * b * h * n * 4 * 2
    if table:  # dtable partials: one (programs, R) fp32 row per (key block, chunk, head), written and summed
        r = (2 * int(math.isqrt(n)) - 1) ** 2
        bytes_ += 2 * max(b, math.ceil(n / dkdv_tiles[1])) * h * r * 4
    out.append(Estimate("attention.bwd (dkdv+dq)", shape_name, flops, 10 * b * h * visible * d, bytes_, 8 * io,
                        2 * b * h * covered_b, unit, spills, "FA2 ~40–50 %, FA3 ~60 %", resources=res))
    return out


def streamed(bytes_once: float, programs: int) -> float:
    """HBM bytes of an operand every program streams in full (y, the codebook): the ~2·SMS programs of one wave
    read the same tiles at about the same time, so L2 serves all but one read per wave."""
    return bytes_once * math.ceil(programs / (2 * SMS))


def column_splits(programs: int, n_cols: int) -> int:
    """kernels/contrastive.py's column slices on a 132-SM GPU (two programs per SM, >= 256 columns each)."""
    return max(1, min(math.ceil(2 * SMS / programs), n_cols // 256))


def contrastive(rows, b_local, big_b, d, shape_name, block_d=256, single=True):
    """InfoNCE, b_local rows against big_b gathered columns. Forward: logits once (column slices over the SMs).
    Backward: dx recomputes the logits per D chunk (⌈D/BLOCK_D⌉), dy the same; single-process runs the pair kernel
    for both directions (2 launches: logits + G·y each, per D chunk) instead of dx/dy per direction."""
    chunks = math.ceil(d / block_d)
    logit = 2 * b_local * big_b * d
    unit, spills, res = report_unit(rows, "contrastive.fwd", d, "infonce")
    fwd_programs = math.ceil(b_local / 64) * column_splits(math.ceil(b_local / 64), big_b)
    out = [Estimate("contrastive.fwd", shape_name, logit, logit,
                    b_local * d * BYTES + streamed(big_b * d * BYTES, fwd_programs), (b_local + big_b) * d * BYTES,
                    b_local * big_b, unit, spills, "open_clip: cuBLAS GEMM ~70 % + b×B logits in HBM", resources=res,
                    programs=fwd_programs)]
    # each direction's dx: chunks × (logits + G·y); dy (distributed) the same again
    # single process (pair kernel, both directions): 2 launches × chunks × (logits, G·y); distributed, per
    # direction: dx and dy, each chunks × (logits, G·y)
    passes = 4 * chunks
    sms_fill = math.ceil(b_local / 64) * chunks * column_splits(math.ceil(b_local / 64) * chunks, big_b)
    unit, spills, res = report_unit(rows, "contrastive.bwd_pair" if single else "contrastive.bwd_dx", d, "infonce")
    out.append(Estimate("contrastive.bwd", shape_name, passes * logit, 3 * logit,
                        passes * (b_local * d * BYTES + streamed(big_b * d * BYTES, sms_fill)),
                        2 * (b_local + big_b) * d * BYTES,
                        passes / 2 * b_local * big_b, unit, spills, "Inf-CL (TF32): ~equal to open_clip time", resources=res,
                        note=f"G·y in TF32 (fp32 G): half rate for those {passes // 2} passes",
                        programs=sms_fill, slow_share=0.5))
    return out


def vq(rows, n, k, d, shape_name, block_n=64):
    unit, spills, res = report_unit(rows, "vq.nearest", d if d in (256, 512, 768) else 768, "l2")
    flops = 2 * n * k * d
    return [Estimate("vq.nearest", shape_name, flops, flops, n * d * BYTES + streamed(k * d * BYTES, n // block_n),
                     (n * d + k * d) * BYTES, 0, unit, spills, "SOHO: cuBLAS GEMM + N×K distances in HBM", resources=res,
                     note="argmin epilogue (BLOCK_N × BLOCK_K compares per tile) not in the model")]


def estimates(rows) -> list[Estimate]:
    est = []
    est += attention(rows, 8, 16, 4096, 128, False, False, "B8 H16 N4096 D128")
    est += attention(rows, 8, 16, 4096, 128, True, False, "B8 H16 N4096 D128 causal")
    est += attention(rows, 64, 16, 577, 64, False, True, "B64 H16 N577 D64 24×24 table", dkdv_tiles=(32, 32))
    est += contrastive(rows, 32768, 32768, 768, "b=B=32768 D768 (1 GPU)", single=True)
    est += contrastive(rows, 256, 32768, 768, "b256 vs B32768 D768 (rank of 128)", single=False)
    est += vq(rows, 65536, 2048, 768, "N65536 K2048 D768")
    return est


def to_markdown(est: list[Estimate]) -> str:
    gpus = list(GPUS)
    head = ["kernel", "shape", "GFLOP done / min", "HBM MB done / min", "AI (FLOP/B)", "sm_90 default (report)",
            *[f"t {g} (µs)" for g in gpus], *[f"% peak {g}" for g in gpus], "peers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in est:
        cells = [e.kernel, e.shape, f"{e.flops / 1e9:.1f} / {e.flops_min / 1e9:.1f}",
                 f"{e.bytes / 1e6:.1f} / {e.bytes_min / 1e6:.1f}", f"{e.flops / max(e.bytes, 1):.0f}",
                 f"{e.unit}{' (spills)' if e.spills else ''}: {e.resources}" + (f"; {e.note}" if e.note else ""),
                 *[f"{e.time(g) * 1e6:.0f}" for g in gpus], *[f"{100 * e.fraction(g):.0f}" for g in gpus], e.peers]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resources", default=str(RESOURCES), help="resources.csv of the static report")
    p.add_argument("--out", default=str(HERE / "roofline.md"))
    args = p.parse_args(argv)
    with open(args.resources, newline="") as f:
        rows = list(csv.DictReader(f))
    est = estimates(rows)
    text = ("# Roofline on paper (generated by benchmarks/roofline.py; nothing measured)\n\n"
            + __doc__.split("\n\n", 2)[2].strip() + "\n\n" + to_markdown(est))
    Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
