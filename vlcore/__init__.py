"""vlcore: fused Triton/CUDA kernels and compact models for vision-language pretraining.

Public ops: :func:`attention`, :func:`contrastive_loss`, :func:`vq_nearest` (+ :func:`vq_statistics`); modules in
:mod:`vlcore.nn`; distributed helpers in :mod:`vlcore.distributed`; models in :mod:`vlcore.models`.
Importing never needs the compiled extension ``vlcore._C`` or a GPU.
"""

from vlcore._version import __version__
from vlcore.ops import attention, contrastive_loss, vq_nearest, vq_statistics

from vlcore import distributed, nn  # isort: skip  (the modules build on the ops above)

__all__ = ["__version__", "attention", "contrastive_loss", "distributed", "nn", "vq_nearest", "vq_statistics"]
