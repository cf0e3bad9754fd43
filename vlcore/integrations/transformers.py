"""transformers -> vlcore: ``BertModel`` weights into :class:`vlcore.nn.text.TextEncoder`, the BERT text
encoder that X-VLM, ViLT, SOHO and VinVL-style models start from.

    text_encoder = text_encoder_from_bert(transformers.BertModel.from_pretrained("bert-base-uncased"))
    hidden = text_encoder(input_ids, attention_mask.bool())      # == BertModel(...).last_hidden_state

The encoder is built with BERT's post-norm layers (``post_norm=True``, LayerNorm eps from the config), so the
outputs equal ``BertModel``'s ``last_hidden_state`` at the valid positions; padding travels as per-sample
lengths (``kv_lens``), not as a mask tensor. q, k and v are fused into one projection. The pooler (a
classifier-side dense + tanh) is dropped. A key that cannot be mapped is named in the error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from vlcore.integrations import _torchvision_compat
from vlcore.integrations._mapping import convert, state_dict_of
from vlcore.nn.text import TextEncoder

_torchvision_compat.ensure()  # transformers' image utilities import torchvision when it is installed
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("vlcore.integrations.transformers needs transformers: pip install -e \".[interop]\"") from e

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
                   ignore=("pooler.", "bert.pooler.", "embeddings.position_ids", "embeddings.token_type_ids"))


def text_encoder_from_bert(bert: nn.Module, **encoder_kwargs) -> TextEncoder:
    """A post-norm :class:`TextEncoder` of ``bert``'s architecture holding its weights (``encoder_kwargs``:
    checkpoint, backend). Needs absolute position embeddings and the exact GELU (BERT's defaults)."""
    c = bert.config
    act, positions = c.hidden_act, getattr(c, "position_embedding_type", "absolute") or "absolute"
    if act != "gelu" or positions != "absolute":
        raise ValueError(f"text_encoder_from_bert: vlcore's TextEncoder has GELU and absolute positions; got "
                         f"hidden_act={act!r}, position_embedding_type={positions!r}")
    encoder = TextEncoder(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                          c.max_position_embeddings, c.intermediate_size / c.hidden_size, post_norm=True,
                          eps=c.layer_norm_eps, segments=c.type_vocab_size, **encoder_kwargs)
    encoder.load_state_dict(bert_state_dict(bert, encoder))
    return encoder
