"""Downstream task heads (fine-tuning and evaluation) on top of any vlcore model's representations.

Heads take tensors, not models, so they work with every model that provides the representation they need:

| head | needs | models that provide it |
| --- | --- | --- |
| VQA, VE, NLVR², VCR, REC (box regression) | ``joint_embedding(image, text, text_mask) -> (B, joint_dim)`` | ViLT, VinVL (+ region keys), E2E-VLP, KD-VLP (pooler [CLS]); ALIGN, MURAL ([u, v, u·v] of the dual embeddings) |
| REC (region scoring) | per-region features (B, R, D) + a query (B, D) | VinVL (region outputs of ``fuse``), KD-VLP / E2E-VLP (``roi_align`` / ``masked_mean`` over ``image_tokens``) |
| retrieval | ``encode_image`` / ``encode_text`` (recall), ``score`` (ITM re-ranking or full scoring) | ALIGN, MURAL (dual); ViLT, VinVL, E2E-VLP, KD-VLP (``score``); CoCa, X-VLM (both) |
| zero-shot classification | ``encode_image`` / ``encode_text`` | ALIGN, MURAL, CoCa, X-VLM |
| captioning | ``generate`` (the model's own decoder) or ``image_tokens`` + :class:`CaptionHead` | E2E-VLP, CoCa, SimVLM (``generate``); ALIGN, MURAL, E2E-VLP, KD-VLP (``image_tokens``) |
"""

from vlcore.heads.captioning import CaptionHead, generate_captions
from vlcore.heads.classification import (
    EntailmentHead,
    MultipleChoiceHead,
    NLVR2Head,
    VQAHead,
    vqa_accuracy,
    vqa_soft_targets,
)
from vlcore.heads.grounding import BoxRegressionHead, RegionScoringHead, box_accuracy
from vlcore.heads.retrieval import rerank_with_itm, retrieval_metrics, similarity_matrix
from vlcore.heads.zeroshot import ZeroShotClassifier

__all__ = ["BoxRegressionHead", "CaptionHead", "EntailmentHead", "MultipleChoiceHead", "NLVR2Head",
           "RegionScoringHead", "VQAHead", "ZeroShotClassifier", "box_accuracy", "generate_captions",
           "rerank_with_itm", "retrieval_metrics", "similarity_matrix", "vqa_accuracy", "vqa_soft_targets"]
