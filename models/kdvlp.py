"""KD-VLP (Liu et al., NAACL Findings 2022): end-to-end grid-feature VLP that distils object knowledge from an
external detector used ONLY at training time (its boxes, labels and features are batch inputs).

* Image: ResNet -> 1x1 projection -> grid tokens (+ position, image-type embeddings); text: BERT embeddings;
  one single-stream Transformer over [text | grid] (``SingleStreamEncoder``). Inference needs no detector.
* Losses (summed with config weights):
  - MLM (15 %, 80/10/10) and ITM (half of the images swapped) as in grid-based VLP.
  - OMVM, object-guided masked vision modelling: per image one detected object is drawn; every grid token whose
    cell centre lies in its box is replaced by a learned [MASK] feature; the mean fused output over those cells
    (i) regresses the object's feature (MSE) — the detector's RoI feature (``region_features``,
    ``object_feature_source="batch"``, paper) or, without one, the stop-gradient mean backbone feature inside the
    box (``"backbone"``, a self-distillation stand-in) — and (ii) classifies its category: MRC on the detector
    label (``box_labels``) or MRC-KL on the detector's class distribution (``box_label_probs``), see
    ``vlcore.nn.region``.
  - PRA, phrase–region alignment: for each phrase p of the caption (the ``box_text`` of a box, located in the
    caption) and the valid regions r of its image, the model's distribution softmax_r(cos(h_p, h_r) / τ) over
    regions (h = mean fused outputs over the phrase tokens / the region's cells) is pulled by
    KL(q ‖ p_model) towards the linguistic target q = softmax_r(cos(e_p, e_label(r)) / τ), where e are mean
    word embeddings (no gradient) of the phrase and of region r's label name (``label_text`` row
    ``box_labels[r]``; without ``label_text``, the region's own ``box_text`` stands for its label).
* Phrase location: ``phrase_spans`` (B, R, 2) [start, end) token indices in ``text`` when given; otherwise the
  phrase's content tokens are searched in the caption (exact sub-sequence, else without its first token — BPE
  often codes a word differently after a space); phrases not found are left out of PRA. The search runs on
  the host: pass ``phrase_spans`` to keep a GPU step free of that synchronisation.

Batch keys: ``image``, ``text``, ``text_mask``, ``boxes``, ``box_valid``, ``box_labels`` (or ``box_label_probs``
(B, R, C) with ``omvm_class_target="distribution"``), ``box_text``, ``box_text_mask``; optional ``region_features``
(B, R, feature_dim), ``label_text`` / ``label_text_mask`` (C, Tl), ``phrase_spans``. Provides ``score`` (ITM),
``joint_embedding`` (pooler) and ``image_tokens``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlcore import tokens as T
from vlcore.nn.fusion import SingleStreamEncoder
from vlcore.nn.heads import MLMHead
from vlcore.nn.objectives import IGNORE, mask_tokens, sample_negatives, token_cross_entropy
from vlcore.nn.region import (
    MaskedRegionClassification,
    MaskedRegionKL,
    MaskedRegionRegression,
    cells_in_boxes,
    masked_mean,
)
from vlcore.nn.resnet import ResNet
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import init_weights

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class KDVLPConfig:
    vocab_size: int = 30522
    image_size: int = 448
    max_text_len: int = 40
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64
    resnet_norm: str = "batch"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1600
    object_feature_source: str = "batch"  # or "backbone"
    feature_dim: int = 2048
    omvm_class_target: str = "label"  # or "distribution"
    pra_temperature: float = 0.1
    mlm_prob: float = 0.15
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    omvm_weight: float = 1.0
    pra_weight: float = 1.0
    checkpoint: bool = False


def find_phrase_spans(text: torch.Tensor, text_mask: torch.Tensor, box_text: torch.Tensor,
                      box_text_mask: torch.Tensor) -> torch.Tensor:
    """(B, R, 2) [start, end) of each phrase's content tokens in ``text`` (−1 where not found); see module doc."""
    b, r = box_text.shape[:2]
    spans = torch.full((b, r, 2), -1, dtype=torch.long)
    text_c, mask_c = text.cpu(), text_mask.cpu().bool()
    bt, bm = box_text.cpu(), box_text_mask.cpu().bool()
    for i in range(b):
        seq = text_c[i][mask_c[i]].tolist()
        for j in range(r):
            phrase = [t for t, m in zip(bt[i, j].tolist(), bm[i, j].tolist()) if m and t >= T.NUM_SPECIAL]
            for cand in (phrase, phrase[1:]):
                n = len(cand)
                hit = next((s for s in range(len(seq) - n + 1) if n and seq[s:s + n] == cand), None)
                if hit is not None:
                    spans[i, j, 0], spans[i, j, 1] = hit, hit + n
                    break
    return spans.to(text.device)


class KDVLP(nn.Module):
    name = "kdvlp"

    def __init__(self, config: KDVLPConfig):
        super().__init__()
        c = self.config = config
        if c.object_feature_source not in ("batch", "backbone"):
            raise ValueError(f"{self.name}: object_feature_source must be 'batch' or 'backbone'; "
                             f"got {c.object_feature_source!r}")
        if c.omvm_class_target not in ("label", "distribution"):
            raise ValueError(f"{self.name}: omvm_class_target must be 'label' or 'distribution'; "
                             f"got {c.omvm_class_target!r}")
        self.backbone = ResNet(tuple(c.resnet_layers), c.image_size, base_width=c.resnet_width, norm=c.resnet_norm,
                               checkpoint=c.checkpoint)
        self.grid = self.backbone.grid
        self.image_proj = nn.Conv2d(self.backbone.out_channels, c.dim, 1)
        self.image_pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], c.dim))
        self.type_embed = nn.Embedding(2, c.dim)
        self.mask_feature = nn.Parameter(torch.zeros(c.dim))
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len, segments=0)
        self.encoder = SingleStreamEncoder(c.dim, c.depth, c.heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.mlm_head = MLMHead(c.dim, self.text_embed.tokens)
        self.itm_head = nn.Linear(c.dim, 2)
        target_dim = c.feature_dim if c.object_feature_source == "batch" else self.backbone.out_channels
        self.omvm_regress = MaskedRegionRegression(c.dim, target_dim)
        self.omvm_classify = (MaskedRegionClassification if c.omvm_class_target == "label" else MaskedRegionKL)(
            c.dim, c.num_classes)
        self.pra_phrase = nn.Linear(c.dim, c.dim)
        self.pra_region = nn.Linear(c.dim, c.dim)
        init_weights(self)
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        nn.init.trunc_normal_(self.mask_feature, std=0.02)

    @property
    def joint_dim(self) -> int:
        return self.config.dim

    # ------------------------------------------------------------------ representations
    def _grid(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone map (B, C, gh, gw), visual tokens (B, N, D) before the encoder)."""
        fmap = self.backbone(image)
        vis = self.image_proj(fmap).flatten(2).transpose(1, 2) + self.image_pos + self.type_embed.weight[1]
        return fmap, vis

    def _fuse(self, vis, text, text_mask):
        t = self.text_embed(text) + self.type_embed.weight[0]
        (t_out, v_out), pooled = self.encoder([(t, text_mask), (vis, None)])
        return t_out, v_out, pooled

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder([(self._grid(image)[1], None)])[0][0]

    def joint_embedding(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        text_lengths(self.name, text, text_mask)
        return self._fuse(self._grid(image)[1], text, text_mask.bool())[2]

    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        logits = self.itm_head(self.joint_embedding(image, text, text_mask)).float()
        return logits[:, 1] - logits[:, 0]

    # ------------------------------------------------------------------ objectives
    def _omvm(self, batch, fmap, vis, text, text_mask, cells, valid):
        c = self.config
        b = vis.shape[0]
        has = valid.any(1)
        # one valid object per image, uniformly
        pick = torch.multinomial(valid.float() + (~has)[:, None].float(), 1).squeeze(1)
        rows = torch.arange(b, device=vis.device)
        region = cells[rows, pick] & has[:, None]  # (B, N)
        masked_vis = torch.where(region[..., None], self.mask_feature.to(vis.dtype), vis)
        v_out = self._fuse(masked_vis, text, text_mask)[1]
        h = masked_mean(v_out, region)  # (B, D)
        if c.object_feature_source == "batch":
            target = need(batch, "region_features", self.name)[rows, pick]
        else:
            target = masked_mean(fmap.flatten(2).transpose(1, 2).detach(), region)
        reg = self.omvm_regress.loss(h, target, has)
        if c.omvm_class_target == "label":
            cls = self.omvm_classify.loss(h, need(batch, "box_labels", self.name)[rows, pick], has)
        else:
            cls = self.omvm_classify.loss(h, need(batch, "box_label_probs", self.name)[rows, pick], has)
        return reg, cls

    def _pra(self, batch, t_out, v_out, text, text_mask, cells, valid):
        c = self.config
        box_text, box_text_mask = need(batch, "box_text", self.name), need(batch, "box_text_mask", self.name).bool()
        spans = batch.get("phrase_spans")
        if spans is None:
            spans = find_phrase_spans(text, text_mask, box_text, box_text_mask)
        pos = torch.arange(text.shape[1], device=text.device)
        in_span = (pos >= spans[..., :1]) & (pos < spans[..., 1:])  # (B, R, T)
        found = valid & (spans[..., 0] >= 0)
        emb = self.text_embed.tokens.weight.detach()
        content = box_text_mask & (box_text >= T.NUM_SPECIAL)
        e_phrase = masked_mean_tokens(emb[box_text], content)  # (B, R, D)
        if "label_text" in batch:
            lt, lm = batch["label_text"], need(batch, "label_text_mask", self.name).bool()
            e_names = masked_mean_tokens(emb[lt][None], (lm & (lt >= T.NUM_SPECIAL))[None])[0]  # (C, D)
            labels = need(batch, "box_labels", self.name).clamp(min=0)
            e_label = e_names[labels]
        else:
            e_label = e_phrase
        region_mask = valid[:, None, :]  # candidates: the image's valid regions
        q = _masked_softmax(_cos(e_phrase, e_label) / c.pra_temperature, region_mask)
        h_p = self.pra_phrase(masked_mean(t_out, in_span))
        h_r = self.pra_region(masked_mean(v_out, cells))
        logp = _masked_log_softmax(_cos(h_p, h_r) / c.pra_temperature, region_mask)
        kl = (q * (q.clamp(min=1e-12).log() - logp)).masked_fill(~region_mask, 0.0).sum(-1)  # (B, R)
        return kl[found].mean() if bool(found.any()) else t_out.sum() * 0.0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        image, text = need(batch, "image", self.name), need(batch, "text", self.name)
        text_mask = need(batch, "text_mask", self.name).bool()
        text_lengths(self.name, text, text_mask)
        boxes, valid = need(batch, "boxes", self.name), need(batch, "box_valid", self.name).bool()
        fmap, vis = self._grid(image)
        cells = cells_in_boxes(boxes, self.grid)  # (B, R, N)
        # MLM pass (true image); its fused grid / text outputs also serve PRA
        masked, labels = mask_tokens(text, text_mask, c.vocab_size, c.mlm_prob)
        t_out, v_out, _ = self._fuse(vis, masked, text_mask)
        sel = labels != IGNORE
        mlm = token_cross_entropy(self.mlm_head(t_out[sel]), labels[sel])
        b = image.shape[0]
        swap = torch.rand(b, device=image.device) < 0.5
        pair_vis = torch.where(swap[:, None, None], vis[sample_negatives(b, image.device)], vis)
        itm = F.cross_entropy(self.itm_head(self._fuse(pair_vis, text, text_mask)[2]).float(), (~swap).long())
        reg, cls = self._omvm(batch, fmap, vis, text, text_mask, cells, valid)
        pra = self._pra(batch, t_out, v_out, text, text_mask, cells, valid)
        omvm = reg + cls
        loss = c.mlm_weight * mlm + c.itm_weight * itm + c.omvm_weight * omvm + c.pra_weight * pra
        return {"loss": loss, "mlm": mlm, "itm": itm, "omvm": omvm, "omvm_feature": reg, "omvm_class": cls,
                "pra": pra}


def masked_mean_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (..., T, D) over mask (..., T) -> (..., D)."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(-2) / w.sum(-2).clamp(min=1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, P, D) x (B, R, D) -> (B, P, R) cosine similarities."""
    return torch.einsum("bpd,brd->bpr", F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1))


def _masked_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)


def _masked_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)


register("kdvlp-tiny", KDVLPConfig(vocab_size=1024, image_size=64, max_text_len=32, resnet_layers=(1, 1, 1),
                                   resnet_width=16, resnet_norm="group", dim=64, depth=2, heads=2, num_classes=10,
                                   object_feature_source="backbone"), KDVLP)
register("kdvlp-base", KDVLPConfig(), KDVLP)
