"""timm -> vlcore: ViT (``timm.models.vision_transformer.VisionTransformer``) and Swin
(``timm.models.swin_transformer.SwinTransformer``) weights into :class:`vlcore.nn.vit.ViT` /
:class:`vlcore.nn.swin.SwinEncoder`, the vision towers of vlcore's models.

    vit = vit_from_timm(timm.create_model("vit_base_patch16_224", pretrained=True))
    swin = swin_from_timm(timm_swin)            # or load_swin(existing_swin_encoder, timm_state_dict)
    report = apply(timm_model)                  # or keep the timm model and patch vlcore's attention in

Outputs equal timm's ``forward_features`` (ViT: (B, [1 +] N, D); Swin: the same tokens flattened row-major,
(B, H * W, C)). The Swin relative-position table has timm's layout and is copied as is. A timm variant with
parts vlcore's blocks lack (layer scale, q/k norm, register tokens, pre-norm, fc-norm) fails with the name of
the first key it cannot map; the classifier head is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from vlcore.integrations import _torchvision_compat
from vlcore.integrations._mapping import convert, state_dict_of
from vlcore.nn.swin import PatchMerging, SwinEncoder
from vlcore.nn.vit import ViT


def apply(model: nn.Module):
    """Patch vlcore's attention into ``model``'s timm ViT ``Attention`` / Swin ``WindowAttention`` modules in
    place; returns a :class:`~vlcore.integrations._timm_attention.PatchReport`. Needs timm (the weight
    conversion below does not)."""
    _torchvision_compat.ensure()
    try:
        from vlcore.integrations._timm_attention import apply as _apply
    except ImportError as e:
        raise ImportError("vlcore.integrations.timm.apply needs timm: pip install -e \".[interop]\"") from e
    return _apply(model)


_HEAD = ("head.", "fc_norm.", ".relative_position_index", ".attn_mask")


# ----------------------------------------------------------------------------------------------------- ViT

def _vit_key(key: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key)
    if m:
        return f"blocks.layers.{m[1]}.{m[2]}.{m[3]}"
    if key.startswith("norm."):
        return "blocks." + key
    if key in ("cls_token", "pos_embed") or key.startswith("patch_embed.proj."):
        return key
    return None


def vit_state_dict(timm_vit: nn.Module | Mapping[str, torch.Tensor], vit: ViT) -> dict[str, torch.Tensor]:
    """A timm ViT's (or its state dict's) weights as a state dict of ``vit``."""
    return convert(state_dict_of(timm_vit), _vit_key, vit, owner="timm ViT -> vlcore ViT", ignore=_HEAD)


def load_vit(vit: ViT, timm_vit: nn.Module | Mapping[str, torch.Tensor]) -> ViT:
    vit.load_state_dict(vit_state_dict(timm_vit, vit))
    return vit


def vit_from_timm(model: nn.Module, **vit_kwargs) -> ViT:
    """A :class:`ViT` of ``model``'s architecture holding its weights (``vit_kwargs``: checkpoint, backend)."""
    pe, blocks = model.patch_embed, model.blocks
    size, patch = _square(pe.img_size, "img_size"), _square(pe.patch_size, "patch_size")
    dim = model.embed_dim
    vit = ViT(size, patch, dim, len(blocks), blocks[0].attn.num_heads, blocks[0].mlp.fc1.out_features / dim,
              cls_token=getattr(model, "cls_token", None) is not None, **vit_kwargs)
    return load_vit(vit, model)


# ---------------------------------------------------------------------------------------------------- Swin

def _swin_block_index(depths: tuple[int, ...]) -> tuple[dict[tuple[int, int], int], dict[int, int]]:
    """(stage, block) -> index in SwinEncoder.blocks, and stage -> index of its PatchMerging."""
    blocks, merges, i = {}, {}, 0
    for stage, depth in enumerate(depths):
        if stage:
            merges[stage], i = i, i + 1
        for j in range(depth):
            blocks[(stage, j)], i = i, i + 1
    return blocks, merges


def swin_state_dict(timm_swin: nn.Module | Mapping[str, torch.Tensor], swin: SwinEncoder) -> dict[str, torch.Tensor]:
    """A timm Swin's (or its state dict's) weights as a state dict of ``swin`` (same stages)."""
    blocks, merges = _swin_block_index(swin_depths(swin))

    def rename(key: str) -> str | None:
        m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
        if m and (int(m[1]), int(m[2])) in blocks:
            rest = "attn.rel_pos_table" if m[3] == "attn.relative_position_bias_table" else m[3]
            return f"blocks.{blocks[(int(m[1]), int(m[2]))]}.{rest}"
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.((norm|reduction)\..+)", key)
        if m and int(m[1]) in merges:
            return f"blocks.{merges[int(m[1])]}.{m[2]}"
        if key.startswith("patch_embed.norm."):
            return "patch_norm." + key[len("patch_embed.norm."):]
        if key.startswith(("patch_embed.proj.", "norm.")):
            return key
        return None

    return convert(state_dict_of(timm_swin), rename, swin, owner="timm Swin -> vlcore SwinEncoder", ignore=_HEAD)


def swin_depths(swin: SwinEncoder) -> tuple[int, ...]:
    """Blocks per stage of a vlcore :class:`SwinEncoder` (stages are separated by its PatchMerging blocks)."""
    depths = [0]
    for block in swin.blocks:
        if isinstance(block, PatchMerging):
            depths.append(0)
        else:
            depths[-1] += 1
    return tuple(depths)


def load_swin(swin: SwinEncoder, timm_swin: nn.Module | Mapping[str, torch.Tensor]) -> SwinEncoder:
    """``timm_swin``'s (a timm Swin or its state dict) weights into ``swin``, whose stages must match."""
    swin.load_state_dict(swin_state_dict(timm_swin, swin))
    return swin


def swin_from_timm(model: nn.Module, **swin_kwargs) -> SwinEncoder:
    """A :class:`SwinEncoder` of ``model``'s architecture holding its weights (``swin_kwargs``: checkpoint,
    backend)."""
    depths = tuple(len(layer.blocks) for layer in model.layers)
    heads = tuple(layer.blocks[0].attn.num_heads for layer in model.layers)
    first = model.layers[0].blocks[0]
    window = _square(first.window_size, "window_size")
    swin = SwinEncoder(_square(model.patch_embed.img_size, "img_size"), _square(model.patch_embed.patch_size,
                       "patch_size"), model.embed_dim, depths, heads, window,
                       first.mlp.fc1.out_features / first.mlp.fc1.in_features, **swin_kwargs)
    return load_swin(swin, model)


def _square(value, name: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"vlcore.integrations.timm: vlcore's blocks need a square {name}; got {tuple(value)}")
    return int(a)
