"""X-VLM (Zeng et al., ICML 2022): multi-grained vision-language pretraining.

* Image: Swin encoder -> patch features V (N = gh x gw). A *visual concept* for a box is the sequence of the
  patches the box overlaps (row-major), preceded by their mean; the whole image is the box covering all
  patches. Concepts are packed to the front of a (1 + N)-long sequence, padding masked by ``kv_lens``.
* Text: BERT-style 6-layer text encoder; its first token (BOS, acting as [CLS]) gives the text feature.
  Cross encoder: 6 layers of self-attention + cross-attention to a concept + MLP.
* Losses (summed, as the paper): ITC between concepts and texts — image level (image, caption) and box level
  (box concept, its phrase; named ``object`` when the batch carries ``box_labels``, else ``region``) through
  ``vlcore.nn.ContrastiveLoss`` (global batch, one learnable temperature); ITM at both levels with hard
  negatives drawn from the contrastive similarities over the global batch (``vlcore.distributed.all_gather``,
  gradient back to the owning rank); MLM (15 %, 80/10/10) on the caption with the image; box prediction
  b = sigmoid(MLP(x_cls)) from the cross encoder on (image, phrase) with L1 + GIoU.

Size: ``xvlm-base`` = Swin-B (224 px, window 7) + 6 + 6 BERT-base layers, 30522 vocabulary: ~215M parameters
(paper: 216M).
Distributed: whether the box-level losses run depends only on the batch keys (same on every rank), and a rank
without valid boxes runs the very same ops on empty tensors: every rank builds the same autograd graph, so the
gathers' backward collectives run in the same order everywhere (no mismatch, no hang).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import vlcore.nn as vnn
from vlcore import distributed as vdist
from vlcore.nn.heads import BoxHead, MLMHead, MLPHead
from vlcore.nn.objectives import (
    box_cxcywh_to_xyxy,
    box_losses,
    mask_tokens,
    sample_hard_negatives,
    token_cross_entropy,
)
from vlcore.nn.swin import SwinEncoder
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import encoder, init_weights

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class XVLMConfig:
    vocab_size: int = 30522
    image_size: int = 224
    max_text_len: int = 40
    patch_size: int = 4
    swin_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 7
    text_dim: int = 768
    text_heads: int = 12
    text_depth: int = 6
    cross_depth: int = 6
    mlp_ratio: float = 4.0
    embed_dim: int = 256
    mlm_prob: float = 0.15
    checkpoint: bool = False


class XVLM(nn.Module):
    def __init__(self, config: XVLMConfig):
        super().__init__()
        c = self.config = config
        self.vision = SwinEncoder(c.image_size, c.patch_size, c.swin_dim, tuple(c.swin_depths), tuple(c.swin_heads),
                                  c.window, c.mlp_ratio, checkpoint=c.checkpoint)
        self.grid, vdim = self.vision.grid, self.vision.out_dim
        self.text_embed = TextEmbeddings(c.vocab_size, c.text_dim, c.max_text_len)
        self.text_encoder = encoder(c.text_dim, c.text_depth, c.text_heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.cross_encoder = encoder(c.text_dim, c.cross_depth, c.text_heads, c.mlp_ratio, cross=True,
                                     context_dim=vdim, checkpoint=c.checkpoint)
        self.vision_proj = nn.Linear(vdim, c.embed_dim)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim)
        self.contrastive = vnn.ContrastiveLoss("infonce")
        self.itm_head = MLPHead(c.text_dim, 2, hidden=2 * c.text_dim, norm=True)
        self.box_head = BoxHead(c.text_dim, hidden=2 * c.text_dim)
        self.mlm_head = MLMHead(c.text_dim, self.text_embed.tokens)
        init_weights(self.text_embed)
        init_weights(self.text_encoder)
        init_weights(self.cross_encoder)

    # ---- concepts and texts -----------------------------------------------------------------------------

    def image_concept(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image concept [mean, patches...] (B, 1 + N, C) and its lengths."""
        seq = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
        return seq, torch.full((patches.shape[0],), seq.shape[1], dtype=torch.int32, device=seq.device)

    def box_patch_mask(self, boxes: torch.Tensor) -> torch.Tensor:
        """(nb, N) bool: the patches a normalised (cx, cy, w, h) box overlaps (at least the one at its corner)."""
        gh, gw = self.grid
        x0, y0, x1, y1 = box_cxcywh_to_xyxy(boxes.float()).clamp(0, 1).unbind(-1)

        def span(lo, hi, n):
            first = (lo * n).floor().clamp(0, n - 1)
            last = torch.maximum((hi * n).ceil(), first + 1)
            idx = torch.arange(n, device=boxes.device)
            return (idx >= first[:, None]) & (idx < last[:, None])

        rows, cols = span(y0, y1, gh), span(x0, x1, gw)
        return (rows[:, :, None] & cols[:, None, :]).flatten(1)

    def box_concept(self, patches: torch.Tensor, image_index: torch.Tensor,
                    boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concepts of boxes on images ``image_index``: [mean of the box's patches, those patches, padding]."""
        inside = self.box_patch_mask(boxes)
        feats = patches.index_select(0, image_index)
        count = inside.sum(1)
        mean = (feats * inside[..., None]).sum(1) / count.clamp(min=1)[:, None]
        order = torch.sort((~inside).to(torch.uint8), dim=1, stable=True).indices  # inside patches first
        packed = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
        return torch.cat([mean[:, None], packed], dim=1), (1 + count).to(torch.int32)

    def text_hidden(self, text: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(self.text_embed(text), kv_lens=lens)

    def image_feature(self, concept: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(concept[:, 0]), dim=-1)

    def text_feature(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def cross(self, text_hidden, text_lens, concept, concept_lens) -> torch.Tensor:
        return self.cross_encoder(text_hidden, concept, kv_lens=text_lens, context_lens=concept_lens)

    # ---- objectives -------------------------------------------------------------------------------------

    def matching_loss(self, concept, concept_lens, image_feat, text_hidden, text_lens, text_feat) -> torch.Tensor:
        """ITM: each pair's positive, a hard-negative text for each concept and a hard-negative concept for each
        text, drawn with probability softmax(s * similarity) over the global batch (own pair excluded)."""
        b = concept.shape[0]
        rank, world, is_dist = vdist.world_info()
        if is_dist and world > 1:  # every rank holds the same T: pad texts to max_text_len
            pad = self.config.max_text_len - text_hidden.shape[1]
            text_hidden = F.pad(text_hidden, (0, 0, 0, pad))
        feats, sizes = vdist.all_gather_with_sizes(torch.cat([image_feat, text_feat], dim=1))
        image_all, text_all = feats[:, :image_feat.shape[1]], feats[:, image_feat.shape[1]:]
        concept_all = vdist.all_gather(concept)
        concept_lens_all = vdist.all_gather(concept_lens)
        text_hidden_all = vdist.all_gather(text_hidden)
        text_lens_all = vdist.all_gather(text_lens)
        if sum(sizes) < 2:  # the same decision on every rank
            return concept.sum() * 0.0
        offset = sum(sizes[:rank])
        own = offset + torch.arange(b, device=concept.device)
        neg_text = neg_image = own  # an empty local batch still runs every op below (same graph on all ranks)
        if b:
            with torch.no_grad():
                scale = self.contrastive.scale()
                neg_text = sample_hard_negatives(scale * image_feat @ text_all.t(), own)
                neg_image = sample_hard_negatives(scale * text_feat @ image_all.t(), own)
        vis = torch.cat([concept, concept, concept_all[neg_image]])
        vis_lens = torch.cat([concept_lens, concept_lens, concept_lens_all[neg_image]])
        txt = torch.cat([text_hidden, text_hidden_all[neg_text], text_hidden])
        txt_lens = torch.cat([text_lens, text_lens_all[neg_text], text_lens])
        logits = self.itm_head(self.cross(txt, txt_lens, vis, vis_lens)[:, 0])
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
        return F.cross_entropy(logits.float(), labels, reduction="sum") / max(3 * b, 1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = need(batch, "image", "X-VLM"), need(batch, "text", "X-VLM")
        text_mask = need(batch, "text_mask", "X-VLM").bool()
        lens = text_lengths("X-VLM", text, text_mask, min_len=1).to(text.device)
        patches = self.vision(image)
        concept, concept_lens = self.image_concept(patches)
        hidden = self.text_hidden(text, lens)
        image_feat, text_feat = self.image_feature(concept), self.text_feature(hidden)
        out = {"itc_image": self.contrastive(image_feat, text_feat),
               "itm_image": self.matching_loss(concept, concept_lens, image_feat, hidden, lens, text_feat)}
        masked, labels = mask_tokens(text, text_mask, self.config.vocab_size, self.config.mlm_prob)
        mlm_hidden = self.cross(self.text_hidden(masked, lens), lens, concept, concept_lens)
        out["mlm"] = token_cross_entropy(self.mlm_head(mlm_hidden), labels)
        if "boxes" in batch:
            out.update(self.box_losses(batch, patches, concept, concept_lens))
        out["loss"] = sum(out.values())
        return out

    def box_losses(self, batch, patches, concept, concept_lens) -> dict[str, torch.Tensor]:
        boxes = need(batch, "boxes", "X-VLM")
        box_text, box_mask = need(batch, "box_text", "X-VLM"), need(batch, "box_text_mask", "X-VLM").bool()
        valid = need(batch, "box_valid", "X-VLM").bool()
        if boxes.dim() != 3 or boxes.shape[-1] != 4 or box_text.dim() != 3 or valid.shape != boxes.shape[:2] \
                or box_text.shape[:2] != boxes.shape[:2] or box_mask.shape != box_text.shape:
            raise ValueError(f"X-VLM: expected boxes (B, R, 4), box_valid (B, R), box_text and box_text_mask "
                             f"(B, R, Tr); got {tuple(boxes.shape)}, {tuple(valid.shape)}, {tuple(box_text.shape)}, "
                             f"{tuple(box_mask.shape)}")
        level = "object" if "box_labels" in batch else "region"
        image_index, slot = valid.nonzero(as_tuple=True)
        target = boxes[image_index, slot].float()
        phrase, phrase_mask = box_text[image_index, slot], box_mask[image_index, slot]
        distributed = vdist.world_info()[2] and vdist.world_info()[1] > 1
        if target.shape[0] == 0 and not distributed:
            return {}
        phrase_lens = text_lengths("X-VLM", phrase, phrase_mask, "box_text", min_len=1).to(phrase.device)
        box_concept, box_concept_lens = self.box_concept(patches, image_index, target)
        phrase_hidden = self.text_hidden(phrase, phrase_lens)
        box_feat, phrase_feat = self.image_feature(box_concept), self.text_feature(phrase_hidden)
        out = {f"itc_{level}": self.contrastive(box_feat, phrase_feat),
               f"itm_{level}": self.matching_loss(box_concept, box_concept_lens, box_feat, phrase_hidden, phrase_lens,
                                                  phrase_feat)}
        cls = self.cross(phrase_hidden, phrase_lens, concept[image_index], concept_lens[image_index])[:, 0]
        out["box_l1"], out["box_giou"] = box_losses(self.box_head(cls).float(), target)
        return out

    # ---- the contract -----------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_feature(self.image_concept(self.vision(image))[0])

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        lens = text_lengths("X-VLM", text, text_mask, min_len=1).to(text.device)
        return self.text_feature(self.text_hidden(text, lens))

    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM log-odds (match minus no-match logit) of each (image_i, text_i) from the cross encoder's [CLS], (B,):
        the re-ranking score of X-VLM's retrieval protocol (``vlcore.heads.retrieval``)."""
        lens = text_lengths("X-VLM", text, text_mask, min_len=1).to(text.device)
        concept, concept_lens = self.image_concept(self.vision(image))
        logits = self.itm_head(self.cross(self.text_hidden(text, lens), lens, concept, concept_lens)[:, 0]).float()
        return logits[:, 1] - logits[:, 0]

    def predict_box(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Box (B, 4) normalised (cx, cy, w, h) of the concept each text describes."""
        lens = text_lengths("X-VLM", text, text_mask, min_len=1).to(text.device)
        concept, concept_lens = self.image_concept(self.vision(image))
        return self.box_head(self.cross(self.text_hidden(text, lens), lens, concept, concept_lens)[:, 0])


def build(config: XVLMConfig) -> XVLM:
    return XVLM(config)


register("xvlm-tiny", XVLMConfig(vocab_size=1000, image_size=64, max_text_len=32, patch_size=8, swin_dim=32, swin_depths=(2, 2),
                                 swin_heads=(1, 2), window=4, text_dim=64, text_heads=2, text_depth=1, cross_depth=1,
                                 embed_dim=64), build)
register("xvlm-base", XVLMConfig(), build)
