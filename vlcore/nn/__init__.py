"""Modules that hold parameters or state, built on the vlcore ops (used by ``vlcore.models``)."""

from vlcore.nn.pool import AttentionPool, MultiAttentionPool
from vlcore.nn.contrastive import ContrastiveLoss  # noqa: F401

__all__ = ["AttentionPool", "MultiAttentionPool"]
