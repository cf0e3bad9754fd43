"""vlcore: fused Triton/CUDA kernels and compact models for vision-language pretraining.

Public ops: :func:`attention`, :func:`contrastive_loss`, :func:`vq_nearest` (+ :func:`vq_statistics`); modules in
:mod:`vlcore.nn`; distributed helpers in :mod:`vlcore.distributed`; models in :mod:`vlcore.models`.
Importing never needs the compiled extension ``vlcore._C`` or a GPU.
"""

# First, before anything imports torch: the OpenMP runtime reads its wait policy when torch loads it (CLI only).
from vlcore.train import threads as _threads  # isort: skip

_threads.set_wait_policy_for_cli()

from vlcore._version import __version__  # noqa: E402
from vlcore.ops import attention, contrastive_loss, vq_nearest, vq_statistics  # noqa: E402

from vlcore import distributed, nn  # noqa: E402  # isort: skip  (the modules build on the ops above)

__all__ = ["__version__", "attention", "contrastive_loss", "distributed", "nn", "vq_nearest", "vq_statistics"]
