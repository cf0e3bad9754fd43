"""Downstream task metrics (VQA score, Acc@0.5, accuracy, R@K, BLEU-4, CIDEr): :mod:`vlcore.eval.metrics`."""

from vlcore.eval.metrics import accuracy, bleu4, box_acc_at, cider, recall_at_k, vqa_score

__all__ = ["accuracy", "bleu4", "box_acc_at", "cider", "recall_at_k", "vqa_score"]
