"""Modules that hold parameters or state, built on the vlcore ops (used by ``vlcore.models``)."""

from vlcore.nn.pool import AttentionPool, MultiAttentionPool
from vlcore.nn.dictionary import VisualDictionary, mvm_mask  # noqa: F401
from vlcore.nn.contrastive import ContrastiveLoss  # noqa: F401

__all__ = ["AttentionPool", "MultiAttentionPool"]
