"""ALIGN (Jia et al., ICML 2021): a dual encoder trained with a contrastive loss on noisy alt-text pairs.

* Image tower: EfficientNet (paper: EfficientNet-L2; ``align-base``: B7 as in the public ALIGN-base release)
  whose head conv outputs the embedding width; the image embedding is its global average pool. A ViT tower
  (``image_tower="vit"``: class token -> linear projection) can be chosen by config.
* Text tower: BERT encoder (``vlcore.nn.text.TextEncoder``); the text embedding is the [CLS] (our BOS) output
  through a linear layer to the embedding width.
* Loss: symmetric InfoNCE over the global batch through ``vlcore.contrastive_loss`` with a learnable temperature
  (``vlcore.nn.ContrastiveLoss``). Not reproduced: ALIGN's label smoothing (0.1) — the op has no smoothing term.

Layouts (``ALIGNConfig.layout``, to run public dual-encoder checkpoints unchanged through
``vlcore.integrations.transformers`` / ``.open_clip``; the default stays the paper's):

* ``"clip"`` (Radford et al., 2021): ViT with a class token, bias-free patch projection, a LayerNorm before the
  blocks and one on the class token after them, bias-free projections; a causal text encoder (no segment
  embeddings, no embedding LayerNorm) pooled at EOS (the last valid token); InfoNCE.
* ``"siglip"`` (Zhai et al., 2023): ViT without class token, final LayerNorm, MAP head (``vlcore.nn.MAPHead``)
  as the image embedding (no projection); a bidirectional text encoder pooled at the last position, projected
  with a bias; the sigmoid loss (``contrastive="siglip"``).

``act`` (``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"``; ``vit_act`` for the image tower when it differs) and
``eps`` (None: 1e-5 for clip, 1e-6 otherwise) set the MLP activation and the LayerNorm epsilon of the towers.
``text_post_norm=True`` (paper layout) builds the text tower with BERT's post-norm layers (eps 1e-12), to start
it from a BERT checkpoint (``vlcore pretrain --init-text``).

Batch keys: ``image``, ``text``, ``text_mask``. Provides ``encode_image`` / ``encode_text`` (L2-normalised;
retrieval and zero-shot heads), ``image_tokens`` (feature-map tokens for the captioning head) and
``joint_embedding`` = [u, v, u*v] of the two embeddings (for the classification heads, no fusion encoder).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.nn.contrastive import ContrastiveLoss
from vlcore.nn.efficientnet import EfficientNet
from vlcore.nn.pool import MAPHead
from vlcore.nn.text import TextEncoder
from vlcore.nn.transformer import LN_EPS, init_weights
from vlcore.nn.vit import ViT, check_image

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class ALIGNConfig:
    vocab_size: int = 30522
    image_size: int = 289
    max_text_len: int = 64
    embed_dim: int = 640
    image_tower: str = "efficientnet"  # or "vit"
    effnet_width: float = 2.0  # B7
    effnet_depth: float = 3.1
    drop_path: float = 0.2
    vit_patch: int = 16
    vit_dim: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    text_dim: int = 768
    text_depth: int = 12
    text_heads: int = 12
    mlp_ratio: float = 4.0
    checkpoint: bool = False
    layout: str = "paper"  # "clip" / "siglip": the public dual encoders' architectures (module docstring)
    contrastive: str = "infonce"  # or "siglip" (the sigmoid loss; needs no particular layout)
    act: str = "gelu"
    vit_act: str | None = None  # None: act (open_clip's SigLIP towers differ: timm's tanh GELU, exact in text)
    eps: float | None = None
    vit_mlp_ratio: float | None = None  # None: mlp_ratio (the towers of CLIP checkpoints may differ)
    # BERT's post-norm text layers (LayerNorm eps 1e-12), to start the text tower from a BERT checkpoint
    # (vlcore pretrain --init-text); layout "paper" only
    text_post_norm: bool = False

    @property
    def layer_norm_eps(self) -> float:
        return self.eps if self.eps is not None else (1e-5 if self.layout == "clip" else LN_EPS)


LAYOUTS = ("paper", "clip", "siglip")


class ALIGN(nn.Module):
    name = "align"

    def __init__(self, config: ALIGNConfig):
        super().__init__()
        c = self.config = config
        if c.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}; got {c.layout!r}")
        if c.layout != "paper" and c.image_tower != "vit":
            raise ValueError(f"{self.name}: layout={c.layout!r} needs image_tower='vit'; got {c.image_tower!r}")
        eps, clip, siglip = c.layer_norm_eps, c.layout == "clip", c.layout == "siglip"
        self.image_norm = self.image_pool = None
        if c.image_tower == "efficientnet":
            self.image_encoder = EfficientNet(c.effnet_width, c.effnet_depth, out_dim=c.embed_dim,
                                              drop_path=c.drop_path)
            self.image_proj = None
        elif c.image_tower == "vit":
            self.image_encoder = ViT(c.image_size, c.vit_patch, c.vit_dim, c.vit_depth, c.vit_heads,
                                     c.vit_mlp_ratio or c.mlp_ratio, cls_token=not siglip, checkpoint=c.checkpoint,
                                     pre_norm=clip, final_norm=not clip, eps=eps, act=c.vit_act or c.act,
                                     patch_bias=not clip)
            if clip:
                self.image_norm = nn.LayerNorm(c.vit_dim, eps=eps)
            if siglip:
                if c.embed_dim != c.vit_dim:
                    raise ValueError(f"{self.name}: layout='siglip' has no image projection: embed_dim must equal "
                                     f"vit_dim ({c.vit_dim}); got {c.embed_dim}")
                self.image_pool = MAPHead(c.vit_dim, c.vit_heads, c.vit_mlp_ratio or c.mlp_ratio, eps,
                                          c.vit_act or c.act)
                self.image_proj = None
            else:
                self.image_proj = nn.Linear(c.vit_dim, c.embed_dim, bias=not clip)
        else:
            raise ValueError(f"{self.name}: image_tower must be 'efficientnet' or 'vit'; got {c.image_tower!r}")
        paper = c.layout == "paper"
        if c.text_post_norm and not paper:
            raise ValueError(f"{self.name}: text_post_norm=True (BERT's layers) needs layout='paper'; got "
                             f"{c.layout!r}")
        self.text_encoder = TextEncoder(c.vocab_size, c.text_dim, c.text_depth, c.text_heads, c.max_text_len,
                                        c.mlp_ratio, checkpoint=c.checkpoint,
                                        eps=1e-12 if c.text_post_norm and c.eps is None else eps,
                                        segments=2 if paper else 0, embed_norm=paper, causal=clip, act=c.act,
                                        post_norm=c.text_post_norm)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim, bias=not clip)
        self.contrastive = ContrastiveLoss(c.contrastive)
        init_weights(self.text_encoder)
        init_weights(self.text_proj)
        if c.image_tower == "vit":
            init_weights(self.image_encoder)
            for m in (self.image_proj, self.image_norm, self.image_pool):
                if m is not None:
                    init_weights(m)

    @property
    def joint_dim(self) -> int:
        return 3 * self.config.embed_dim

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, N, C) image tokens: the EfficientNet feature map flattened, or the ViT tokens."""
        check_image(self.name, image, 3, self.config.image_size)
        x = self.image_encoder(image)
        return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        check_image(self.name, image, 3, self.config.image_size)
        x = self.image_encoder(image)
        if self.image_pool is not None:  # siglip: MAP head over every token
            emb = self.image_pool(x)
        elif self.image_proj is None:  # EfficientNet: global average pool
            emb = x.mean((2, 3))
        else:
            cls = x[:, 0] if self.image_norm is None else self.image_norm(x[:, 0])
            emb = self.image_proj(cls)
        return F.normalize(emb.float(), dim=-1)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text embedding from [CLS] (paper: first token), EOS (clip: the last valid token) or the last
        position (siglip, whose text is padded to a fixed length)."""
        lens = text_lengths(self.name, text, text_mask)
        hidden = self.text_encoder(text, text_mask.bool())
        if self.config.layout == "clip":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), lens.to(hidden.device).long() - 1]
        elif self.config.layout == "siglip":
            pooled = hidden[:, -1]
        else:
            pooled = hidden[:, 0]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def joint_embedding(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        u, v = self.encode_image(image), self.encode_text(text, text_mask)
        return torch.cat([u, v, u * v], dim=-1)

    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return (self.encode_image(image) * self.encode_text(text, text_mask)).sum(-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = need(batch, "image", self.name), need(batch, "text", self.name)
        text_mask = need(batch, "text_mask", self.name)
        itc = self.contrastive(self.encode_image(image), self.encode_text(text, text_mask))
        return {"loss": itc, "itc": itc}


register("align-tiny", ALIGNConfig(vocab_size=1024, image_size=64, max_text_len=32, embed_dim=64,
                                   effnet_width=0.25, effnet_depth=0.34, drop_path=0.0, vit_patch=8, vit_dim=64,
                                   vit_depth=2, vit_heads=2, text_dim=64, text_depth=2, text_heads=2), ALIGN)
register("align-base", ALIGNConfig(), ALIGN)
