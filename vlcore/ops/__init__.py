"""The op layer: validation, backend dispatch, torch.library registration and autograd for each op family."""

from vlcore.ops.attention import attention
from vlcore.ops.contrastive import contrastive_loss
from vlcore.ops.vq import vq_nearest, vq_statistics

__all__ = ["attention", "contrastive_loss", "vq_nearest", "vq_statistics"]
