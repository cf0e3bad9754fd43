"""E2E-VLP (Xu et al., ACL 2021): end-to-end VLP with a CNN backbone, a Transformer encoder and a Transformer
decoder that learns visual tasks (DETR-style object detection, image captioning).

* Image: ResNet (``resnet_layers``) -> 1x1 projection -> grid tokens + learned position embedding + image-type
  embedding. Text: BERT embeddings. Encoder: one single-stream Transformer (``SingleStreamEncoder``).
* Encoder tasks on [text | image]: MLM (15 %, 80/10/10) and ITM (half of the images swapped, pooler [CLS]).
* Decoder tasks, the encoder reading the image alone (visual-enhanced pretraining):
  - detection: ``num_queries`` learned object queries decode bidirectionally (``prefix_lens`` = all queries)
    with cross-attention to the image memory -> class (C + "no object") and sigmoid box; DETR's set loss
    (Hungarian matching, cost = −p(class) + 5·L1 + 2·(−GIoU); loss CE (no-object weight 0.1) + 5·L1 + 2·GIoU;
    ``vlcore.nn.matching``);
  - captioning: the SAME decoder run causally on the caption (teacher forcing), tied output embedding;
    ``generate`` decodes with the KV cache (``vlcore.nn.generation``).
* loss = mlm + itm + detection + caption (weights in the config). Sizes: ``e2evlp-base`` = ResNet-50 + 6-layer
  encoder + 6-layer decoder at width 768, 100 queries, 1600 Visual Genome classes (depths and image size are
  this implementation's choice).

Batch keys: ``image``, ``text``, ``text_mask``; for detection (``det_weight`` > 0) ``boxes``, ``box_labels``,
``box_valid``. Provides ``score`` (ITM), ``joint_embedding`` (pooler), ``image_tokens`` (image-only encoder
output) and ``generate``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.nn.fusion import SingleStreamEncoder
from vlcore.nn.generation import DecodingState, decode
from vlcore.nn.heads import BoxHead, MLMHead
from vlcore.nn.matching import detr_loss
from vlcore.nn.objectives import IGNORE, mask_tokens, sample_negatives, token_cross_entropy
from vlcore.nn.resnet import ResNet
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import decoder, init_weights

from . import register
from ._common import generation_prompt, need, text_lengths


@dataclasses.dataclass
class E2EVLPConfig:
    vocab_size: int = 30522
    image_size: int = 512
    max_text_len: int = 40
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64
    resnet_norm: str = "batch"
    dim: int = 768
    encoder_depth: int = 6
    decoder_depth: int = 6
    heads: int = 12
    mlp_ratio: float = 4.0
    num_queries: int = 100
    num_classes: int = 1600
    mlm_prob: float = 0.15
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    det_weight: float = 1.0
    caption_weight: float = 1.0
    checkpoint: bool = False


class E2EVLP(nn.Module):
    name = "e2evlp"

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        c = self.config = config
        self.backbone = ResNet(tuple(c.resnet_layers), c.image_size, base_width=c.resnet_width, norm=c.resnet_norm,
                               checkpoint=c.checkpoint)
        n_img = self.backbone.grid[0] * self.backbone.grid[1]
        self.image_proj = nn.Conv2d(self.backbone.out_channels, c.dim, 1)
        self.image_pos = nn.Parameter(torch.zeros(1, n_img, c.dim))
        self.type_embed = nn.Embedding(2, c.dim)
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len, segments=0)
        self.encoder = SingleStreamEncoder(c.dim, c.encoder_depth, c.heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.decoder = decoder(c.dim, c.decoder_depth, c.heads, c.mlp_ratio, cross=True, checkpoint=c.checkpoint)
        self.queries = nn.Parameter(torch.zeros(1, c.num_queries, c.dim))
        self.caption_pos = nn.Embedding(c.max_text_len, c.dim)
        self.mlm_head = MLMHead(c.dim, self.text_embed.tokens)
        self.caption_head = MLMHead(c.dim, self.text_embed.tokens)
        self.itm_head = nn.Linear(c.dim, 2)
        self.class_head = nn.Linear(c.dim, c.num_classes + 1)
        self.box_head = BoxHead(c.dim)
        init_weights(self, std=0.02)
        for p in (self.image_pos, self.queries):
            nn.init.trunc_normal_(p, std=0.02)

    @property
    def joint_dim(self) -> int:
        return self.config.dim

    # ------------------------------------------------------------------ representations
    def visual_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone grid -> (B, N, D) tokens with position and image-type embeddings (before the encoder)."""
        x = self.image_proj(self.backbone(image)).flatten(2).transpose(1, 2)
        return x + self.image_pos + self.type_embed.weight[1]

    def _fuse(self, vis: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        t = self.text_embed(text) + self.type_embed.weight[0]
        (t_out, v_out), pooled = self.encoder([(t, text_mask), (vis, None)])
        return t_out, v_out, pooled

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder's output on the image alone (the decoder's memory), (B, N, D)."""
        return self.encoder([(self.visual_tokens(image), None)])[0][0]

    def joint_embedding(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        text_lengths(self.name, text, text_mask)
        return self._fuse(self.visual_tokens(image), text, text_mask.bool())[2]

    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        logits = self.itm_head(self.joint_embedding(image, text, text_mask)).float()
        return logits[:, 1] - logits[:, 0]

    def detect(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, Q, C + 1), boxes (B, Q, 4) cxcywh) from the image memory."""
        b, q = memory.shape[0], self.config.num_queries
        full = torch.full((b,), q, dtype=torch.int32, device=memory.device)  # prefix = everything: bidirectional
        h = self.decoder(self.queries.expand(b, -1, -1), memory, prefix_lens=full)
        return self.class_head(h), self.box_head(h)

    def caption_logits(self, tokens: torch.Tensor, positions: torch.Tensor, memory: torch.Tensor,
                       kv_lens: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        x = self.text_embed.tokens(tokens) + self.caption_pos(positions)
        return self.caption_head(self.decoder(x, memory, kv_lens=kv_lens, cache=cache))

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        image, text = need(batch, "image", self.name), need(batch, "text", self.name)
        text_mask = need(batch, "text_mask", self.name).bool()
        lens = text_lengths(self.name, text, text_mask)
        vis = self.visual_tokens(image)
        out, loss = {}, 0.0
        if c.mlm_weight > 0:
            masked, labels = mask_tokens(text, text_mask, c.vocab_size, c.mlm_prob)
            t_out = self._fuse(vis, masked, text_mask)[0]
            sel = labels != IGNORE
            out["mlm"] = token_cross_entropy(self.mlm_head(t_out[sel]), labels[sel])
            loss = loss + c.mlm_weight * out["mlm"]
        if c.itm_weight > 0:
            b = image.shape[0]
            swap = torch.rand(b, device=image.device) < 0.5
            pair_vis = torch.where(swap[:, None, None], vis[sample_negatives(b, image.device)], vis)
            out["itm"] = F.cross_entropy(self.itm_head(self._fuse(pair_vis, text, text_mask)[2]).float(),
                                         (~swap).long())
            loss = loss + c.itm_weight * out["itm"]
        memory = self.encoder([(vis, None)])[0][0]  # visual tasks: the encoder reads the image alone
        if c.det_weight > 0:
            logits, boxes = self.detect(memory)
            det = detr_loss(logits, boxes, need(batch, "box_labels", self.name), need(batch, "boxes", self.name),
                            need(batch, "box_valid", self.name))
            out.update(det)
            out["detection"] = det["det_class"] + 5.0 * det["det_l1"] + 2.0 * det["det_giou"]
            loss = loss + c.det_weight * out["detection"]
        if c.caption_weight > 0:
            inp = text[:, :-1]
            target = text[:, 1:].masked_fill(~text_mask[:, 1:], IGNORE)
            pos = torch.arange(inp.shape[1], device=text.device)
            logits = self.caption_logits(inp, pos, memory, kv_lens=(lens - 1).clamp(min=1))
            out["caption"] = token_cross_entropy(logits, target)
            loss = loss + c.caption_weight * out["caption"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: torch.Tensor | None = None, max_new_tokens: int = 20,
                 strategy: str = "greedy", *, use_cache: bool = True, **options) -> torch.Tensor:
        """Caption ``image`` after BOS (+ ``prompt``): new tokens (B, T') ending at EOS or the limit.
        ``options``: beam_size, top_p, temperature, length_penalty, generator."""
        start = generation_prompt(self.name, prompt, image.shape[0], image.device)
        max_new_tokens = min(max_new_tokens, self.config.max_text_len - start.shape[1])
        memory = self.image_tokens(image)

        def run(tokens, offset, ctx, cache):
            pos = offset + torch.arange(tokens.shape[1], device=tokens.device)
            return self.caption_logits(tokens, pos, ctx["memory"], cache=cache)

        cache = self.decoder.new_cache(start.shape[1] + max_new_tokens) if use_cache else None
        return decode(DecodingState(run, {"memory": memory}, cache), start, max_new_tokens, strategy, **options)


register("e2evlp-tiny", E2EVLPConfig(vocab_size=1024, image_size=64, max_text_len=32, resnet_layers=(1, 1, 1),
                                     resnet_width=16, resnet_norm="group", dim=64, encoder_depth=2, decoder_depth=2,
                                     heads=2, num_queries=6, num_classes=10), E2EVLP)
register("e2evlp-base", E2EVLPConfig(), E2EVLP)
