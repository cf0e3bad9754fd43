"""SOHO — Seeing Out of tHe bOx (Huang et al., CVPR 2021): end-to-end VLP with a visual dictionary.

* Image: ResNet backbone -> 1x1 convolution to the Transformer width -> every grid feature is replaced by its
  nearest entry of ``vlcore.nn.VisualDictionary`` (straight-through, so the CNN still gets gradients; the
  dictionary itself follows SOHO's momentum update inside the module) -> + 2-D-grid position embedding
  (learned, one per cell) + segment embedding 1 -> LayerNorm.
* Text: BERT embeddings (token + segment 0 + position). Single-stream BERT over [visual tokens, text]; padding
  by ``kv_lens`` (visual tokens first, so each sequence's valid tokens are a prefix). The text's BOS is [CLS].
* Losses (summed) from ONE encoder call over 3B sequences: the B matched pairs with masked text and masked
  visual tokens give MLM (15 %, 80/10/10) and MVM (per image one dictionary index is drawn among those present
  and ALL grid features mapped to it are replaced by a learned [MASK] embedding; the head predicts their
  index); the B clean pairs and B pairs with a randomly drawn other caption give ITM.

Sizes: ``soho-base`` = ResNet-101 + 12-layer BERT-base width 768, 2048-entry dictionary (the paper's best
ablation); images default to 384 px here (the paper trains on larger, variable-size images).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import vlcore.nn as vnn
from vlcore.nn.heads import MLMHead, MLPHead
from vlcore.nn.objectives import IGNORE, mask_tokens, sample_negatives, token_cross_entropy
from vlcore.nn.resnet import ResNet
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import LN_EPS, encoder, init_weights

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class SOHOConfig:
    vocab_size: int = 30522
    image_size: int = 384
    max_text_len: int = 40
    resnet_layers: tuple[int, ...] = (3, 4, 23, 3)  # ResNet-101
    resnet_width: int = 64
    resnet_norm: str = "batch"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_codes: int = 2048
    dictionary_momentum: float = 0.99
    mlm_prob: float = 0.15
    checkpoint: bool = False


class SOHO(nn.Module):
    def __init__(self, config: SOHOConfig):
        super().__init__()
        c = self.config = config
        self.backbone = ResNet(tuple(c.resnet_layers), c.image_size, base_width=c.resnet_width, norm=c.resnet_norm,
                               checkpoint=c.checkpoint)
        self.num_visual = self.backbone.grid[0] * self.backbone.grid[1]
        self.proj = nn.Conv2d(self.backbone.out_channels, c.dim, 1)
        self.dictionary = vnn.VisualDictionary(c.num_codes, c.dim, momentum=c.dictionary_momentum)
        self.visual_pos = nn.Parameter(torch.zeros(self.num_visual, c.dim))
        self.visual_norm = nn.LayerNorm(c.dim, eps=LN_EPS)
        self.mask_embed = nn.Parameter(torch.zeros(c.dim))
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len, segments=2)
        self.encoder = encoder(c.dim, c.depth, c.heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.mlm_head = MLMHead(c.dim, self.text_embed.tokens)
        self.mvm_head = MLPHead(c.dim, c.num_codes, norm=True)
        self.itm_head = MLPHead(c.dim, 2)
        init_weights(self.text_embed)
        init_weights(self.encoder)
        for p in (self.visual_pos, self.mask_embed):
            nn.init.trunc_normal_(p, std=0.02)

    # ---- pieces -----------------------------------------------------------------------------------------

    def visual_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dictionary-mapped grid features (B, N, dim), dictionary indices (B, N))."""
        feats = self.proj(self.backbone(image)).flatten(2).transpose(1, 2)
        return self.dictionary(feats)

    def visual_tokens(self, feats: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        if masked is not None:
            feats = torch.where(masked[..., None], self.mask_embed.to(feats.dtype), feats)
        return self.visual_norm(feats + self.visual_pos + self.text_embed.segments.weight[1])

    def mvm_inputs(self, feats: torch.Tensor, indices: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MVM: (visual tokens with every feature of the drawn index masked, mask (B, N), targets (B, N) with
        IGNORE outside the mask)."""
        masked, _ = vnn.mvm_mask(indices, generator=generator)
        targets = torch.where(masked, indices, torch.full_like(indices, IGNORE))
        return self.visual_tokens(feats, masked), masked, targets

    def encode_pairs(self, visual: torch.Tensor, text: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Single-stream encoder over [visual tokens, text]: (B, N + T, dim)."""
        x = torch.cat([visual, self.text_embed(text, segments=0)], dim=1)
        return self.encoder(x, kv_lens=(lens + visual.shape[1]).to(torch.int32))

    # ---- the contract -----------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = need(batch, "image", "SOHO"), need(batch, "text", "SOHO")
        text_mask = need(batch, "text_mask", "SOHO").bool()
        lens = text_lengths("SOHO", text, text_mask, min_len=1).to(text.device)
        b, n = text.shape[0], self.num_visual
        feats, indices = self.visual_features(image)
        masked_text, mlm_labels = mask_tokens(text, text_mask, self.config.vocab_size, self.config.mlm_prob)
        masked_visual, _, mvm_targets = self.mvm_inputs(feats, indices)
        clean = self.visual_tokens(feats)
        neg = sample_negatives(b, device=text.device)
        hidden = self.encode_pairs(torch.cat([masked_visual, clean, clean]), torch.cat([masked_text, text, text[neg]]),
                                   torch.cat([lens, lens, lens[neg]]))
        mlm = token_cross_entropy(self.mlm_head(hidden[:b, n:]), mlm_labels)
        mvm = token_cross_entropy(self.mvm_head(hidden[:b, :n]), mvm_targets)
        itm_logits = self.itm_head(hidden[b:, n])  # text [CLS] (BOS)
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long, device=text.device),
                                torch.zeros(b, dtype=torch.long, device=text.device)])
        itm = F.cross_entropy(itm_logits.float(), itm_labels)
        return {"mlm": mlm, "mvm": mvm, "itm": itm, "loss": mlm + mvm + itm}

    @torch.no_grad()
    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM log-odds (match minus no-match logit) of each (image_i, text_i): (B,). Never updates the dictionary."""
        lens = text_lengths("SOHO", text, text_mask, min_len=1).to(text.device)
        was_training = self.dictionary.training
        self.dictionary.eval()
        try:
            feats, _ = self.visual_features(image)
        finally:
            self.dictionary.train(was_training)
        logits = self.itm_head(self.encode_pairs(self.visual_tokens(feats), text, lens)[:, self.num_visual]).float()
        return logits[:, 1] - logits[:, 0]


def build(config: SOHOConfig) -> SOHO:
    return SOHO(config)


register("soho-tiny", SOHOConfig(vocab_size=1000, image_size=64, max_text_len=32, resnet_layers=(1, 1, 1),
                                 resnet_width=16, resnet_norm="group", dim=64, depth=2, heads=2, num_codes=64), build)
register("soho-base", SOHOConfig(), build)
