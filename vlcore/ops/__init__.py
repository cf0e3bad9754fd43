"""The op layer: validation, backend dispatch, torch.library registration and autograd for each op family."""

from vlcore.ops.attention import attention

__all__ = ["attention"]
