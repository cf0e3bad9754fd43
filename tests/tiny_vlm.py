"""A tiny model that follows the model/CLI contract, for testing the training loop independently of the papers'
models. Importing this module registers ``test-tiny`` (dual encoder + captioner) and ``test-tiny-score`` (scores
pairs, no dual encoders) with ``vlcore.models`` (``vlcore pretrain --plugin tiny_vlm --model test-tiny``).

Objective of ``test-tiny``: local-batch InfoNCE between pooled image and text features plus a next-token loss of a
decoder conditioned on the image; dropout makes the loss depend on the RNG (so exact resumption is tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlcore import models, tokens


@dataclass
class TinyConfig:
    vocab_size: int = 300
    image_size: int = 64
    max_text_len: int = 16
    width: int = 32
    dropout: float = 0.1


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.GELU(), nn.Conv2d(16, w, 4, 4))
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU()) for _ in range(2)])
        self.drop = nn.Dropout(cfg.dropout)
        self.tok = nn.Embedding(cfg.vocab_size, w)
        self.pos = nn.Parameter(torch.zeros(cfg.max_text_len, w))
        self.img_proj, self.txt_proj = nn.Linear(w, w), nn.Linear(w, w)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.lm_head = nn.Linear(w, cfg.vocab_size)

    def _image_features(self, image):
        x = self.stem(image).flatten(2).transpose(1, 2)  # (B, grid, w)
        for blk in self.blocks:
            x = x + blk(x)
        return self.drop(x.mean(1))

    def encode_image(self, image):
        return F.normalize(self.img_proj(self._image_features(image)), dim=-1)

    def encode_text(self, text, text_mask):
        x = self.tok(text) + self.pos[: text.shape[1]]
        m = text_mask.unsqueeze(-1).float()
        return F.normalize(self.txt_proj((x * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)

    def _next_logits(self, feat, prev):
        return self.lm_head(feat[:, None] + self.tok(prev))

    def forward(self, batch):
        for key in ("image", "text", "text_mask"):
            if key not in batch:
                raise KeyError(f"test-tiny needs batch[{key!r}]")
        feat = self._image_features(batch["image"])
        img = F.normalize(self.img_proj(feat), dim=-1)
        txt = self.encode_text(batch["text"], batch["text_mask"])
        logits = self.logit_scale.exp() * img @ txt.T
        labels = torch.arange(len(img), device=img.device)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        text = batch["text"]
        lm_logits = self._next_logits(feat, text[:, :-1])
        target = text[:, 1:].masked_fill(~batch["text_mask"][:, 1:], -100)
        caption = F.cross_entropy(lm_logits.reshape(-1, lm_logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return {"loss": contrastive + caption, "contrastive_loss": contrastive, "caption_loss": caption}

    @torch.no_grad()
    def generate(self, image, prompt=None, max_new_tokens=16, strategy="greedy"):
        feat = self._image_features(image)
        prev = torch.full((len(image), 1), tokens.BOS, dtype=torch.long, device=image.device)
        out = []
        for _ in range(max_new_tokens):
            prev = self._next_logits(feat, prev[:, -1:]).argmax(-1)
            out.append(prev)
        return torch.cat(out, 1)


class TinyScoreVLM(nn.Module):
    """The same network seen through ``score`` only (the path the CLI uses for SimVLM/SOHO-style models)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.core = TinyVLM(cfg)

    def forward(self, batch):
        return self.core(batch)

    def score(self, image, text, text_mask):
        return (self.core.encode_image(image) * self.core.encode_text(text, text_mask)).sum(-1)


if "test-tiny" not in models._REGISTRY:
    models.register("test-tiny", TinyConfig(), TinyVLM)
    models.register("test-tiny-score", TinyConfig(), TinyScoreVLM)
