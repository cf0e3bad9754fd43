"""Modules that hold parameters or state, built on the vlcore ops (used by ``vlcore.models``)."""

from vlcore.nn.attention import KVCache, MultiheadAttention
from vlcore.nn.contrastive import ContrastiveLoss
from vlcore.nn.dictionary import VisualDictionary, mvm_mask
from vlcore.nn.heads import BoxHead, MLMHead, MLPHead
from vlcore.nn.pool import AttentionPool, MAPHead, MultiAttentionPool
from vlcore.nn.resnet import ResNet
from vlcore.nn.swin import SwinEncoder
from vlcore.nn.text import TextEmbeddings, TextEncoder
from vlcore.nn.transformer import MLP, DecoderLayer, EncoderLayer, TransformerStack
from vlcore.nn.vit import PatchEmbed, ViT

__all__ = [
    "AttentionPool",
    "BoxHead",
    "ContrastiveLoss",
    "DecoderLayer",
    "EncoderLayer",
    "KVCache",
    "MLMHead",
    "MLP",
    "MLPHead",
    "MAPHead",
    "MultiAttentionPool",
    "MultiheadAttention",
    "PatchEmbed",
    "ResNet",
    "SwinEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "TransformerStack",
    "ViT",
    "VisualDictionary",
    "mvm_mask",
]
