"""Modules that hold parameters or state, built on the vlcore ops (used by ``vlcore.models``)."""

from vlcore.nn.pool import AttentionPool, MultiAttentionPool

__all__ = ["AttentionPool", "MultiAttentionPool"]
