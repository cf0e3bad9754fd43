"""BERT (``BertModel`` / ``BertFor*`` state dicts) -> :class:`vlcore.nn.text.TextEncoder` (post-norm) key mapping.

Needs no transformers install: ``vlcore pretrain --init-text`` reads a local BERT checkpoint with it. Public
through :mod:`vlcore.integrations.transformers`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from vlcore.integrations._mapping import convert, state_dict_of
from vlcore.nn.text import TextEncoder

_BERT_LAYER = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_BERT_EMBED = {
    "word_embeddings": "tokens",
    "position_embeddings": "positions",
    "token_type_embeddings": "segments",
    "LayerNorm": "norm",
}


def _fuse_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT's separate query/key/value projections as one ``attention.self.qkv`` (vlcore's fused layout)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*attention\.self\.)(query|key|value)\.(weight|bias)", key)
        if m is None:
            out[key] = value
        elif m[2] == "query":
            parts = [state.get(f"{m[1]}{name}.{m[3]}") for name in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise KeyError(f"BERT -> vlcore TextEncoder: {key!r} comes without its key/value projections")
            out[f"{m[1]}qkv.{m[3]}"] = torch.cat(parts, dim=0)
    return out


def _bert_key(key: str) -> str | None:
    key = key.removeprefix("bert.")  # BertForPreTraining & co. keep the encoder under "bert."
    m = re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", key)
    if m and m[1] in _BERT_EMBED:
        return f"embeddings.{_BERT_EMBED[m[1]]}.{m[2]}"
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m[2] == "attention.self.qkv":
        return f"blocks.layers.{m[1]}.attn.qkv.{m[3]}"
    if m and m[2] in _BERT_LAYER:
        return f"blocks.layers.{m[1]}.{_BERT_LAYER[m[2]]}.{m[3]}"
    return None


def bert_state_dict(bert: nn.Module | Mapping[str, torch.Tensor], text_encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """A ``BertModel``'s (or its state dict's) weights as a state dict of ``text_encoder``."""
    return convert(_fuse_qkv(state_dict_of(bert)), _bert_key, text_encoder, owner="BERT -> vlcore TextEncoder",
                   ignore=("pooler.", "bert.pooler.", "cls.", "embeddings.position_ids",
                           "embeddings.token_type_ids", "bert.embeddings.position_ids",
                           "bert.embeddings.token_type_ids"))
