"""Visual dictionary (SOHO) assignment and assignment + momentum update: vlcore vs SOHO-style, cdist, FAISS.

    python benchmarks/bench_vq.py            # GPU: N 10k-262k, K 512-8192, D 256-1024, bf16 (and fp32 at the target)
    python benchmarks/bench_vq.py --quick    # tiny CPU smoke run
    python benchmarks/bench_vq.py --size cpu # CPU sizes: N 4k-16k, K 1024, D 256, fp32 (the default without CUDA)

``work="assign"`` times the nearest-entry search (and the quantized output where the provider builds it);
``work="assign+update"`` one training step of the dictionary: assignment, per-entry statistics, EMA with Laplace
smoothing and the new codebook (one process: no all_reduce; dead-entry restart disabled, as SOHO has none).
Providers:
  vlcore-triton, vlcore-cuda, vlcore-cpu, vlcore-reference   vlcore.vq_nearest / vlcore.nn.VisualDictionary with that backend
  soho-style (reimpl.)     SOHO's released SOHO_Pre_VD.forward, reimplemented faithfully and named so: the full
                           N x K distance matrix ||x||^2 + ||e||^2 - 2 x e^T, argmin, a dense N x K one-hot, counts
                           and sums as one-hot reductions/matmuls, EMA + Laplace smoothing, quantize = one-hot @ e.
                           fp16/bf16 inputs run under torch.autocast, as mixed-precision training runs it.
  torch-cdist (reimpl.)    torch.cdist + argmin (materialises N x K); the update with bincount/index_add_ + EMA
  faiss-cpu                faiss.IndexFlatL2 1-NN on CPU copies (assignment only) when faiss is importable
Target (ANCHORS.md, issue 6): N = 65,536, K = 2048, D = 768: assign + update >= 4x soho-style, no N x K allocation
(the peak-memory column: vlcore's extra memory is O(N + K D)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import DTYPES, Bench, Suite, Unsupported, default_device  # noqa: E402

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402
from vlcore.nn import VisualDictionary  # noqa: E402
from vlcore.reference import vq as ref  # noqa: E402


def _inputs(case):
    device = default_device()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case["N"], case["D"], device=device, generator=gen).to(DTYPES[case["dtype"]])
    codebook = torch.randn(case["K"], case["D"], device=device, generator=gen)
    return x, codebook


def _vlcore(backend):
    def factory(case):
        device, dtype = default_device(), DTYPES[case["dtype"]]
        reasons = dispatch.get("vq", backend).refusals(dispatch.Problem(device, dtype, {"dim": case["D"]}))
        if reasons:
            raise Unsupported("; ".join(reasons))
        x, codebook = _inputs(case)
        if case["work"] == "assign":
            def assign():
                idx, _ = vlcore.vq_nearest(x, codebook, backend=backend)
                return codebook[idx].to(x.dtype)
            return Bench(fwd=assign)
        vd = VisualDictionary(case["K"], case["D"], dead_code_threshold=0.0, backend=backend).to(device).train()
        vd.codebook.copy_(codebook)
        return Bench(fwd=lambda: vd(x))
    return factory


def _soho_style(case):
    """SOHO_Pre_VD.forward (released code), one process, reimplemented faithfully."""
    x, embed = _inputs(case)
    k = case["K"]
    cluster_size = torch.zeros(k, device=x.device)
    embed_avg = torch.zeros_like(embed)
    decay, eps = 0.99, 1e-5
    lowp = x.dtype != torch.float32

    def step():
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=lowp):
            inputs_flatten = x
            distances = (torch.sum(inputs_flatten ** 2, dim=1, keepdim=True) + torch.sum(embed ** 2, dim=1)
                         - 2 * torch.matmul(inputs_flatten, embed.t()))
            encoding_indices = torch.argmin(distances, dim=1).unsqueeze(1)
            encodings = torch.zeros(encoding_indices.shape[0], k, dtype=torch.float, device=x.device)
            encodings.scatter_(1, encoding_indices, 1)
            if case["work"] != "assign":
                encoding_sum = torch.sum(encodings, dim=0)
                cluster_size.mul_(decay).add_(torch.mul(encoding_sum, 1.0 - decay))
                embed_sum = torch.matmul(encodings.t(), inputs_flatten)
                embed_avg.mul_(decay).add_(torch.mul(embed_sum, 1.0 - decay))
                n = cluster_size.sum()
                smoothed = (cluster_size + eps) / (n + k * eps) * n
                embed.copy_(embed_avg / smoothed.unsqueeze(1))
            quantize = torch.matmul(encodings, embed)
            return (quantize - inputs_flatten).detach() + inputs_flatten

    return Bench(fwd=step)


def _torch_cdist(case):
    x, codebook = _inputs(case)
    state = [codebook, torch.zeros(case["K"], device=x.device), torch.zeros_like(codebook)]

    def step():
        idx = torch.cdist(x.float(), codebook).argmin(1)
        if case["work"] != "assign":
            counts, sums = ref.vq_statistics(x, idx, case["K"])
            ref.ema_update(*state, counts, sums, 0.99, 1e-5)
        return codebook[idx].to(x.dtype)

    return Bench(fwd=step)


def _faiss(case):
    if case["work"] != "assign":
        raise Unsupported("FAISS only searches (no dictionary update)")
    try:
        import faiss
    except ImportError as e:
        raise Unsupported(f"faiss is not importable ({e}); pip install faiss-cpu") from None
    x, codebook = _inputs(case)
    xs = x.float().cpu().numpy()
    index = faiss.IndexFlatL2(case["D"])
    index.add(codebook.cpu().numpy())
    return Bench(fwd=lambda: index.search(xs, 1))


def cases(size, opts):
    if size == "quick":
        return [{"work": w, "N": n, "K": 64, "D": 32, "dtype": "fp32"} for w in ("assign", "assign+update")
                for n in (256, 1024)]
    if size == "cpu":
        return [{"work": w, "N": n, "K": 1024, "D": 256, "dtype": "fp32"} for w in ("assign", "assign+update")
                for n in (4096, 16384)]
    out = []
    for work in ("assign", "assign+update"):
        out += [{"work": work, "N": n, "K": 2048, "D": 768, "dtype": "bf16"} for n in (10240, 65536, 262144)]
        out += [{"work": work, "N": 65536, "K": k, "D": 768, "dtype": "bf16"} for k in (512, 8192)]
        out += [{"work": work, "N": 65536, "K": 2048, "D": d, "dtype": "bf16"} for d in (256, 1024)]
        out += [{"work": work, "N": 65536, "K": 2048, "D": 768, "dtype": "fp32"}]
    return out


PROVIDERS = {
    "vlcore-triton": _vlcore("triton"),
    "vlcore-cuda": _vlcore("cuda"),
    "vlcore-cpu": _vlcore("cpu"),
    "vlcore-reference": _vlcore("reference"),
    "soho-style (reimpl.)": _soho_style,
    "torch-cdist (reimpl.)": _torch_cdist,
    "faiss-cpu": _faiss,
}

SUITE = Suite("vq", "Visual dictionary: assignment (+ momentum update)", x="N", cases=cases, providers=PROVIDERS,
              modes=lambda size: ("fwd",), reps={"quick": 3, "cpu": 3, "gpu": 10}, warmup={"quick": 1, "cpu": 1, "gpu": 3})


def main(argv=None):
    harness.main(SUITE, argv)


if __name__ == "__main__":
    main()
