"""vlcore: fused Triton/CUDA kernels and compact models for vision-language pretraining.

Public ops: :func:`attention`, :func:`contrastive_loss`, :func:`vq_nearest`; modules in :mod:`vlcore.nn`;
distributed helpers in :mod:`vlcore.distributed`; models in :mod:`vlcore.models`.
Importing never needs the compiled extension ``vlcore._C`` or a GPU.
"""

from vlcore._version import __version__
from vlcore.ops import attention
from vlcore.ops.vq import vq_nearest, vq_statistics  # noqa: F401
from vlcore.ops.contrastive import contrastive_loss  # noqa: F401
from vlcore import nn  # noqa: E402  (modules use the ops above)

__all__ = ["__version__", "attention", "nn"]
