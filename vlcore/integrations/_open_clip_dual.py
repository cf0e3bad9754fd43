"""open_clip CLIP / SigLIP <-> vlcore's dual encoder (``models/align.py``, ``layout="clip"`` / ``"siglip"``).

Two open_clip families are mapped: CLIP ViTs (``open_clip.CLIP``: open_clip's own ViT with a class token,
``ln_pre``, ``ln_post`` and ``(D, E)`` projection matrices; a causal text tower pooled at EOT) and SigLIP ViTs
(``open_clip.CustomTextCLIP``: a timm ViT trunk with a MAP head, ``visual.trunk.*``; a bidirectional text
tower pooled at the last position with a biased ``nn.Linear`` projection). Public API: the re-exports in
:mod:`vlcore.integrations.open_clip`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from vlcore.integrations._mapping import Link, convert_links, invert_links, state_dict_of

_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TIMM_BLOCK = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_SIMPLE = {"token_embedding.weight": "text_encoder.embeddings.tokens.weight",
           "positional_embedding": "text_encoder.embeddings.positions.weight",
           "text_projection.weight": "text_proj.weight", "text_projection.bias": "text_proj.bias",
           "logit_scale": "contrastive.logit_scale", "logit_bias": "contrastive.logit_bias",
           "visual.class_embedding": "image_encoder.cls_token",
           "visual.positional_embedding": "image_encoder.pos_embed",
           "visual.conv1.weight": "image_encoder.patch_embed.proj.weight",
           "visual.trunk.pos_embed": "image_encoder.pos_embed",
           "visual.trunk.attn_pool.latent": "image_pool.pool.queries.0"}
_NORMS = {"ln_final": "text_encoder.blocks.norm", "visual.ln_pre": "image_encoder.norm_pre",
          "visual.ln_post": "image_norm", "visual.trunk.patch_embed.proj": "image_encoder.patch_embed.proj",
          "visual.trunk.norm": "image_encoder.blocks.norm", "visual.trunk.attn_pool.q": "image_pool.pool.q_proj",
          "visual.trunk.attn_pool.kv": "image_pool.pool.kv_proj",
          "visual.trunk.attn_pool.proj": "image_pool.pool.out_proj.0",
          "visual.trunk.attn_pool.norm": "image_pool.norm", "visual.trunk.attn_pool.mlp.fc1": "image_pool.mlp.fc1",
          "visual.trunk.attn_pool.mlp.fc2": "image_pool.mlp.fc2"}
_TRANSPOSED = {"visual.proj": "image_proj.weight", "text_projection": "text_proj.weight"}
_IGNORE = ("attn_mask", "text.attn_mask")


def _links(keys: Iterable[str]) -> list[Link]:
    """Links for the keys of an open_clip CLIP / CustomTextCLIP state dict (``text.`` prefix of the latter
    dropped); a key no rule matches gets none (the conversion names it)."""
    links: list[Link] = []
    for key in keys:
        name = key.removeprefix("text.")
        base, _, kind = name.rpartition(".")
        block, _, flat_kind = re.sub(r"_(weight|bias)$", r".\1", name).rpartition(".")  # attn.in_proj_weight
        if m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", block):
            tower = "image_encoder" if m[1] else "text_encoder"
            if m[3] in _BLOCK:
                links.append(((key,), (f"{tower}.blocks.layers.{m[2]}.{_BLOCK[m[3]]}.{flat_kind}",), False))
        elif m := re.fullmatch(r"visual\.trunk\.blocks\.(\d+)\.(.+)", base):
            if m[2] in _TIMM_BLOCK:
                links.append(((key,), (f"image_encoder.blocks.layers.{m[1]}.{_TIMM_BLOCK[m[2]]}.{kind}",), False))
        elif name in _SIMPLE:
            links.append(((key,), (_SIMPLE[name],), False))
        elif name in _TRANSPOSED:
            links.append(((key,), (_TRANSPOSED[name],), True))
        elif base in _NORMS:
            links.append(((key,), (f"{_NORMS[base]}.{kind}",), False))
    return links


def _check_layout(align: nn.Module) -> str:
    layout = getattr(align.config, "layout", None)
    if layout not in ("clip", "siglip"):
        raise ValueError(f"vlcore.integrations.open_clip: the dual encoder must be built with layout='clip' or "
                         f"'siglip' (ALIGNConfig.layout); got layout={layout!r}")
    return layout


def dual_encoder_state_dict(model: nn.Module | Mapping[str, torch.Tensor], align: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip CLIP / SigLIP model (or its state dict) as a state dict of vlcore's dual encoder ``align``."""
    layout = _check_layout(align)
    state = state_dict_of(model)
    return convert_links(state, _links(state), align, owner=f"open_clip {layout} -> vlcore ALIGN", ignore=_IGNORE)


def to_open_clip_dual_state_dict(align: nn.Module, model: nn.Module | Mapping[str, torch.Tensor],
                                 tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """vlcore's dual encoder as a state dict of the open_clip ``model`` (or its state dict, for the key set);
    ``tensors``: other tensors keyed like ``align``'s state dict (its gradients) to move instead."""
    layout = _check_layout(align)
    full = state_dict_of(model)
    peer = {k: v for k, v in full.items() if not k.startswith(_IGNORE)}
    out = invert_links(align.state_dict() if tensors is None else tensors, _links(peer), peer,
                       owner=f"vlcore ALIGN -> open_clip {layout}")
    return {**{k: v for k, v in full.items() if k.startswith(_IGNORE)}, **out}  # mask buffers as they are


def _act(mlp: nn.Module) -> str:
    act = next(m for m in mlp.children() if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.LayerNorm)))
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"vlcore.integrations.open_clip: unsupported MLP activation {type(act).__name__}")


def dual_encoder_from_open_clip(model: nn.Module) -> nn.Module:
    """vlcore's dual encoder of an open_clip CLIP ViT (``layout="clip"``) or SigLIP ViT (timm trunk with a MAP
    head: ``layout="siglip"``) holding its weights; ``encode_image`` / ``encode_text`` equal open_clip's
    normalised ``encode_image`` / ``encode_text`` (CLIP: text ending with EOT, open_clip's tokenizer output)."""
    from vlcore.models.align import ALIGN, ALIGNConfig

    text = getattr(model, "text", model)  # CustomTextCLIP holds the text tower as `.text`
    pool = getattr(text, "pool_type", getattr(model, "text_pool_type", None))
    causal = getattr(text, "attn_mask", None) is not None
    block = text.transformer.resblocks[0]
    width = text.transformer.width
    common = dict(vocab_size=text.token_embedding.num_embeddings, max_text_len=text.positional_embedding.shape[0],
                  image_tower="vit", text_dim=width, text_depth=len(text.transformer.resblocks),
                  text_heads=block.attn.num_heads, mlp_ratio=block.mlp.c_fc.out_features / width, drop_path=0.0,
                  act=_act(block.mlp), eps=text.ln_final.eps)
    visual = model.visual
    if hasattr(visual, "conv1") and causal and pool in ("argmax", "eos"):
        vb = visual.transformer.resblocks[0]
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" \
                or isinstance(visual.ln_pre, nn.Identity) or visual.proj is None:
            raise ValueError("dual_encoder_from_open_clip: vlcore's clip layout needs open_clip's standard ViT "
                             "(class-token pooling, ln_pre, ln_post, a projection)")
        vw = visual.transformer.width
        config = ALIGNConfig(**common, image_size=_square(visual.image_size), embed_dim=visual.proj.shape[1],
                             vit_patch=_square(visual.patch_size), vit_dim=vw,
                             vit_depth=len(visual.transformer.resblocks), vit_heads=vb.attn.num_heads,
                             vit_mlp_ratio=vb.mlp.c_fc.out_features / vw, vit_act=_act(vb.mlp), layout="clip",
                             contrastive="siglip" if getattr(model, "logit_bias", None) is not None else "infonce")
    elif hasattr(visual, "trunk") and not causal and pool == "last":
        trunk = visual.trunk
        vb, ap = trunk.blocks[0], getattr(trunk, "attn_pool", None)
        if ap is None or trunk.cls_token is not None or not isinstance(trunk.norm_pre, nn.Identity):
            raise ValueError("dual_encoder_from_open_clip: vlcore's siglip layout needs a timm ViT trunk with a MAP "
                             "head, no class token and no pre-norm")
        vw = trunk.embed_dim
        config = ALIGNConfig(**common, image_size=_square(trunk.patch_embed.img_size), embed_dim=vw,
                             vit_patch=_square(trunk.patch_embed.patch_size), vit_dim=vw, vit_depth=len(trunk.blocks),
                             vit_heads=vb.attn.num_heads, vit_mlp_ratio=vb.mlp.fc1.out_features / vw,
                             vit_act=_act(vb.mlp), layout="siglip", contrastive="siglip")
        if trunk.norm.eps != config.layer_norm_eps:
            raise ValueError(f"dual_encoder_from_open_clip: the towers' LayerNorm eps differ ({trunk.norm.eps} vs "
                             f"{config.layer_norm_eps}); vlcore's dual encoder has one")
    else:
        raise ValueError(f"dual_encoder_from_open_clip: unsupported open_clip model (vision {type(visual).__name__}, "
                         f"text pool_type={pool!r}, causal text={causal}): vlcore maps CLIP ViTs (causal text "
                         f"pooled at EOT) and SigLIP ViTs (timm trunk + MAP head, bidirectional text pooled last)")
    align = ALIGN(config)
    align.load_state_dict(dual_encoder_state_dict(model, align))
    return align


def _square(value) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"vlcore.integrations.open_clip: vlcore's ViT needs square sizes; got {tuple(value)}")
    return int(a)
