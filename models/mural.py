"""MURAL (Jain et al., EMNLP Findings 2021): ALIGN's dual encoder with ONE multilingual text encoder trained on
two contrastive tasks in the same step — image–text matching and text–text (translation pair) matching.

loss = image_text_weight · InfoNCE(image, caption) + text_text_weight · InfoNCE(source, translation),
each through ``vlcore.contrastive_loss`` with its own learnable temperature; both text sides and the captions
go through the same (shared) text encoder. Sizes: ``mural-base`` = EfficientNet-B7 + BERT-base with a
multilingual vocabulary (250k entries here — this implementation's choice). The default task weights (1, 1)
are also this implementation's choice, configurable.

Batch keys: ``image``, ``text``, ``text_mask`` (captions, any language) and, when ``text_text_weight`` > 0, the
translation pairs ``src_text``, ``src_text_mask``, ``tgt_text``, ``tgt_text_mask`` (B2, T2) (B2 may differ
from B). Provides everything ALIGN provides (``encode_image`` / ``encode_text`` / ``joint_embedding`` ...).
"""

from __future__ import annotations

import dataclasses

import torch

from vlcore.nn.contrastive import ContrastiveLoss

from . import register
from ._common import need
from .align import ALIGN, ALIGNConfig


@dataclasses.dataclass
class MURALConfig(ALIGNConfig):
    vocab_size: int = 250_000
    image_text_weight: float = 1.0
    text_text_weight: float = 1.0


class MURAL(ALIGN):
    name = "mural"

    def __init__(self, config: MURALConfig):
        super().__init__(config)
        self.text_contrastive = ContrastiveLoss("infonce")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        image, text = need(batch, "image", self.name), need(batch, "text", self.name)
        text_mask = need(batch, "text_mask", self.name)
        i2t = self.contrastive(self.encode_image(image), self.encode_text(text, text_mask))
        out = {"itc": i2t}
        loss = c.image_text_weight * i2t
        if c.text_text_weight > 0:
            src = self.encode_text(need(batch, "src_text", self.name), need(batch, "src_text_mask", self.name))
            tgt = self.encode_text(need(batch, "tgt_text", self.name), need(batch, "tgt_text_mask", self.name))
            t2t = self.text_contrastive(src, tgt)
            out["ttc"] = t2t
            loss = loss + c.text_text_weight * t2t
        out["loss"] = loss
        return out


register("mural-tiny", MURALConfig(vocab_size=1024, image_size=64, max_text_len=32, embed_dim=64,
                                   effnet_width=0.25, effnet_depth=0.34, drop_path=0.0, vit_patch=8, vit_dim=64,
                                   vit_depth=2, vit_heads=2, text_dim=64, text_depth=2, text_heads=2), MURAL)
register("mural-base", MURALConfig(), MURAL)
