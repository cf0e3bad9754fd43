"""The standard metrics of the downstream tasks, on plain Python values (what the evaluators collect).

* VQA score (Antol et al., 2015): acc(a) = mean over the 10 leave-one-out subsets of the annotators of
  min(1, #subset annotators who said a / 3).
* Acc@0.5 (RefCOCO; X-VLM, E2E-VLP): fraction of predicted boxes with IoU ≥ 0.5 to the ground truth.
* accuracy (NLVR², SNLI-VE, VCR): fraction of exact predictions.
* R@K (image–text retrieval): :func:`vlcore.heads.retrieval_metrics` in both directions, K = 1, 5, 10.
* BLEU-4 (Papineni et al., 2002): corpus BLEU with the closest reference length, from nltk (``corpus_bleu``,
  as the COCO caption evaluation computes it).
* CIDEr-D (Vedantam et al., 2015): pycocoevalcap's ``Cider`` when that package is installed; else the same
  algorithm here (no maintained CIDEr package installs offline on this project's machines: pycocoevalcap is not
  on the local index and torchmetrics / sacrebleu / nltk have no CIDEr). The tests compare it with hand values.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch

from vlcore.heads.grounding import box_iou
from vlcore.heads.retrieval import retrieval_metrics


def vqa_score(prediction, answers: Sequence) -> float:
    """The official VQA accuracy of ``prediction`` given the annotators' ``answers`` (any comparable values)."""
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_score: `answers` must hold at least one annotator answer")
    if n == 1:
        return float(prediction == answers[0])
    total = 0.0
    for k in range(n):
        others = answers[:k] + answers[k + 1:]
        total += min(1.0, sum(a == prediction for a in others) / 3.0)
    return total / n


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"accuracy: expected as many predictions as labels (> 0), got {len(predictions)} and "
                         f"{len(labels)}")
    return sum(int(p == t) for p, t in zip(predictions, labels)) / len(labels)


def box_acc_at(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> dict:
    """{"acc@0.5": fraction with IoU ≥ threshold, "mean_iou"} of paired (N, 4) (cx, cy, w, h) boxes."""
    iou = box_iou(pred.float(), target.float())
    return {f"acc@{threshold:g}": float((iou >= threshold).float().mean()), "mean_iou": float(iou.mean())}


def recall_at_k(sim_i2t: torch.Tensor, text_to_image: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict:
    """R@K in percent, both directions (the text of row i is column i unless ``text_to_image`` says otherwise)."""
    if text_to_image is None:
        text_to_image = torch.arange(sim_i2t.shape[1])
    return retrieval_metrics(sim_i2t, text_to_image, ks=ks)


def caption_tokens(text: str) -> list[str]:
    """Lower-case words without punctuation (the COCO evaluation's PTB tokenisation, minus the Java)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (nltk): uniform 1–4-gram weights, brevity penalty against the closest reference length."""
    try:
        from nltk.translate.bleu_score import corpus_bleu
    except ImportError as e:
        raise ImportError("BLEU-4 needs nltk: pip install 'vlcore[eval]' (or pip install nltk)") from e
    refs = [[caption_tokens(r) for r in rs] for rs in references]
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match: the score is then 0, rightly
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu(refs, [caption_tokens(h) for h in hypotheses]))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (the mean over images; ×10 as COCO reports it), computed by pycocoevalcap (the COCO caption
    evaluation) on vlcore's caption tokenisation."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"cider: expected one reference list per hypothesis (> 0), got {len(hypotheses)} and "
                         f"{len(references)}")
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("CIDEr needs pycocoevalcap: pip install 'vlcore[eval]' (or pip install pycocoevalcap)") from e
    gts = {i: [" ".join(caption_tokens(r)) for r in rs] for i, rs in enumerate(references)}
    res = {i: [" ".join(caption_tokens(h))] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])
