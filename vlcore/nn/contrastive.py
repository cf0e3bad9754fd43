"""``ContrastiveLoss``: the learnable temperature (and SigLIP bias) around :func:`vlcore.contrastive_loss`.

CLIP learns t = log(1/τ) (init log(1/0.07)) and uses s = exp(t) clamped at 100; SigLIP learns t (init log 10)
and a bias b (init −10) (Radford et al., 2021; Zhai et al., 2023). The clamp is of exp(t), so at the ceiling
t stops receiving gradient, as in CLIP's training.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from vlcore import distributed as vdist
from vlcore.ops.contrastive import contrastive_loss
from vlcore.reference import contrastive as ref

_DEFAULT_SCALE = {"infonce": math.log(1 / 0.07), "siglip": math.log(10.0)}


class ContrastiveLoss(nn.Module):
    """Global-batch InfoNCE or SigLIP loss with a learnable log-temperature.

    forward(image_emb (b, D), text_emb (b, D), return_accuracy=False) -> loss, or (loss, accuracy dict) where
    the dict holds ``i2t`` and ``t2i`` top-1 in-batch retrieval accuracy over the gathered batch (see
    :meth:`retrieval_accuracy`). Distributed semantics (value = global loss, gradients DDP-ready): see
    :func:`vlcore.contrastive_loss`.
    """

    def __init__(self, kind: str = "infonce", init_logit_scale: float | None = None,
                 init_logit_bias: float | None = None, max_logit_scale: float = 100.0, learnable: bool = True,
                 group=None, backend: str | None = None):
        super().__init__()
        if kind not in ref.KINDS:
            raise ValueError(f"ContrastiveLoss: `kind` must be one of {ref.KINDS}; got {kind!r}")
        if max_logit_scale <= 0:
            raise ValueError(f"ContrastiveLoss: `max_logit_scale` must be positive; got {max_logit_scale}")
        self.kind, self.max_logit_scale, self.group, self.backend = kind, float(max_logit_scale), group, backend
        t = torch.tensor(float(_DEFAULT_SCALE[kind] if init_logit_scale is None else init_logit_scale))
        if kind == "infonce" and init_logit_bias is not None:
            raise ValueError("ContrastiveLoss: `init_logit_bias` is only used by kind='siglip'")
        b = torch.tensor(float(-10.0 if init_logit_bias is None else init_logit_bias))
        if learnable:
            self.logit_scale = nn.Parameter(t)
            self.logit_bias = nn.Parameter(b) if kind == "siglip" else None
        else:
            self.register_buffer("logit_scale", t)
            self.register_buffer("logit_bias", b if kind == "siglip" else None)

    def scale(self) -> torch.Tensor:
        """s = min(exp(t), max_logit_scale)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, return_accuracy: bool = False):
        loss = contrastive_loss(image_emb, text_emb, self.scale(), kind=self.kind, logit_bias=self.logit_bias,
                                group=self.group, backend=self.backend)
        if return_accuracy:
            return loss, self.retrieval_accuracy(image_emb, text_emb)
        return loss

    @torch.no_grad()
    def retrieval_accuracy(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                           chunk: int = 1024) -> dict[str, torch.Tensor]:
        """Top-1 in-batch retrieval accuracy over the gathered batch: ``i2t`` (image → its text among all B
        texts) and ``t2i``, as 0-dim float tensors, identical on every rank. Scores are scanned in column chunks
        (never b × B at once for B > chunk); the gather here carries no gradient."""
        rank, world, is_dist = vdist.world_info(self.group)
        dim = image_emb.shape[1]
        if is_dist and world > 1:
            both, sizes = vdist.all_gather_with_sizes(torch.cat([image_emb, text_emb], dim=1).detach(), self.group)
            image_all, text_all, offset = both[:, :dim], both[:, dim:], sum(sizes[:rank])
        else:
            image_all, text_all, offset = image_emb, text_emb, 0
        hits = torch.stack([ref.retrieval_hits(image_emb, text_all, offset=offset, chunk=chunk),
                            ref.retrieval_hits(text_emb, image_all, offset=offset, chunk=chunk)])
        if is_dist and world > 1:
            dist.all_reduce(hits, group=self.group)
        frac = hits.double() / max(1, image_all.shape[0])
        return {"i2t": frac[0].float(), "t2i": frac[1].float()}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_logit_scale={self.max_logit_scale}"
