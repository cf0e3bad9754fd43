"""Evaluation on held-out digits-scenes data (scans never seen in training).

- zero-shot digit classification: every held-out scan alone on a canvas, prompts "a 0" ... "a 9"; dual encoders
  rank prompts by cosine similarity of ``encode_image``/``encode_text``, other models by ``score``.
- image-text retrieval on ``n_scenes`` held-out scenes with distinct captions: R@1 and R@5 in both directions.
- captioners (``generate``): exact match of the greedy caption with the reference caption.
- models with a box head (``predict_box(image, text, text_mask) -> (B, 4)`` cx, cy, w, h, as X-VLM): mean IoU
  of the box predicted for each digit's phrase ("a 3") against the digit's box.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch

from vlcore.data.digits_scenes import retrieval_set, scenes_to_arrays, zero_shot_set
from vlcore.heads.grounding import box_iou


def _dual(model) -> bool:
    return hasattr(model, "encode_image") and hasattr(model, "encode_text")


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _takes_regions(fn) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _pair_scores(model, images, texts, masks, device, batch_size, autocast, regions=None) -> torch.Tensor:
    """(n_images, n_texts) match scores: cosine similarities for dual encoders, else ``model.score`` per pair.

    ``regions`` (boxes, box_valid of each image) go to a ``score(..., **regions)`` that accepts them (region
    models such as VinVL), with no object tags: the tags would name the digit.
    """
    if _dual(model):
        with autocast():
            img = torch.cat([model.encode_image(images[s].to(device)).float() for s in _chunks(len(images), batch_size)])
            txt = torch.cat([model.encode_text(texts[s].to(device), masks[s].to(device)).float()
                             for s in _chunks(len(texts), batch_size)])
        return (img @ txt.T).cpu()
    if not hasattr(model, "score"):
        raise TypeError(f"{type(model).__name__} has neither encode_image/encode_text nor score(): it cannot be "
                        "evaluated for zero-shot classification or retrieval")
    ni, nt = len(images), len(texts)
    ii, tt = torch.meshgrid(torch.arange(ni), torch.arange(nt), indexing="ij")
    ii, tt = ii.reshape(-1), tt.reshape(-1)
    use_regions = regions is not None and _takes_regions(model.score)
    out = []
    with autocast():
        for s in _chunks(len(ii), batch_size):
            extra = {}
            if use_regions:
                n = len(ii[s])
                extra = {"boxes": regions["boxes"][ii[s]].to(device), "box_valid": regions["box_valid"][ii[s]].to(device),
                         "tags": torch.zeros(n, 1, dtype=torch.long, device=device),
                         "tags_mask": torch.zeros(n, 1, dtype=torch.bool, device=device)}
            out.append(model.score(images[ii[s]].to(device), texts[tt[s]].to(device), masks[tt[s]].to(device),
                                   **extra).float())
    return torch.cat(out).view(ni, nt).cpu()


def _recall(scores: torch.Tensor, k: int) -> float:
    """Rows are queries, the right answer of query i is column i."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == torch.arange(len(scores))[:, None]).any(1).float().mean().item()


@torch.no_grad()
def evaluate(model, tokenizer, device, *, max_text_len: int, image_size: int = 64, seed: int = 0,
             n_scenes: int = 100, batch_size: int = 256, autocast=None, max_phrase_len: int = 6,
             zero_shot_images: int | None = None) -> dict:
    """All the metrics that ``model`` supports, as a flat dict (fractions in [0, 1])."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    out: dict = {"method": "dual-encoder" if _dual(model) else "score"}
    try:
        zs = zero_shot_set(seed=seed, image_size=image_size)
        keep = slice(0, zero_shot_images)
        images, labels = zs["image"][keep], zs["label"][keep]
        prompts, prompt_mask = tokenizer.batch([f"a {d}" for d in range(10)], max_text_len)
        scores = _pair_scores(model, images, prompts, prompt_mask, device, batch_size, autocast,
                              {"boxes": zs["boxes"][keep], "box_valid": zs["box_valid"][keep]})
        out["zero_shot_acc"] = (scores.argmax(1) == labels).float().mean().item()
        out["zero_shot_n"] = len(labels)

        scenes = retrieval_set(n=n_scenes, seed=seed, image_size=image_size)
        arr = scenes_to_arrays(scenes)
        text, mask = tokenizer.batch(arr["caption"], max_text_len)
        sim = _pair_scores(model, arr["image"], text, mask, device, batch_size, autocast, arr)
        out.update(t2i_r1=_recall(sim.T, 1), t2i_r5=_recall(sim.T, 5), i2t_r1=_recall(sim, 1),
                   i2t_r5=_recall(sim, 5), retrieval_n=len(scenes))

        if hasattr(model, "generate"):
            with autocast():
                gen = torch.cat([model.generate(arr["image"][s].to(device), max_new_tokens=max_text_len).cpu()
                                 for s in _chunks(len(scenes), batch_size)])
            hyps = [tokenizer.decode(row.tolist()).strip() for row in gen]
            out["caption_exact_match"] = sum(h == c for h, c in zip(hyps, arr["caption"])) / len(hyps)
            out["caption_examples"] = [{"reference": c, "generated": h} for c, h in list(zip(arr["caption"], hyps))[:5]]

        predict = getattr(model, "predict_box", None) or getattr(model, "predict_boxes", None)
        if predict is not None:
            valid = arr["box_valid"]
            bi, ri = valid.nonzero(as_tuple=True)
            phrases = [arr["phrases"][b][r] for b, r in zip(bi.tolist(), ri.tolist())]
            ptext, pmask = tokenizer.batch(phrases, max_phrase_len)
            with autocast():
                pred = torch.cat([predict(arr["image"][bi[s]].to(device), ptext[s].to(device),
                                                      pmask[s].to(device)).float().cpu()
                                  for s in _chunks(len(bi), batch_size)])
            # a phrase such as "a 3" may fit two digits of a scene: the better-fitting one counts
            same = arr["box_labels"][bi] == arr["box_labels"][bi, ri][:, None]  # (N, R)
            ious = box_iou(pred[:, None].float(), arr["boxes"][bi].float()).masked_fill(~(same & valid[bi]), 0)
            out["box_iou"] = ious.max(1).values.mean().item()
    finally:
        model.train(was_training)
    return out


_ROWS = [("zero_shot_acc", "zero-shot digit accuracy (held-out single digits)"),
         ("t2i_r1", "text->image R@1"), ("t2i_r5", "text->image R@5"),
         ("i2t_r1", "image->text R@1"), ("i2t_r5", "image->text R@5"),
         ("caption_exact_match", "caption exact match"), ("box_iou", "box IoU (mean)")]


def format_table(metrics: dict) -> str:
    rows = [(label, f"{100 * metrics[key]:6.1f} %") for key, label in _ROWS if key in metrics]
    n_ret = metrics.get("retrieval_n")
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"evaluation ({metrics.get('method', '?')}; {metrics.get('zero_shot_n', '?')} single digits, "
             f"{n_ret} scenes for retrieval)", "-" * (width + 11)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    for ex in metrics.get("caption_examples", [])[:3]:
        lines.append(f"  caption: {ex['generated']!r}  (reference {ex['reference']!r})")
    return "\n".join(lines)


def save_json(metrics: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")
