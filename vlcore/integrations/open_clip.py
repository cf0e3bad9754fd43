"""open_clip <-> vlcore: weights both ways, patching, and drop-in losses.

    align = dual_encoder_from_open_clip(oc_clip)   # CLIP / SigLIP ViT -> vlcore dual encoder (layout clip/siglip)
    coca = coca_from_open_clip(oc_coca)            # CoCa -> vlcore CoCa (layout="open_clip")
    oc_coca.load_state_dict(to_open_clip_state_dict(coca, oc_coca))   # and back (to_open_clip_dual_state_dict)
    report = apply(oc_model)                       # or keep open_clip's model: vlcore attention patched in
    from vlcore.integrations.open_clip import ClipLoss, SigLipLoss, CoCaLoss   # open_clip's signatures

CoCa (this file): vlcore's CoCa built with ``layout="open_clip"`` reproduces open_clip's architecture exactly.
Image and text embeddings equal open_clip's ``image_features`` / ``text_features`` and the captioning
logits equal its ``logits`` at the text positions (open_clip's pad id 0 and legacy [CLS] mask). Fused
projections are split or joined as vlcore's layout needs (the pooler's one query set becomes the
contrastive query, its first, and the caption queries, the rest); a key that cannot be mapped is named.
CLIP / SigLIP: ``_open_clip_dual.py``; patching: ``_open_clip_attention.py``; losses: ``_open_clip_losses.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from vlcore.integrations import _torchvision_compat
from vlcore.integrations._mapping import UnmappableKeyError, convert, state_dict_of
from vlcore.integrations._open_clip_dual import (  # noqa: F401  (public here)
    dual_encoder_from_open_clip,
    dual_encoder_state_dict,
    to_open_clip_dual_state_dict,
)


def apply(model: nn.Module):
    """Patch vlcore's attention into ``model``'s open_clip ``ResidualAttentionBlock`` (vision; text with its
    causal mask; CoCa's cross-attention) and ``AttentionalPooler`` modules in place; returns a
    :class:`~vlcore.integrations._report.PatchReport`. Needs open_clip (the weight conversion does not)."""
    _torchvision_compat.ensure()
    try:
        from vlcore.integrations._open_clip_attention import apply as _apply
    except ImportError as e:
        raise ImportError("vlcore.integrations.open_clip.apply needs open_clip: pip install -e \".[interop]\"") from e
    return _apply(model)


def __getattr__(name: str):
    """``ClipLoss`` / ``SigLipLoss`` / ``CoCaLoss``: open_clip's losses on vlcore's op (drop-in, same signature)."""
    if name in ("ClipLoss", "SigLipLoss", "CoCaLoss"):
        from vlcore.integrations import _open_clip_losses

        return getattr(_open_clip_losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# the self-attention block of a multimodal layer: its MLP is the layer's second one (``self_mlp``)
_DECODER_SELF = {**_BLOCK, "ln_2": "norm_self_mlp", "mlp.c_fc": "self_mlp.fc1", "mlp.c_proj": "self_mlp.fc2"}
_DECODER_CROSS = {"ln_1": "norm_cross", "ln_1_kv": "norm_context", "attn.out_proj": "cross_attn.proj",
                  "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_SIMPLE = {"text.token_embedding.weight": "token_embed.weight", "text.cls_emb": "cls_embed",
           "text.positional_embedding": "pos_embed", "visual.conv1.weight": "vision.patch_embed.proj.weight",
           "logit_scale": "contrastive.logit_scale"}
_NORMS = {"visual.ln_pre": "vision.norm_pre", "visual.ln_post": "caption_norm", "text.ln_final": "text_norm",
          "text_decoder.ln_final": "multimodal.norm", "visual.attn_pool.ln_q": "pool.norm_q",
          "visual.attn_pool.ln_k": "pool.norm_context"}
_TRANSPOSED = {"visual.proj": "image_proj.weight", "text.text_projection": "text_proj.weight",
               "text_decoder.text_projection": "lm_head.weight"}


def _block(table: dict[str, str], prefix: str, rest: str, value: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    m = re.fullmatch(r"(.+)\.(weight|bias)", rest)
    if m and m[1] in table:
        yield f"{prefix}.{table[m[1]]}.{m[2]}", value


def _tensors(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(open_clip key, vlcore key, tensor) for every key of ``state``; vlcore key None when unmappable."""
    pool = "visual.attn_pool."
    for key, value in state.items():
        out: list[tuple[str, torch.Tensor]] = []
        if key == pool + "attn.v_proj_weight":  # joined with k_proj_weight into vlcore's fused kv_proj
            continue
        if key in _SIMPLE:
            out = [(_SIMPLE[key], value)]
        elif key == "visual.class_embedding":
            out = [("vision.cls_token", value.view(1, 1, -1))]
        elif key == "visual.positional_embedding":
            out = [("vision.pos_embed", value.unsqueeze(0))]
        elif key in _TRANSPOSED:
            out = [(_TRANSPOSED[key], value.t())]
        elif key.rsplit(".", 1)[0] in _NORMS:
            out = [(f"{_NORMS[key.rsplit('.', 1)[0]]}.{key.rsplit('.', 1)[1]}", value)]
        elif key == pool + "query":  # query 0 is open_clip's contrastive query, the rest caption the image
            out = [("pool.queries.0", value[1:]), ("pool.queries.1", value[:1])]
        elif key.startswith(pool + "attn."):
            out = list(_pool_attention(key[len(pool) + 5:], value, state, pool + "attn."))
        elif m := re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key):
            out = list(_block(_BLOCK, f"vision.blocks.layers.{m[1]}", _dotted(m[2]), value))
        elif m := re.fullmatch(r"text\.transformer\.resblocks\.(\d+)\.(.+)", key):
            out = list(_block(_BLOCK, f"unimodal.layers.{m[1]}", _dotted(m[2]), value))
        elif m := re.fullmatch(r"text_decoder\.resblocks\.(\d+)\.(.+)", key):
            out = list(_block(_DECODER_SELF, f"multimodal.layers.{m[1]}", _dotted(m[2]), value))
        elif m := re.fullmatch(r"text_decoder\.cross_attn\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            d = value.shape[0] // 3  # q from the text, k and v from the image: vlcore's q and fused kv
            prefix = f"multimodal.layers.{m[1]}.cross_attn"
            out = [(f"{prefix}.q.{m[2]}", value[:d]), (f"{prefix}.kv.{m[2]}", value[d:])]
        elif m := re.fullmatch(r"text_decoder\.cross_attn\.(\d+)\.(.+)", key):
            out = list(_block(_DECODER_CROSS, f"multimodal.layers.{m[1]}", _dotted(m[2]), value))
        if not out:
            yield key, None, value
        for new, tensor in out:
            yield key, new, tensor


def _dotted(rest: str) -> str:
    """``attn.in_proj_weight`` -> ``attn.in_proj.weight`` (nn.MultiheadAttention's flat parameter names)."""
    return re.sub(r"_(weight|bias)$", r".\1", rest)


def _pool_attention(rest: str, value: torch.Tensor, state: Mapping[str, torch.Tensor],
                    prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The pooler's nn.MultiheadAttention (separate q/k/v weights when the context width differs, else one
    in_proj) as vlcore's q_proj + fused kv_proj; its one out_proj serves both of vlcore's query sets."""
    if rest == "q_proj_weight":
        yield "pool.q_proj.weight", value
    elif rest == "k_proj_weight":
        yield "pool.kv_proj.weight", torch.cat([value, state[prefix + "v_proj_weight"]])
    elif rest in ("in_proj_weight", "in_proj_bias"):
        d = value.shape[0] // 3
        kind = rest.rsplit("_", 1)[1]
        if kind == "weight":
            yield "pool.q_proj.weight", value[:d]
            yield "pool.kv_proj.weight", value[d:]
        else:
            yield "pool.q_proj.bias", value[:d]
            yield "pool.kv_proj.bias", value[d:]
    elif m := re.fullmatch(r"out_proj\.(weight|bias)", rest):
        yield f"pool.out_proj.0.{m[1]}", value
        yield f"pool.out_proj.1.{m[1]}", value


def coca_state_dict(open_clip_coca: nn.Module | Mapping[str, torch.Tensor], coca: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip CoCa's (or its state dict's) weights as a state dict of ``coca`` (layout="open_clip")."""
    if getattr(coca.config, "layout", None) != "open_clip":
        raise ValueError("coca_state_dict: build vlcore's CoCa with layout='open_clip' to hold open_clip weights")
    converted: dict[str, torch.Tensor] = {}
    for key, new, tensor in _tensors(state_dict_of(open_clip_coca)):
        if new is None:
            raise UnmappableKeyError(f"open_clip CoCa -> vlcore CoCa: cannot map checkpoint key {key!r}")
        converted[new] = tensor
    # open_clip's patch convolution has no bias: vlcore's is zero
    bias = coca.vision.patch_embed.proj.bias
    converted.setdefault("vision.patch_embed.proj.bias", torch.zeros_like(bias))
    return convert(converted, lambda k: k, coca, owner="open_clip CoCa -> vlcore CoCa")


def coca_from_open_clip(model: nn.Module, **config_overrides) -> nn.Module:
    """vlcore's CoCa (layout="open_clip") of ``model``'s architecture holding its weights."""
    from vlcore.models.coca import CoCa, CoCaConfig

    visual, text, dec = model.visual, model.text, model.text_decoder
    vision_block, text_block = visual.transformer.resblocks[0], text.transformer.resblocks[0]
    pool = visual.attn_pool
    if pool is None or text.cls_emb is None:
        raise ValueError("coca_from_open_clip: expects open_clip's CoCa (attentional pooler, text [CLS])")
    if pool.attn.num_heads != text.heads:
        raise ValueError(f"coca_from_open_clip: vlcore's pooler uses the text heads ({text.heads}); open_clip's "
                         f"has {pool.attn.num_heads}")
    width = visual.transformer.width
    config = CoCaConfig(
        vocab_size=dec.text_projection.shape[1], image_size=_square(visual.image_size),
        max_text_len=text.num_pos - 1, patch_size=_square(visual.patch_size), vision_dim=width,
        vision_depth=len(visual.transformer.resblocks), vision_heads=vision_block.attn.num_heads,
        vision_mlp_ratio=vision_block.mlp.c_fc.out_features / width, text_dim=text.width, text_heads=text.heads,
        unimodal_depth=len(text.transformer.resblocks), multimodal_depth=len(dec.resblocks),
        text_mlp_ratio=text_block.mlp.c_fc.out_features / text.width, caption_queries=pool.query.shape[0] - 1,
        embed_dim=text.text_projection.shape[1], layout="open_clip", **config_overrides)
    coca = CoCa(config)
    coca.load_state_dict(coca_state_dict(model, coca))
    return coca


def _square(value) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"vlcore.integrations.open_clip: vlcore's ViT needs square sizes; got {tuple(value)}")
    return int(a)


# ------------------------------------------------------------------------------------- vlcore -> open_clip

def _inverse_block(table: dict[str, str], oc_prefix: str, rest: str, ours: Mapping[str, torch.Tensor],
                   our_prefix: str) -> torch.Tensor | None:
    m = re.fullmatch(r"(.+)_(weight|bias)|(.+)\.(weight|bias)", rest)
    name, kind = (m[1], m[2]) if m[1] else (m[3], m[4])
    return ours.get(f"{our_prefix}.{table[name]}.{kind}") if name in table else None


def to_open_clip_state_dict(coca: nn.Module, open_clip_coca: nn.Module | Mapping[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """vlcore's CoCa (layout="open_clip") as a state dict of ``open_clip_coca`` (a model or its state dict,
    used for the key set): the inverse of :func:`coca_state_dict`. Raises when a vlcore tensor has no place
    in open_clip (a non-zero patch bias, two different pooler output projections)."""
    ours = coca.state_dict()
    if ours["vision.patch_embed.proj.bias"].abs().max() > 0:
        raise ValueError("to_open_clip_state_dict: open_clip's patch convolution has no bias; vlcore's is non-zero")
    if not torch.equal(ours["pool.out_proj.0.weight"], ours["pool.out_proj.1.weight"]) or not torch.equal(
            ours["pool.out_proj.0.bias"], ours["pool.out_proj.1.bias"]):
        raise ValueError("to_open_clip_state_dict: open_clip's pooler has one output projection; vlcore's two "
                         "(pool.out_proj.0 / .1) differ")
    out: dict[str, torch.Tensor] = {}
    for key in state_dict_of(open_clip_coca):
        value = None
        base, _, kind = key.rpartition(".")
        if key in _SIMPLE:
            value = ours[_SIMPLE[key]]
        elif key == "visual.class_embedding":
            value = ours["vision.cls_token"].reshape(-1)
        elif key == "visual.positional_embedding":
            value = ours["vision.pos_embed"][0]
        elif key in _TRANSPOSED:
            value = ours[_TRANSPOSED[key]].t()
        elif base in _NORMS:
            value = ours[f"{_NORMS[base]}.{kind}"]
        elif key == "visual.attn_pool.query":
            value = torch.cat([ours["pool.queries.1"], ours["pool.queries.0"]])
        elif key.startswith("visual.attn_pool.attn."):
            value = _inverse_pool(key[len("visual.attn_pool.attn."):], ours)
        elif m := re.fullmatch(r"(visual|text)\.transformer\.resblocks\.(\d+)\.(.+)", key):
            tower = "vision.blocks" if m[1] == "visual" else "unimodal"
            value = _inverse_block(_BLOCK, key, m[3], ours, f"{tower}.layers.{m[2]}")
        elif m := re.fullmatch(r"text_decoder\.resblocks\.(\d+)\.(.+)", key):
            value = _inverse_block(_DECODER_SELF, key, m[2], ours, f"multimodal.layers.{m[1]}")
        elif m := re.fullmatch(r"text_decoder\.cross_attn\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            prefix = f"multimodal.layers.{m[1]}.cross_attn"
            value = torch.cat([ours[f"{prefix}.q.{m[2]}"], ours[f"{prefix}.kv.{m[2]}"]])
        elif m := re.fullmatch(r"text_decoder\.cross_attn\.(\d+)\.(.+)", key):
            value = _inverse_block(_DECODER_CROSS, key, m[2], ours, f"multimodal.layers.{m[1]}")
        if value is None:
            raise UnmappableKeyError(f"vlcore CoCa -> open_clip CoCa: no vlcore tensor for open_clip key {key!r}")
        out[key] = value
    return out


def _inverse_pool(rest: str, ours: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    q, kv = ours["pool.q_proj.weight"], ours["pool.kv_proj.weight"]
    d = q.shape[0]
    if rest == "in_proj_weight":  # one fused projection when the context width equals the pooler's
        return torch.cat([q, kv])
    parts = {
        "q_proj_weight": lambda: q,
        "k_proj_weight": lambda: kv[:d],
        "v_proj_weight": lambda: kv[d:],
        "in_proj_bias": lambda: torch.cat([ours["pool.q_proj.bias"], ours["pool.kv_proj.bias"]]),
        "out_proj.weight": lambda: ours["pool.out_proj.0.weight"],
        "out_proj.bias": lambda: ours["pool.out_proj.0.bias"],
    }
    return parts[rest]() if rest in parts else None
