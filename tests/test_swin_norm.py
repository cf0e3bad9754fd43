"""Swin's LayerNorms use eps 1e-5 as timm and the original Swin do (timm weights load unchanged and give the
same outputs): checked against an independently written LayerNorm, and against timm's when it is installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcore.nn.swin import SwinEncoder


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _encoder():
    return SwinEncoder(32, patch_size=4, embed_dim=16, depths=(2, 2), heads=(2, 4), window=4, backend="reference")


def test_every_swin_layernorm_matches_eps_1e5_on_small_variance_tokens():
    enc = _encoder()
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 4 + 1  # patch, final; two per block; patch merging
    for norm in norms:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
        x = torch.randn(2, 5, norm.normalized_shape[0], dtype=torch.float64) * 1e-3  # variance 1e-6 ~ eps
        torch.testing.assert_close(norm.double()(x), _layer_norm(x, norm.weight, norm.bias), rtol=1e-9, atol=1e-9)


def test_matches_timm_layernorm():
    timm = pytest.importorskip("timm", reason="timm not installed")
    enc = _encoder()
    x = torch.randn(2, 5, 16) * 1e-3
    # the norm layer timm's Swin really builds (timm.layers.LayerNorm defaults to eps 1e-6; Swin does not use it)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(2,), num_heads=(2,), num_classes=0)
    theirs = swin.layers[0].blocks[0].norm1
    theirs.load_state_dict(enc.patch_norm.state_dict())
    torch.testing.assert_close(enc.patch_norm(x), theirs(x))
