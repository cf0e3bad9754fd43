"""Contrastive loss (InfoNCE, SigLIP) forward+backward time and peak memory: vlcore vs open_clip and Inf-CL.

    python benchmarks/bench_contrastive.py            # GPU: global batch 4k-64k, D 512-1024, bf16 and fp32
    python benchmarks/bench_contrastive.py --quick    # tiny CPU smoke run (reference + open_clip math)
    python benchmarks/bench_contrastive.py --size cpu # CPU sizes: B 512 and 2k, D 512, fp32 (the default without CUDA)

One GPU holds the whole (simulated all-gathered) batch B: image and text embeddings (B, D), L2-normalised,
with learnable logit scale (and SigLIP bias), as a trainer calls the loss. Providers:
  vlcore-triton, vlcore-cuda, vlcore-cpu, vlcore-reference   vlcore.contrastive_loss with that backend
  open_clip                    open_clip.loss.ClipLoss / SigLipLoss when the package is importable;
  open_clip-math (reimpl.)     otherwise a faithful reimplementation of their single-process math, named so:
                               logits = s·x·yᵀ (both directions materialised, as ClipLoss), cross-entropies;
                               SigLIP: −logsigmoid((2I − 1)⊙(s·x·yᵀ + b)).sum() / B
  inf_cl                       Inf-CL's cal_inf_loss (both directions) when importable (fp32 only there)
Targets (ANCHORS.md, issue 5): at B = 32768, D = 768 peak memory ≤ 1/20 of open_clip's, time ≤ 1.0× open_clip
and ≤ Inf-CL. Peak memory excludes the inputs; plots show time and, in the CSV, memory vs B.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import DTYPES, Bench, Suite, Unsupported, default_device  # noqa: E402

import vlcore  # noqa: E402
from vlcore import dispatch  # noqa: E402


def _inputs(case, device):
    gen = torch.Generator(device=device).manual_seed(0)
    b, d, dtype = case["B"], case["D"], DTYPES[case["dtype"]]
    img = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    t = torch.tensor(2.3 if case["kind"] == "siglip" else 2.659, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if case["kind"] == "siglip" else None
    return img, txt, t, bias


def _vlcore(backend):
    def factory(case):
        device = default_device()
        problem = dispatch.Problem(device, DTYPES[case["dtype"]], {"dim": case["D"], "kind": case["kind"]})
        reasons = dispatch.get("contrastive_loss", backend).refusals(problem)
        if reasons:
            raise Unsupported("; ".join(reasons))
        img, txt, t, bias = _inputs(case, device)
        leaves = [img, txt, t] + ([bias] if bias is not None else [])
        return Bench(fwd=lambda: vlcore.contrastive_loss(img, txt, t.exp(), kind=case["kind"], logit_bias=bias,
                                                         backend=backend), inputs=leaves)
    return factory


def _open_clip_loss(kind):
    import vlcore.integrations  # noqa: F401  (torchvision, which open_clip imports, beside a CPU-only torch)

    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None
    return ClipLoss() if kind == "infonce" else SigLipLoss()


def _open_clip(case):
    loss_mod = _open_clip_loss(case["kind"])
    if loss_mod is None:
        raise Unsupported("open_clip is not importable (pip install open_clip_torch); see open_clip-math")
    img, txt, t, bias = _inputs(case, default_device())
    if case["kind"] == "infonce":
        return Bench(fwd=lambda: loss_mod(img, txt, t.exp()), inputs=[img, txt, t])
    return Bench(fwd=lambda: loss_mod(img, txt, t.exp(), bias), inputs=[img, txt, t, bias])


def _open_clip_math(case):
    """open_clip's single-process math, reimplemented (used when open_clip cannot be imported)."""
    img, txt, t, bias = _inputs(case, default_device())
    labels = torch.arange(case["B"], device=img.device)

    def clip_loss():
        s = t.exp()
        logits_per_image = s * img @ txt.T
        logits_per_text = s * txt @ img.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def siglip_loss():
        logits = t.exp() * img @ txt.T + bias
        signs = 2 * torch.eye(case["B"], device=img.device, dtype=img.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / case["B"]

    if case["kind"] == "infonce":
        return Bench(fwd=clip_loss, inputs=[img, txt, t])
    return Bench(fwd=siglip_loss, inputs=[img, txt, t, bias])


def _inf_cl(case):
    if case["kind"] != "infonce":
        raise Unsupported("Inf-CL implements InfoNCE only")
    try:
        from inf_cl import cal_inf_loss
    except ImportError as e:
        raise Unsupported(f"inf_cl is not importable ({e})") from None
    if not torch.cuda.is_available():
        raise Unsupported("Inf-CL needs a CUDA GPU")
    _single_rank_group()
    img, txt, t, _ = _inputs(case, default_device())
    return Bench(fwd=lambda: (cal_inf_loss(img, txt, scale=t.exp()) + cal_inf_loss(txt, img, scale=t.exp())) / 2,
                 inputs=[img, txt, t])


def _single_rank_group():
    import torch.distributed as dist

    if not dist.is_initialized():  # Inf-CL's ring asks for the process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)


def cases(size, opts):
    if size == "quick":
        return [{"kind": k, "B": b, "D": 32, "dtype": "fp32"} for k in ("infonce", "siglip") for b in (64, 128)]
    if size == "cpu":
        return [{"kind": k, "B": b, "D": 512, "dtype": "fp32"} for k in ("infonce", "siglip") for b in (512, 2048)]
    out = []
    for kind in ("infonce", "siglip"):
        for dtype in ("bf16", "fp32"):
            out += [{"kind": kind, "B": b, "D": 768, "dtype": dtype} for b in (4096, 8192, 16384, 32768, 65536)]
            out += [{"kind": kind, "B": 32768, "D": d, "dtype": dtype} for d in (512, 1024)]
    return out


PROVIDERS = {
    "vlcore-triton": _vlcore("triton"),
    "vlcore-cuda": _vlcore("cuda"),
    "vlcore-cpu": _vlcore("cpu"),
    "vlcore-reference": _vlcore("reference"),
    "open_clip": _open_clip,
    "open_clip-math (reimpl.)": _open_clip_math,
    "inf_cl": _inf_cl,
}

SUITE = Suite("contrastive", "Contrastive loss (one device, global batch B)", x="B", cases=cases,
              providers=PROVIDERS, modes=lambda size: ("fwd", "fwd_bwd") if size != "gpu" else ("fwd_bwd",),
              reps={"quick": 3, "cpu": 3, "gpu": 10}, warmup={"quick": 1, "cpu": 1, "gpu": 3})


def main(argv=None):
    harness.main(SUITE, argv)


if __name__ == "__main__":
    main()
