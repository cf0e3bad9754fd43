"""The ``cpu`` backends: fast CPU execution of each op family with the reference's semantics.

One module per op family (:mod:`.attention`, :mod:`.contrastive`, :mod:`.vq`). They are the automatic choice for
CPU tensors (see :mod:`vlcore.dispatch`); ``backend="reference"`` keeps the readable ground truth selectable.
"""
