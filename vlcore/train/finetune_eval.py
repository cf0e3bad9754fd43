"""Held-out evaluation of a fine-tuned :class:`TaskModel` with each task's standard metric.

vqa: VQA score (and exact accuracy); grounding: Acc@0.5 and mean IoU; nlvr2 / ve / vcr: accuracy (with the
chance level beside it); captioning: BLEU-4 and CIDEr-D against the two references of each held-out scene;
retrieval: R@1/5/10 both ways on held-out scenes with distinct captions. All on the test split (held-out scans).
"""

from __future__ import annotations

import contextlib

import torch

from vlcore.data.digits_scenes import ANSWERS, retrieval_set, scenes_to_arrays
from vlcore.data.tasks import VE_LABELS, TaskData, vqa_answer_index
from vlcore.data.tasks_batch import collate
from vlcore.eval import metrics as M
from vlcore.train.evaluation import _pair_scores
from vlcore.train.finetune import TaskModel

DEFAULT_EXAMPLES = {"vqa": 500, "grounding": 500, "nlvr2": 500, "ve": 500, "vcr": 500, "captioning": 200,
                    "retrieval": 100}
CHANCE = {"nlvr2": 0.5, "ve": 1 / len(VE_LABELS), "vcr": 0.25}
HEADLINE = {"vqa": "vqa_score", "grounding": "acc@0.5", "nlvr2": "accuracy", "ve": "accuracy", "vcr": "accuracy",
            "captioning": "cider", "retrieval": "rsum"}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _generate(model: TaskModel, images: torch.Tensor, max_new_tokens: int, prompt=None) -> torch.Tensor:
    if model.recipe == "caption_head":
        return model.head.generate(model.backbone.image_tokens(images), max_new_tokens)
    return model.backbone.generate(images, prompt=prompt, max_new_tokens=max_new_tokens)


@torch.no_grad()
def evaluate_task(model: TaskModel, tokenizer, device, *, max_text_len: int, image_size: int = 64, seed: int = 0,
                  n: int | None = None, batch_size: int = 128, autocast=None) -> dict:
    """The task's metrics as a flat dict (fractions in [0, 1]; R@K in percent, as retrieval papers report)."""
    task = model.task
    n = n or DEFAULT_EXAMPLES[task]
    autocast = autocast or contextlib.nullcontext
    was = model.training
    model.eval()
    out: dict = {"task": task, "recipe": model.recipe, "n": n, "headline": HEADLINE[task]}
    try:
        with autocast():
            if task == "retrieval":
                arr = scenes_to_arrays(retrieval_set(n=n, seed=seed, image_size=image_size))
                text, mask = tokenizer.batch(arr["caption"], max_text_len)
                sim = _pair_scores(model.backbone, arr["image"], text, mask, device, batch_size, autocast, arr)
                out.update(M.recall_at_k(sim))
                return out
            examples = TaskData(task, "test", seed=seed, image_size=image_size).examples(range(n))
            chunks = [examples[i:i + batch_size] for i in range(0, n, batch_size)]
            if task == "captioning":
                hyps = []
                for ch in chunks:
                    ids = _generate(model, scenes_to_arrays([e.images[0] for e in ch])["image"].to(device),
                                    max_text_len)
                    hyps += [tokenizer.decode(r.tolist()).strip() for r in ids.cpu()]
                refs = [e.references for e in examples]
                try:
                    out["cider"] = M.cider(hyps, refs)
                except ImportError as e:  # an optional package: the run keeps its BLEU-4 and says what is missing
                    out["cider_unavailable"] = str(e)
                    out["headline"] = "bleu4"
                out.update(bleu4=M.bleu4(hyps, refs),
                           exact_match=sum(h == r[0] for h, r in zip(hyps, refs)) / n,
                           examples=[{"generated": h, "references": r} for h, r in list(zip(hyps, refs))[:5]])
                return out
            if task == "vqa" and model.recipe == "generate":
                preds = [-1] * n
                for q in sorted({e.text for e in examples}):  # one prompt length per generate call
                    idx = [i for i, e in enumerate(examples) if e.text == q]
                    prompt = torch.tensor([tokenizer.encode(q)] * len(idx), device=device)
                    images = scenes_to_arrays([examples[i].images[0] for i in idx])["image"].to(device)
                    ids = _generate(model, images, 4, prompt=prompt).cpu()
                    for i, row in zip(idx, ids):
                        preds[i] = vqa_answer_index(tokenizer.decode(row.tolist()))
            else:
                outs = [model.logits(_to(collate(task, ch, tokenizer, max_text_len), device)).float().cpu()
                        for ch in chunks]
                pred = torch.cat(outs)
                preds = pred if task == "grounding" else pred.argmax(-1).tolist()
        if task == "vqa":
            out["vqa_score"] = sum(M.vqa_score(p, e.answers) for p, e in zip(preds, examples)) / n
            out["accuracy"] = M.accuracy(preds, [e.label for e in examples])
            out["answer_vocabulary"] = len(ANSWERS)
        elif task == "grounding":
            out.update(M.box_acc_at(preds, torch.tensor([e.box for e in examples])))
        else:
            out["accuracy"] = M.accuracy(preds, [e.label for e in examples])
            out["chance"] = CHANCE[task]
    finally:
        model.train(was)
    return out


def format_result(metrics: dict) -> str:
    keys = [k for k in ("vqa_score", "accuracy", "acc@0.5", "mean_iou", "bleu4", "cider", "i2t_r1", "i2t_r5",
                        "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "chance") if k in metrics]
    lines = [f"evaluation: {metrics['task']} ({metrics['recipe']}), {metrics['n']} held-out examples"]
    for k in keys:
        v = metrics[k]
        lines.append(f"  {k:<12} {v:8.2f}" if k.startswith(("i2t", "t2i")) else f"  {k:<12} {v:8.4f}")
    for ex in metrics.get("examples", [])[:3]:
        lines.append(f"  caption: {ex['generated']!r}  (references {ex['references']})")
    return "\n".join(lines)
