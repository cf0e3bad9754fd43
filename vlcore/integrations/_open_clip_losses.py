"""Drop-in ``ClipLoss`` / ``SigLipLoss`` / ``CoCaLoss`` for open_clip training scripts, on
:func:`vlcore.contrastive_loss` (no b x B logits on the compiled backends; one all-gather when distributed).

Constructor and ``forward`` signatures are open_clip's (``open_clip/loss.py``), so a script switches with an
import. Single process: values and gradients equal open_clip's. Distributed (``world_size > 1``, torch.distributed
initialised; vlcore gathers over the default group): the value is the global-batch loss on every rank and the
gradients, after DDP's averaging, are the global-batch gradients — what open_clip computes with
``local_loss=True, gather_with_grad=True`` (InfoNCE) and with any ``dist_impl`` (SigLIP; open_clip's per-rank
value is then W x the rank's share, vlcore's the global loss). ``local_loss`` / ``gather_with_grad`` /
``cache_labels`` / ``dist_impl`` are accepted for compatibility and change nothing; horovod is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlcore import distributed as vdist
from vlcore.ops.contrastive import contrastive_loss


def _check_world(owner: str, rank: int, world_size: int, use_horovod: bool = False) -> None:
    """vlcore gathers over the default torch.distributed group: rank / world_size must describe it."""
    if use_horovod:
        raise ValueError(f"{owner}: use_horovod=True is not supported by vlcore (torch.distributed only)")
    got_rank, got_world, is_dist = vdist.world_info()
    if (got_rank, got_world) != (rank, world_size):
        raise ValueError(f"{owner}: rank={rank}, world_size={world_size} must match the torch.distributed default "
                         f"group, which vlcore's op gathers over; got rank {got_rank}, world size {got_world} "
                         f"(initialised: {is_dist})")


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (InfoNCE, mean of both directions) on vlcore's contrastive op."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        _check_world(type(self).__name__, rank, world_size, use_horovod)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        if logit_bias is not None:
            raise ValueError("ClipLoss: `logit_bias` cancels in InfoNCE and vlcore's op rejects it; use "
                             "SigLipLoss for a biased (sigmoid) loss")
        loss = contrastive_loss(image_features, text_features, logit_scale, kind="infonce")
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: weighted ``ClipLoss`` and captioning cross-entropy (``pad_id`` ignored);
    returns (clip_loss, caption_loss) or a dict."""

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)
        self.clip_loss_weight, self.caption_loss_weight, self.pad_id = clip_loss_weight, caption_loss_weight, pad_id

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict: bool = False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)
        caption_loss = caption_loss * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: −(1/B)·Σ_ij log σ(z_ij·(s·x_i·y_j + b)) on vlcore's contrastive op."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"SigLipLoss: `dist_impl` must be one of None, 'bidir', 'shift', 'reduce', 'gather'; "
                             f"got {dist_impl!r}")
        _check_world(type(self).__name__, rank, world_size)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        loss = contrastive_loss(image_features, text_features, logit_scale, kind="siglip", logit_bias=logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
