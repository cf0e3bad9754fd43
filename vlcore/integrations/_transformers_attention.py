"""vlcore's attention in transformers models through transformers' own extension point
(``vlcore.integrations.transformers.apply``): an attention function and a mask function registered under the
name ``"vlcore"`` (``AttentionInterface`` / ``AttentionMaskInterface``), selected with
``model.set_attn_implementation("vlcore")``. No module is replaced and no weight moves.

Padding travels as lengths: for a plain causal or bidirectional mask the mask function returns ``kv_lens``
(B,) int32 — the valid lengths of right-padded text — instead of building a (B, 1, Nq, Nk) tensor, and the
attention function passes them to :func:`vlcore.attention` (``causal`` from the layer: CLIP's text tower,
BERT decoders). Everything else runs transformers' SDPA path, per call: a mask that is not right padding
(checked in eager mode; under ``torch.compile`` right padding is assumed, as BERT / CLIP tokenizers pad),
sliding-window / custom / cached-offset masks, attention dropout while training, grouped K/V heads, and
``output_attentions``. ``CLIPModel`` / ``SiglipModel`` also get their loss on vlcore's contrastive op
(``_transformers_losses.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

import vlcore
from vlcore.integrations._report import PatchReport

NAME = "vlcore"
KNOWN = ("BertSelfAttention", "CLIPAttention", "SiglipAttention")


def lengths_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """``kv_lens`` (B,) int32 for a plain causal / bidirectional mask over right-padded keys (None without
    padding); otherwise SDPA's boolean mask, which sends the attention function to SDPA."""
    plain = mask_function in (causal_mask_function, bidirectional_mask_function)
    no_offset = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
    if plain and no_offset and (attention_mask is None or attention_mask.shape[-1] == kv_length):
        if attention_mask is None:
            return None
        lens = attention_mask.sum(-1, dtype=torch.int32)
        if torch.compiler.is_compiling():
            return lens
        right_padded = torch.arange(kv_length, device=lens.device) < lens[:, None]
        if torch.equal(attention_mask, right_padded):
            return lens
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: q/k/v (B, H, N, D) -> ((B, N, H, D), None)."""
    lens = attention_mask is not None and attention_mask.dim() == 1
    if (attention_mask is not None and not lens) or dropout > 0 or key.shape[1] != query.shape[1] \
            or kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, D) strided views, no copy
    out = vlcore.attention(q, k, v, causal=bool(causal) and q.shape[1] > 1, kv_lens=attention_mask if lens else None,
                           scale=scaling)
    return out, None


def register() -> None:
    """Register the ``"vlcore"`` attention and mask functions (idempotent)."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, lengths_mask)


def apply(model: nn.Module) -> PatchReport:
    register()
    model.set_attn_implementation(NAME)
    from vlcore.integrations._transformers_losses import PATCHES

    report = PatchReport()
    for name, module in model.named_modules():
        if type(module) in PATCHES:
            module.__class__ = PATCHES[type(module)]
            report.add(f"{type(module).__mro__[2].__name__} (loss)", name or "<model>")
        cls = type(module).__name__
        if cls in KNOWN:
            report.add(cls, name)
        elif isinstance(module, nn.MultiheadAttention):
            report.skipped[name] = "torch nn.MultiheadAttention (not on transformers' attention interface)"
    return report
