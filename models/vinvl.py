"""VinVL / OSCAR+ (Zhang et al., CVPR 2021; Li et al., ECCV 2020): a single-stream BERT over the triple
(caption words w, object tags q, region features v) with precomputed detector outputs — no detector inside.

* Input: [BOS] caption [EOS] | tags | regions. Caption and tags share the word embeddings (tags are words: the
  detector's class names) with continuous positions (tags start at ``max_text_len``) and segment 0 / 1.
  A region is its feature ⊕ its box geometry (x1, y1, x2, y2, w, h) -> Linear -> LayerNorm, segment 1.
  Padding in any part is handled by ``SingleStreamEncoder`` (packed, ``kv_lens``).
* OSCAR+ pretraining loss = MLM + 3-way contrastive, from one pass:
  - MLM: 15 % of caption AND tag tokens (80/10/10), tied decoder.
  - Contrastive: the [CLS] pooler classifies the triple as matched (0), caption polluted (1: caption of another
    sample, prob. 0.25) or tags polluted (2: tags of another sample, prob. 0.25).
  - Tag dropout (``tag_drop_prob``, 0 = OSCAR+; the tiny config uses 0.5): a sample's tags are hidden, so the
    caption must be matched against the regions (tags taken from ground-truth phrases name the objects and
    would otherwise let the text alone solve the task); such a sample is never "tags polluted".
  - Optional MRC (``mrc_weight`` > 0, off by default: OSCAR+ has none): regions masked with 15 % probability
    (feature zeroed), their detector label (``box_labels``) predicted (``vlcore.nn.region``).
* ``region_source="batch"`` (paper): features from the batch key ``region_features`` (B, R, feature_dim).
  ``"pixels"`` (the tiny config, for datasets without a detector): each box's pixels bilinearly sampled on a
  ``pixel_grid`` x ``pixel_grid`` grid — a fixed, parameter-free stand-in for detector features.

Batch keys: ``text``, ``text_mask``, ``boxes`` (B, R, 4), ``box_valid`` (B, R); ``region_features`` (batch
source) or ``image`` (pixel source); tags from ``tags`` / ``tags_mask`` (B, Tg) or, if absent, the content
tokens of the valid ``box_text`` phrases (``box_text``, ``box_text_mask``); ``box_labels`` when MRC is on.
``score(image, text, text_mask, **region_keys)`` (log-probability of "matched") and
``joint_embedding(..., **region_keys)`` take the same region keys (``image`` may be None with batch features).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlcore import tokens as T
from vlcore.nn.fusion import SingleStreamEncoder, pack_valid
from vlcore.nn.heads import MLMHead
from vlcore.nn.objectives import IGNORE, mask_tokens, sample_negatives, token_cross_entropy
from vlcore.nn.region import MaskedRegionClassification, box_geometry, roi_align
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import LN_EPS, init_weights

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class VinVLConfig:
    vocab_size: int = 30522
    image_size: int = 600
    max_text_len: int = 35
    max_tag_len: int = 30
    region_source: str = "batch"  # or "pixels"
    feature_dim: int = 2048
    pixel_grid: int = 8
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    mlm_prob: float = 0.15
    pollute_prob: float = 0.5  # half of it pollutes the caption, half the tags
    tag_drop_prob: float = 0.0
    mlm_weight: float = 1.0
    contrastive_weight: float = 1.0
    mrc_weight: float = 0.0
    num_classes: int = 1600  # detector classes (Visual Genome), for MRC
    checkpoint: bool = False


def tags_from_phrases(box_text: torch.Tensor, box_text_mask: torch.Tensor, box_valid: torch.Tensor,
                      max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tags (B, Tg) + mask from the content tokens of each valid box's phrase, in box order (at most max_len)."""
    b = box_text.shape[0]
    flat = box_text.reshape(b, -1)
    keep = (box_text_mask.bool() & box_valid.bool()[..., None]).reshape(b, -1) & (flat >= T.NUM_SPECIAL)
    packed, lens, _ = pack_valid(flat[..., None], keep)
    n = max(1, min(max_len, int(lens.max()) if lens.numel() else 1))
    mask = torch.arange(n, device=flat.device) < lens.clamp(max=n)[:, None]
    return torch.where(mask, packed[:, :n, 0], torch.zeros_like(packed[:, :n, 0])), mask


class VinVL(nn.Module):
    name = "vinvl"

    def __init__(self, config: VinVLConfig):
        super().__init__()
        c = self.config = config
        if c.region_source not in ("batch", "pixels"):
            raise ValueError(f"{self.name}: region_source must be 'batch' or 'pixels'; got {c.region_source!r}")
        feat = c.feature_dim if c.region_source == "batch" else 3 * c.pixel_grid ** 2
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len + c.max_tag_len)
        self.region_embed = nn.Sequential(nn.Linear(feat + 6, c.dim), nn.LayerNorm(c.dim, eps=LN_EPS))
        self.region_segment = nn.Parameter(torch.zeros(c.dim))
        self.encoder = SingleStreamEncoder(c.dim, c.depth, c.heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.mlm_head = MLMHead(c.dim, self.text_embed.tokens)
        self.triple_head = nn.Linear(c.dim, 3)
        self.mrc = MaskedRegionClassification(c.dim, c.num_classes) if c.mrc_weight > 0 else None
        init_weights(self)

    @property
    def joint_dim(self) -> int:
        return self.config.dim

    # ------------------------------------------------------------------ inputs
    def region_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(region features (B, R, F), boxes (B, R, 4), valid (B, R)) from the batch."""
        boxes, valid = need(batch, "boxes", self.name), need(batch, "box_valid", self.name).bool()
        if self.config.region_source == "batch":
            feats = need(batch, "region_features", self.name)
            if feats.shape[:2] != boxes.shape[:2] or feats.shape[-1] != self.config.feature_dim:
                raise ValueError(f"{self.name}: `region_features` must be (B, R, {self.config.feature_dim}) with "
                                 f"(B, R) of `boxes` {tuple(boxes.shape[:2])}; got {tuple(feats.shape)}")
        else:
            image = need(batch, "image", self.name)
            g = self.config.pixel_grid
            feats = roi_align(image, boxes, g).flatten(2)
        return feats, boxes, valid

    def tag_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "tags" in batch:
            tags, mask = batch["tags"], need(batch, "tags_mask", self.name).bool()
        else:
            tags, mask = tags_from_phrases(need(batch, "box_text", self.name), need(batch, "box_text_mask", self.name),
                                           need(batch, "box_valid", self.name), self.config.max_tag_len)
        if tags.shape[1] > self.config.max_tag_len:
            raise ValueError(f"{self.name}: `tags` hold {tags.shape[1]} tokens > max_tag_len {self.config.max_tag_len}")
        return tags, mask

    def fuse(self, text, text_mask, tags, tags_mask, feats, boxes, region_valid):
        """(text outputs, tag outputs, region outputs, pooled)."""
        text_lengths(self.name, text, text_mask)
        c = self.config
        t = self.text_embed(text, 0)
        tag_pos = c.max_text_len + torch.arange(tags.shape[1], device=tags.device)
        q = self.text_embed(tags, 1, tag_pos)
        v = self.region_embed(torch.cat([feats, box_geometry(boxes).to(feats.dtype)], -1)) + self.region_segment
        (t_out, q_out, v_out), pooled = self.encoder([(t, text_mask), (q, tags_mask), (v, region_valid)])
        return t_out, q_out, v_out, pooled

    def _fuse_batch(self, batch: dict):
        tags, tags_mask = self.tag_inputs(batch)
        return self.fuse(need(batch, "text", self.name), need(batch, "text_mask", self.name).bool(), tags, tags_mask,
                         *self.region_inputs(batch))

    def joint_embedding(self, image, text, text_mask, **regions) -> torch.Tensor:
        return self._fuse_batch({**regions, "image": image, "text": text, "text_mask": text_mask})[3]

    def score(self, image, text, text_mask, **regions) -> torch.Tensor:
        """log p(matched) of each (regions_i, text_i) triple, (B,)."""
        pooled = self.joint_embedding(image, text, text_mask, **regions)
        return torch.log_softmax(self.triple_head(pooled).float(), -1)[:, 0]

    # ------------------------------------------------------------------ objectives
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        text, text_mask = need(batch, "text", self.name), need(batch, "text_mask", self.name).bool()
        tags, tags_mask = self.tag_inputs(batch)
        feats, boxes, valid = self.region_inputs(batch)
        b = text.shape[0]
        # 3-way pollution: replace the caption (label 1) or the tags (label 2) by another sample's
        u = torch.rand(b, device=text.device)
        label = torch.where(u < c.pollute_prob / 2, 1, torch.where(u < c.pollute_prob, 2, 0))
        drop = torch.rand(b, device=text.device) < c.tag_drop_prob
        label = torch.where(drop & (label == 2), 1, label)  # no tags to pollute: pollute the caption
        other = sample_negatives(b, text.device)
        pc, pt = (label == 1)[:, None], (label == 2)[:, None]
        text, text_mask = torch.where(pc, text[other], text), torch.where(pc, text_mask[other], text_mask)
        tags, tags_mask = torch.where(pt, tags[other], tags), torch.where(pt, tags_mask[other], tags_mask)
        tags_mask = tags_mask & ~drop[:, None]
        # MLM on caption and tag tokens
        m_text, l_text = mask_tokens(text, text_mask, c.vocab_size, c.mlm_prob)
        m_tags, l_tags = mask_tokens(tags, tags_mask, c.vocab_size, c.mlm_prob)
        region_mask = None
        if self.mrc is not None:
            region_mask = valid & (torch.rand(valid.shape, device=valid.device) < c.mlm_prob)
            feats = feats.masked_fill(region_mask[..., None], 0.0)
        t_out, q_out, v_out, pooled = self.fuse(m_text, text_mask, m_tags, tags_mask, feats, boxes, valid)
        h = torch.cat([t_out, q_out], 1)
        labels = torch.cat([l_text, l_tags], 1)
        sel = labels != IGNORE
        mlm = token_cross_entropy(self.mlm_head(h[sel]), labels[sel])
        con = F.cross_entropy(self.triple_head(pooled).float(), label)
        loss = c.mlm_weight * mlm + c.contrastive_weight * con
        out = {"mlm": mlm, "contrastive": con}
        if self.mrc is not None:
            mrc = self.mrc.loss(v_out, need(batch, "box_labels", self.name), region_mask)
            out["mrc"] = mrc
            loss = loss + c.mrc_weight * mrc
        out["loss"] = loss
        return out


register("vinvl-tiny", VinVLConfig(vocab_size=1024, image_size=64, max_text_len=32, max_tag_len=16,
                                   region_source="pixels", pixel_grid=8, tag_drop_prob=0.5, dim=64, depth=2, heads=2, mrc_weight=1.0,
                                   num_classes=10), VinVL)
register("vinvl-base", VinVLConfig(), VinVL)
