"""transformers <-> vlcore: ``BertModel`` weights into :class:`vlcore.nn.text.TextEncoder`, the BERT text
encoder that X-VLM, ViLT, SOHO and VinVL-style models start from; ``CLIPModel`` / ``SiglipModel`` into vlcore's
dual encoder (``models/align.py``, ``layout="clip"`` / ``"siglip"``) and back.

    align = dual_encoder_from_clip(clip_model)            # or dual_encoder_from_siglip(siglip_model)
    clip_model.load_state_dict(to_clip_state_dict(align, clip_model))   # fine-tuned weights back
    report = apply(bert_or_clip_model)   # or keep the transformers model: vlcore attention, padding as lengths

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
from vlcore.integrations._bert import bert_state_dict  # noqa: F401  (public here; needs no transformers)
from vlcore.integrations._mapping import Link, convert_links, invert_links, state_dict_of
from vlcore.nn.text import TextEncoder

_torchvision_compat.ensure()  # transformers' image utilities import torchvision when it is installed
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("vlcore.integrations.transformers needs transformers: pip install -e \".[interop]\"") from e



def apply(model: nn.Module):
    """Run ``model``'s attention (BERT self-attention with padding as ``kv_lens``, CLIP / SigLIP attention,
    causal in CLIP's text tower) on :func:`vlcore.attention` via transformers' attention interface
    (``set_attn_implementation("vlcore")``); returns a :class:`~vlcore.integrations._report.PatchReport`."""
    from vlcore.integrations._transformers_attention import apply as _apply

    return _apply(model)


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


# ------------------------------------------------------------------------------------ CLIP / SigLIP <-> ALIGN
#
# Both have the same encoder layer (layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2) and the
# same text embeddings; they differ in the heads (module docstring of models/align.py).

_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
          "self_attn.out_proj": "attn.proj"}
_TOWERS = {"text_model": "text_encoder", "vision_model": "image_encoder"}
_CLIP_KEYS = {
    "text_model.embeddings.token_embedding.weight": "text_encoder.embeddings.tokens.weight",
    "text_model.embeddings.position_embedding.weight": "text_encoder.embeddings.positions.weight",
    "vision_model.embeddings.patch_embedding.weight": "image_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "image_encoder.patch_embed.proj.bias",
    "vision_model.embeddings.position_embedding.weight": "image_encoder.pos_embed",
    "vision_model.embeddings.class_embedding": "image_encoder.cls_token",
    "logit_scale": "contrastive.logit_scale",
    "logit_bias": "contrastive.logit_bias",
    # CLIP
    "visual_projection.weight": "image_proj.weight",
    "text_projection.weight": "text_proj.weight",
    # SigLIP
    "vision_model.head.probe": "image_pool.pool.queries.0",
    "text_model.head.weight": "text_proj.weight",
    "text_model.head.bias": "text_proj.bias",
}
_NORMS = {"text_model.final_layer_norm": "text_encoder.blocks.norm",
          "vision_model.pre_layrnorm": "image_encoder.norm_pre",
          "vision_model.head.layernorm": "image_pool.norm",
          "vision_model.head.mlp.fc1": "image_pool.mlp.fc1",
          "vision_model.head.mlp.fc2": "image_pool.mlp.fc2",
          "vision_model.head.attention.out_proj": "image_pool.pool.out_proj.0"}


def _dual_links(keys, layout: str) -> list[Link]:
    """Links (``vlcore.integrations._mapping``) for the keys of a CLIPModel / SiglipModel state dict; keys that
    match no rule get no link (the conversion then names them)."""
    links: list[Link] = []
    for key in keys:
        base, _, kind = key.rpartition(".")
        m = re.fullmatch(r"(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)", base)
        if m:
            ours = f"{_TOWERS[m[1]]}.blocks.layers.{m[2]}"
            if m[3] in _LAYER:
                links.append(((key,), (f"{ours}.{_LAYER[m[3]]}.{kind}",), False))
            elif m[3] == "self_attn.q_proj":
                parts = tuple(f"{base[:-6]}{p}_proj.{kind}" for p in "qkv")
                links.append((parts, (f"{ours}.attn.qkv.{kind}",), False))
        elif key in _CLIP_KEYS:
            links.append(((key,), (_CLIP_KEYS[key],), False))
        elif base in _NORMS:
            links.append(((key,), (f"{_NORMS[base]}.{kind}",), False))
        elif base == "vision_model.post_layernorm":  # CLIP: on the class token; SigLIP: on every token
            ours = "image_norm" if layout == "clip" else "image_encoder.blocks.norm"
            links.append(((key,), (f"{ours}.{kind}",), False))
        elif base == "vision_model.head.attention" and kind.startswith("in_proj_"):
            what = kind.removeprefix("in_proj_")
            links.append(((key,), (f"image_pool.pool.q_proj.{what}", f"image_pool.pool.kv_proj.{what}"), False))
    return links


_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
_IGNORE = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _layout(model: nn.Module | Mapping[str, torch.Tensor], align: nn.Module | None = None) -> str:
    if align is not None:
        layout = align.config.layout
        if layout not in ("clip", "siglip"):
            raise ValueError(f"vlcore.integrations.transformers: the dual encoder must be built with layout='clip' "
                             f"or 'siglip' (ALIGNConfig.layout); got layout={layout!r}")
        return layout
    return "siglip" if "text_model.head.weight" in state_dict_of(model) else "clip"


def dual_encoder_state_dict(model: nn.Module | Mapping[str, torch.Tensor], align: nn.Module) -> dict[str, torch.Tensor]:
    """A ``CLIPModel`` / ``SiglipModel`` (or its state dict) as a state dict of vlcore's dual encoder ``align``
    (built with the matching layout)."""
    layout = _layout(model, align)
    state = state_dict_of(model)
    return convert_links(state, _dual_links(state, layout), align, owner=f"transformers {layout} -> vlcore ALIGN",
                         ignore=_IGNORE)


def to_transformers_state_dict(align: nn.Module, model: nn.Module | Mapping[str, torch.Tensor],
                               tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """vlcore's dual encoder as a state dict of ``model`` (a CLIPModel / SiglipModel or its state dict, for the
    key set): the inverse of :func:`dual_encoder_state_dict`. ``tensors``: other tensors keyed like
    ``align``'s state dict (its gradients, say) to move instead of its weights."""
    layout = _layout(model, align)
    full = state_dict_of(model)
    peer = {k: v for k, v in full.items() if not k.startswith(_IGNORE)}
    out = invert_links(align.state_dict() if tensors is None else tensors, _dual_links(peer, layout), peer,
                       owner=f"vlcore ALIGN -> transformers {layout}")
    return {**{k: v for k, v in full.items() if k.startswith(_IGNORE)}, **out}  # index buffers as they are


to_clip_state_dict = to_siglip_state_dict = to_transformers_state_dict


def _dual_config(model: nn.Module, layout: str, embed_dim: int):
    from vlcore.models.align import ALIGNConfig

    tc, vc = model.config.text_config, model.config.vision_config
    acts = {tc.hidden_act, vc.hidden_act}
    if len(acts) != 1 or not acts <= _ACT.keys():
        raise ValueError(f"vlcore.integrations.transformers: both towers need one of {sorted(_ACT)} as hidden_act; "
                         f"got text {tc.hidden_act!r}, vision {vc.hidden_act!r}")
    if tc.layer_norm_eps != vc.layer_norm_eps:
        raise ValueError(f"vlcore.integrations.transformers: the towers' layer_norm_eps differ ({tc.layer_norm_eps} "
                         f"vs {vc.layer_norm_eps}); vlcore's dual encoder has one")
    return ALIGNConfig(vocab_size=tc.vocab_size, image_size=vc.image_size, max_text_len=tc.max_position_embeddings,
                       embed_dim=embed_dim, image_tower="vit", vit_patch=vc.patch_size, vit_dim=vc.hidden_size,
                       vit_depth=vc.num_hidden_layers, vit_heads=vc.num_attention_heads,
                       vit_mlp_ratio=vc.intermediate_size / vc.hidden_size, text_dim=tc.hidden_size,
                       text_depth=tc.num_hidden_layers, text_heads=tc.num_attention_heads,
                       mlp_ratio=tc.intermediate_size / tc.hidden_size, drop_path=0.0, layout=layout,
                       contrastive="infonce" if layout == "clip" else "siglip", act=_ACT[tc.hidden_act],
                       eps=tc.layer_norm_eps)


def dual_encoder_from_clip(model: nn.Module) -> nn.Module:
    """vlcore's dual encoder (ALIGN, ``layout="clip"``) of a ``CLIPModel``'s architecture holding its weights:
    ``encode_image`` / ``encode_text`` equal its normalised ``image_embeds`` / ``text_embeds`` (text ending
    with EOS, the tokenizer's output) and ``forward`` its ``loss`` (``return_loss=True``)."""
    from vlcore.models.align import ALIGN

    align = ALIGN(_dual_config(model, "clip", model.config.projection_dim))
    align.load_state_dict(dual_encoder_state_dict(model, align))
    return align


def dual_encoder_from_siglip(model: nn.Module) -> nn.Module:
    """vlcore's dual encoder (ALIGN, ``layout="siglip"``, the sigmoid loss) of a ``SiglipModel``'s architecture
    holding its weights; ``text_mask`` plays the ``attention_mask`` (all ones: SigLIP's own use, text padded to
    its fixed length)."""
    from vlcore.models.align import ALIGN

    tc, vc = model.config.text_config, model.config.vision_config
    projection = getattr(tc, "projection_size", None) or tc.hidden_size
    if projection != vc.hidden_size or not getattr(vc, "vision_use_head", True):
        raise ValueError(f"dual_encoder_from_siglip: needs the MAP head and text projection_size == vision "
                         f"hidden_size; got vision_use_head={getattr(vc, 'vision_use_head', True)}, "
                         f"projection_size={projection}, hidden_size={vc.hidden_size}")
    align = ALIGN(_dual_config(model, "siglip", vc.hidden_size))
    align.load_state_dict(dual_encoder_state_dict(model, align))
    return align
