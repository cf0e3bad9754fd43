"""CoCa — Contrastive Captioners (Yu et al., 2022): ViT encoder, attentional poolers, decoupled text decoder.

* Image: ViT -> one :class:`vlcore.nn.MultiAttentionPool` with 256 captioning queries and 1 contrastive query
  (one attention launch). The 1-query output, projected and L2-normalised, is the image embedding.
* Text: the unimodal decoder layers (causal self-attention, no cross-attention) read BOS ... EOS followed by a
  learnable [CLS] embedding placed right after each text's EOS — the last token of the text, so causally it
  sees the whole text and no text token sees it. Its output (LayerNorm, projection, L2 norm) is the text
  embedding. The multimodal layers continue the same residual stream with causal self-attention +
  cross-attention to the 256 pooled image tokens + one MLP (no second MLP) and predict the next token.
* Loss, from one forward pass: L = lambda_Con * InfoNCE(image, text) + lambda_Cap * captioning,
  lambda_Cap = 2, lambda_Con = 1 (``vlcore.nn.ContrastiveLoss``: global batch, learnable temperature).

Sizes (paper, Table 1): Base — ViT 12 x 768 (MLP 3072, 12 heads) at 288 px / patch 18 (256 tokens), decoder
n_uni = n_multi = 12 layers of width 768, 64k vocabulary, untied output layer: 383M parameters (this file:
~386M). Large — ViT 24 x 1024, decoder 12 + 12 x 1024: 787M. CoCa — ViT 40 x 1408 (MLP 6144, 16 heads),
decoder 18 + 18 x 1408 (paper: 2.1B).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import vlcore.nn as vnn
from vlcore.nn.generation import DecodingState, decode
from vlcore.nn.objectives import IGNORE, token_cross_entropy
from vlcore.nn.transformer import LN_EPS, decoder, init_weights
from vlcore.nn.vit import ViT

from . import register
from ._common import generation_prompt, need, text_lengths


@dataclasses.dataclass
class CoCaConfig:
    vocab_size: int = 64000
    image_size: int = 288
    max_text_len: int = 76
    patch_size: int = 18
    patch_stem: str = "linear"  # "conv": convolutional stem (vlcore.nn.PatchEmbed), used by coca-tiny
    patch_stem_width: int = 32  # first conv stem width (doubling per stride-2 layer)
    vision_dim: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    text_dim: int = 768
    text_heads: int = 12
    unimodal_depth: int = 12
    multimodal_depth: int = 12
    text_mlp_ratio: float = 4.0
    caption_queries: int = 256
    embed_dim: int = 768
    caption_weight: float = 2.0  # lambda_Cap
    contrastive_weight: float = 1.0  # lambda_Con
    checkpoint: bool = False
    # "paper" (default) or "open_clip": open_clip's CoCa architecture, to run its checkpoints unchanged
    # (vlcore.integrations.open_clip): ViT with a class token, a LayerNorm before the blocks and none after;
    # LayerNorm eps 1e-5; one pooler whose first query is the contrastive one (caption_queries = its other
    # queries) and whose output LayerNorm also normalises that query; [CLS] at the end position with
    # open_clip's (legacy) padding mask; multimodal layers of self-attention + MLP + cross-attention (context
    # LayerNorm) + MLP.
    layout: str = "paper"


class CoCa(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = self.config = config
        if c.layout not in ("paper", "open_clip"):
            raise ValueError(f"CoCaConfig.layout must be 'paper' or 'open_clip'; got {c.layout!r}")
        oc = self.open_clip = c.layout == "open_clip"
        eps = 1e-5 if oc else LN_EPS
        self.vision = ViT(c.image_size, c.patch_size, c.vision_dim, c.vision_depth, c.vision_heads,
                          c.vision_mlp_ratio, checkpoint=c.checkpoint, stem=c.patch_stem,
                          stem_width=c.patch_stem_width, cls_token=oc, pre_norm=oc, final_norm=not oc, eps=eps)
        self.pool = vnn.MultiAttentionPool(c.text_dim, (c.caption_queries, 1), c.text_heads, context_dim=c.vision_dim)
        self.caption_norm = nn.LayerNorm(c.text_dim, eps=eps)
        self.image_proj = nn.Linear(c.text_dim, c.embed_dim, bias=False)
        self.token_embed = nn.Embedding(c.vocab_size, c.text_dim)
        self.pos_embed = nn.Parameter(torch.zeros(c.max_text_len + 1, c.text_dim))  # + 1: the [CLS] slot
        self.cls_embed = nn.Parameter(torch.zeros(c.text_dim))
        self.unimodal = decoder(c.text_dim, c.unimodal_depth, c.text_heads, c.text_mlp_ratio, final_norm=False,
                                checkpoint=c.checkpoint, eps=eps)
        self.multimodal = decoder(c.text_dim, c.multimodal_depth, c.text_heads, c.text_mlp_ratio, cross=True,
                                  checkpoint=c.checkpoint, eps=eps, self_mlp=oc, context_norm=oc)
        self.text_norm = nn.LayerNorm(c.text_dim, eps=eps)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim, bias=False)
        self.lm_head = nn.Linear(c.text_dim, c.vocab_size, bias=False)
        self.contrastive = vnn.ContrastiveLoss("infonce")
        init_weights(self)
        for p in (self.pos_embed, self.cls_embed, self.vision.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    # ---- pieces -----------------------------------------------------------------------------------------

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption tokens (B, 256, text_dim), normalised image embedding (B, embed_dim))."""
        caption, con = self.pool(self.vision(image))
        return self.caption_norm(caption), self._image_embedding(con)

    def _image_embedding(self, con: torch.Tensor) -> torch.Tensor:
        if self.open_clip:  # open_clip's ln_post normalises every query of its single pooler
            con = self.caption_norm(con)
        return F.normalize(self.image_proj(con[:, 0]), dim=-1)

    def text_with_cls(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded (B, T + 1, dim) sequence with [CLS] at index L_b (right after EOS), and L_b."""
        lens = text_lengths("CoCa", text, text_mask).to(text.device).long()
        if text.shape[1] > self.config.max_text_len:
            raise ValueError(f"CoCa: text length {text.shape[1]} exceeds max_text_len {self.config.max_text_len}")
        tokens = F.pad(text, (0, 1))
        x = self.token_embed(tokens)
        if self.open_clip:
            return self._open_clip_cls(x, lens)
        is_cls = torch.arange(tokens.shape[1], device=text.device) == lens[:, None]
        x = torch.where(is_cls[..., None], self.cls_embed.to(x.dtype), x)
        return x + self.pos_embed[: tokens.shape[1]], lens

    def _open_clip_cls(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's [CLS]: appended after the padding (position embedding of index T), and with its legacy
        padding mask it sees the text, the first padding token (index L_b) and itself only when the text
        fills all T positions. Placed at index L_b + 1 (last visible key), the same keys are exactly the
        causal prefix: returns the embedded sequence and the [CLS] index."""
        t = x.shape[1] - 1
        x = x + self.pos_embed[: t + 1]
        cls_at = torch.clamp(lens + 1, max=t)
        is_cls = torch.arange(t + 1, device=x.device) == cls_at[:, None]
        return torch.where(is_cls[..., None], (self.cls_embed + self.pos_embed[t]).to(x.dtype), x), cls_at

    def unimodal_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unimodal hidden states (B, T + 1, dim), normalised text embedding from [CLS] (B, embed_dim))."""
        x, lens = self.text_with_cls(text, text_mask)
        kv_lens = None
        if self.open_clip:  # [CLS] sees itself only when the text fills all T positions (see _open_clip_cls)
            n, t = text_lengths("CoCa", text, text_mask).to(text.device), text.shape[1]
            kv_lens = torch.where(n >= t, t + 1, n + 1).to(torch.int32)
        hidden = self.unimodal(x, kv_lens=kv_lens)
        cls = hidden[torch.arange(hidden.shape[0], device=hidden.device), lens]
        return hidden, F.normalize(self.text_proj(self.text_norm(cls)), dim=-1)

    # ---- the contract -----------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = need(batch, "image", "CoCa"), need(batch, "text", "CoCa")
        text_mask = need(batch, "text_mask", "CoCa").bool()
        caption_tokens, image_emb = self.image_features(image)
        hidden, text_emb = self.unimodal_text(text, text_mask)
        logits = self.lm_head(self.multimodal(hidden[:, :-1], caption_tokens))  # (B, T, V); [CLS] slots unused
        targets = torch.where(text_mask[:, 1:], text[:, 1:], torch.full_like(text[:, 1:], IGNORE))
        caption = token_cross_entropy(logits[:, :-1], targets)
        contrastive = self.contrastive(image_emb, text_emb)
        loss = self.config.contrastive_weight * contrastive + self.config.caption_weight * caption
        return {"contrastive": contrastive, "caption": caption, "loss": loss}

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        caption, con = self.pool(self.vision(image))
        return self._image_embedding(con)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.unimodal_text(text, text_mask.bool())[1]

    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: torch.Tensor | None = None, max_new_tokens: int = 20,
                 strategy: str = "greedy", *, use_cache: bool = True, **options) -> torch.Tensor:
        """Caption ``image`` after BOS + ``prompt`` (B, P). Returns the new tokens (B, T') ending at EOS (PAD after)
        or at the limit (positions stop at max_text_len). ``options``: beam_size, top_p, temperature,
        length_penalty, generator."""
        start = generation_prompt("CoCa", prompt, image.shape[0], image.device)
        max_new_tokens = min(max_new_tokens, self.config.max_text_len + 1 - start.shape[1])
        caption_tokens, _ = self.image_features(image)

        def run(tokens, offset, ctx, cache):
            x = self.token_embed(tokens) + self.pos_embed[offset: offset + tokens.shape[1]]
            hidden = self.unimodal(x, cache=None if cache is None else cache["unimodal"])
            out = self.multimodal(hidden, ctx["caption"], cache=None if cache is None else cache["multimodal"])
            return self.lm_head(out)

        cache = None
        if use_cache:
            size = start.shape[1] + max_new_tokens
            cache = {"unimodal": self.unimodal.new_cache(size), "multimodal": self.multimodal.new_cache(size)}
        state = DecodingState(run, {"caption": caption_tokens}, cache)
        return decode(state, start, max_new_tokens, strategy, **options)


def build(config: CoCaConfig) -> CoCa:
    return CoCa(config)


# coca-tiny trains from scratch on a CPU in minutes (vlcore pretrain's default): a conv stem learns digit shapes
# far faster than the 8x8 linear patch projection (measured: ~90 % vs 30 % zero-shot after the default run;
# a narrower 16-32-64 stem reached only 9 %).
register("coca-tiny", CoCaConfig(vocab_size=1000, image_size=64, max_text_len=32, patch_size=8, patch_stem="conv",
                                 vision_dim=64, vision_depth=2, vision_heads=2, text_dim=64, text_heads=2,
                                 unimodal_depth=1, multimodal_depth=1, caption_queries=16, embed_dim=64), build)
register("coca-base", CoCaConfig(), build)
register("coca-large", CoCaConfig(vision_dim=1024, vision_depth=24, vision_heads=16, text_dim=1024, text_heads=16,
                                  embed_dim=1024), build)
register("coca", CoCaConfig(vision_dim=1408, vision_depth=40, vision_heads=16, vision_mlp_ratio=6144 / 1408,
                            text_dim=1408, text_heads=16, unimodal_depth=18, multimodal_depth=18, embed_dim=1408),
         build)
