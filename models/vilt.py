"""ViLT (Kim et al., ICML 2021): Vision-and-Language Transformer without convolution or region supervision.

* Image: ViT-style linear patch embedding (a strided conv = a linear map of each flattened patch) + an image
  [CLS] token + learned 1-D position embedding. Text: BERT embeddings (token + position + segment).
  A modality-type embedding (0 = text, 1 = image) is added to every token, then ONE pre-norm Transformer
  (ViT-B/32 sized for ``vilt-b32``) runs over [text | image] (``vlcore.nn.fusion.SingleStreamEncoder``).
  The pooler (tanh(Linear)) on the text [CLS] (our BOS) feeds the ITM head.
* Objectives (paper: MLM + ITM + WPA, summed, WPA weighted 0.1 as in the released code):
  - MLM (15 %, 80/10/10) with whole-word masking when ``whole_word_masking`` (paper default); word boundaries
    come from the batch key ``word_ids`` or from ``model.set_word_starts(tokenizer)``.
  - ITM: with probability 0.5 the image is replaced by another image of the batch; binary head on the pooler.
  - WPA: word–patch alignment by optimal transport on the ITM pass — IPOT approximation of the Wasserstein
    distance (50 proximal iterations, 1 inner Sinkhorn step, β = 0.5, plan held fixed in the backward; see
    ``vlcore.nn.optimal_transport``), low for matched pairs, high for mismatched ones.
* Parameter count: ``vilt-b32`` = 87.4M in the paper = the 12-layer Transformer (85.05M) + the 32x32 patch
  projection (2.36M). The full module adds the position/type embeddings, the pooler, the heads and the
  vocabulary-sized tensors (word embeddings 23.4M, tied MLM decoder bias); ``backbone_parameter_count()``
  counts everything but the vocabulary-sized tensors (88.7M, +1.5 %).

Batch keys: ``image``, ``text``, ``text_mask``; optional ``word_ids`` (B, T) long (tokens of one word share an
id) for whole-word masking. Provides ``score`` (ITM logit), ``joint_embedding`` (pooler, for the VQA / VE /
NLVR² / VCR / REC heads) and ``fuse``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlcore import tokens as T
from vlcore.nn.fusion import SingleStreamEncoder
from vlcore.nn.heads import MLMHead
from vlcore.nn.masking import mask_whole_words, word_ids_from_starts, word_start_table
from vlcore.nn.objectives import IGNORE, mask_tokens, sample_negatives, token_cross_entropy
from vlcore.nn.optimal_transport import wpa_distance, wpa_loss
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import init_weights
from vlcore.nn.vit import PatchEmbed

from . import register
from ._common import need, text_lengths


@dataclasses.dataclass
class ViLTConfig:
    vocab_size: int = 30522
    image_size: int = 384
    max_text_len: int = 40
    patch_size: int = 32
    patch_stem: str = "linear"  # the paper's linear patch projection; "conv": vlcore.nn.PatchEmbed's conv stem
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    mlm_prob: float = 0.15
    whole_word_masking: bool = True
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    wpa_weight: float = 0.1
    ipot_iterations: int = 50
    checkpoint: bool = False


class ViLT(nn.Module):
    name = "vilt"

    def __init__(self, config: ViLTConfig):
        super().__init__()
        c = self.config = config
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len)
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.dim, stem=c.patch_stem)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.image_pos = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, c.dim))
        self.type_embed = nn.Embedding(2, c.dim)
        self.encoder = SingleStreamEncoder(c.dim, c.depth, c.heads, c.mlp_ratio, checkpoint=c.checkpoint)
        self.itm_head = nn.Linear(c.dim, 2)
        self.mlm_head = MLMHead(c.dim, self.text_embed.tokens)
        self.register_buffer("word_start", None, persistent=False)
        init_weights(self)
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        nn.init.trunc_normal_(self.image_cls, std=0.02)

    # ------------------------------------------------------------------ representation
    @property
    def joint_dim(self) -> int:
        return self.config.dim

    def fuse(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """(text outputs (B, T, D), image outputs (B, 1 + N, D), pooled (B, D))."""
        text_lengths(self.name, text, text_mask)
        t = self.text_embed(text) + self.type_embed.weight[0]
        p = self.patch_embed(image)
        v = torch.cat([self.image_cls.expand(p.shape[0], -1, -1), p], 1) + self.image_pos + self.type_embed.weight[1]
        (t_out, v_out), pooled = self.encoder([(t, text_mask), (v, None)])
        return t_out, v_out, pooled

    def joint_embedding(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.fuse(image, text, text_mask)[2]

    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logit (matched minus mismatched) of each (image_i, text_i) pair, (B,)."""
        logits = self.itm_head(self.fuse(image, text, text_mask)[2]).float()
        return logits[:, 1] - logits[:, 0]

    # ------------------------------------------------------------------ objectives
    def set_word_starts(self, table_or_tokenizer) -> None:
        """Word boundaries for whole-word masking: a (V,) bool table or a tokenizer (see vlcore.nn.masking)."""
        table = table_or_tokenizer if isinstance(table_or_tokenizer, torch.Tensor) else \
            word_start_table(table_or_tokenizer, self.config.vocab_size)
        if table.shape != (self.config.vocab_size,):
            raise ValueError(f"{self.name}: word-start table must be ({self.config.vocab_size},); got {tuple(table.shape)}")
        self.word_start = table.bool().to(self.image_pos.device)

    def _mask(self, text: torch.Tensor, text_mask: torch.Tensor, batch: dict):
        c = self.config
        if not c.whole_word_masking:
            return mask_tokens(text, text_mask, c.vocab_size, c.mlm_prob)
        if "word_ids" in batch:
            word_ids = batch["word_ids"]
        elif self.word_start is not None:
            word_ids = word_ids_from_starts(text, self.word_start)
        else:
            raise KeyError(f"{self.name}: whole-word masking needs batch key 'word_ids' or "
                           "model.set_word_starts(tokenizer) (or build with whole_word_masking=False)")
        return mask_whole_words(text, text_mask, word_ids, c.vocab_size, c.mlm_prob)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        image, text = need(batch, "image", self.name), need(batch, "text", self.name)
        text_mask = need(batch, "text_mask", self.name).bool()
        # MLM pass: masked text with the true image
        masked, labels = self._mask(text, text_mask, batch)
        t_out, _, _ = self.fuse(image, masked, text_mask)
        sel = labels != IGNORE
        mlm = token_cross_entropy(self.mlm_head(t_out[sel]), labels[sel])
        # ITM pass: half of the images replaced by another image of the batch
        b = image.shape[0]
        swap = torch.rand(b, device=image.device) < 0.5
        other = sample_negatives(b, image.device)
        pair_image = torch.where(swap[:, None, None, None], image[other], image)
        matched = ~swap
        t_out, v_out, pooled = self.fuse(pair_image, text, text_mask)
        itm = F.cross_entropy(self.itm_head(pooled).float(), matched.long())
        # WPA: text tokens without BOS/EOS vs image patches without the image [CLS]
        words = text_mask & (text != T.BOS) & (text != T.EOS)
        patches = torch.ones(v_out.shape[:2], dtype=torch.bool, device=v_out.device)
        patches[:, 0] = False
        dist = wpa_distance(t_out, v_out, words, patches, iterations=c.ipot_iterations)
        wpa = wpa_loss(dist, matched)
        loss = c.mlm_weight * mlm + c.itm_weight * itm + c.wpa_weight * wpa
        return {"loss": loss, "mlm": mlm, "itm": itm, "wpa": wpa}

    def backbone_parameter_count(self) -> int:
        """Parameters excluding the vocabulary-sized tensors (word embeddings, MLM decoder bias)."""
        vocab = {id(self.text_embed.tokens.weight), id(self.mlm_head.bias)}
        return sum(p.numel() for p in self.parameters() if id(p) not in vocab)


register("vilt-tiny", ViLTConfig(vocab_size=1024, image_size=64, max_text_len=32, patch_size=8, dim=64, depth=2,
                                 heads=2, whole_word_masking=False, ipot_iterations=10), ViLT)
register("vilt-b32", ViLTConfig(), ViLT)
