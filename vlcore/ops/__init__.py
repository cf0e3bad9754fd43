"""The op layer: validation, backend dispatch, torch.library registration and autograd for each op family."""

from vlcore.ops.attention import attention
from vlcore.ops.vq import vq_nearest, vq_statistics  # noqa: F401
from vlcore.ops.contrastive import contrastive_loss  # noqa: F401

__all__ = ["attention"]
