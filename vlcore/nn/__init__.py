"""Modules that hold parameters or state, built on the vlcore ops (used by ``vlcore.models``)."""

from vlcore.nn.pool import AttentionPool, MultiAttentionPool
from vlcore.nn.dictionary import VisualDictionary, mvm_mask  # noqa: F401
from vlcore.nn.contrastive import ContrastiveLoss  # noqa: F401
from vlcore.nn.attention import KVCache, MultiheadAttention  # noqa: F401
from vlcore.nn.transformer import MLP, DecoderLayer, EncoderLayer, TransformerStack  # noqa: F401
from vlcore.nn.vit import PatchEmbed, ViT  # noqa: F401
from vlcore.nn.resnet import ResNet  # noqa: F401
from vlcore.nn.swin import SwinEncoder  # noqa: F401
from vlcore.nn.text import TextEmbeddings, TextEncoder  # noqa: F401
from vlcore.nn.heads import BoxHead, MLMHead, MLPHead  # noqa: F401

__all__ = ["AttentionPool", "MultiAttentionPool"]
