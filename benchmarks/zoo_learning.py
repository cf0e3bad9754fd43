"""Does each ``*-tiny`` model learn digits-scenes? Short in-process pretraining + held-out checks (issue #18).

    python benchmarks/zoo_learning.py --model vilt-tiny --steps 600 [--set key=value ...] [--json out.json]

Trains exactly as ``vlcore pretrain`` does (same tokenizer, data, AdamW + warm-up/cosine, clipping), then reports
on held-out data (scans never seen in training):

- ``zero_shot_acc``: held-out single digits classified among the prompts "a 0" ... "a 9" (cosine similarity for
  dual encoders, ``score`` otherwise), as ``vlcore eval``;
- ``itm_acc`` (models with ``score`` and no dual encoder): binary image-text matching accuracy on held-out scenes
  with distinct captions, each scene once with its own caption (label match) and once with another scene's
  caption (label no match); a pair counts as "match" when its score is above the model's decision threshold
  (log-odds 0, or log p = log 0.5 for models whose ``score`` is a log-probability).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from vlcore.data.digits_scenes import DigitsScenes, retrieval_set, scenes_to_arrays
from vlcore.data.loader import Collator, DigitsSource
from vlcore.train import evaluation
from vlcore.train.loop import TrainConfig, build_model, train_tokenizer
from vlcore.train.optim import build_optimizer, build_scheduler

# models whose ``score`` is log p(match) (threshold log 0.5) rather than match-minus-mismatch log-odds (0)
LOG_PROB_SCORE = ("vinvl",)
# a model has an ITM accuracy when its ``score`` comes from one of these match classifiers
MATCH_HEADS = ("itm_head", "triple_head")


@torch.no_grad()
def itm_accuracy(model, tokenizer, max_text_len: int, n: int = 100, seed: int = 0, batch_size: int = 128) -> float:
    """Balanced held-out ITM accuracy over ``n`` positives and ``n`` negatives (see the module docstring)."""
    was = model.training
    model.eval()
    try:
        arr = scenes_to_arrays(retrieval_set(n=n, seed=seed))
        text, mask = tokenizer.batch(arr["caption"], max_text_len)
        g = torch.Generator().manual_seed(seed)
        other = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n  # another scene's caption
        idx_t = torch.cat([torch.arange(n), other])
        labels = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        img = torch.cat([arr["image"], arr["image"]])
        regions = {"boxes": torch.cat([arr["boxes"]] * 2), "box_valid": torch.cat([arr["box_valid"]] * 2)}
        takes_regions = evaluation._takes_regions(model.score)
        scores = []
        for s in range(0, 2 * n, batch_size):
            sl = slice(s, min(2 * n, s + batch_size))
            extra = {}
            if takes_regions:
                k = sl.stop - sl.start
                extra = {"boxes": regions["boxes"][sl], "box_valid": regions["box_valid"][sl],
                         "tags": torch.zeros(k, 1, dtype=torch.long), "tags_mask": torch.zeros(k, 1, dtype=torch.bool)}
            scores.append(model.score(img[sl], text[idx_t[sl]], mask[idx_t[sl]], **extra).float())
        score = torch.cat(scores)
        threshold = math.log(0.5) if getattr(model, "name", "") in LOG_PROB_SCORE else 0.0
        return ((score > threshold) == labels).float().mean().item()
    finally:
        model.train(was)


def train(model_name: str, steps: int, *, overrides: dict | None = None, lr: float | None = None,
          batch_size: int = 64, warmup: int | None = None, seed: int = 0, log_every: int = 100,
          eval_images: int | None = 200, itm_pairs: int = 100, quiet: bool = False, save: str | None = None) -> dict:
    """Pretrain ``model_name`` for ``steps`` like ``vlcore pretrain`` and return the held-out metrics."""
    cfg = TrainConfig(model=model_name, steps=steps, batch_size=batch_size, seed=seed,
                      lr=cfg_default("lr") if lr is None else lr,
                      warmup=min(cfg_default("warmup"), steps // 10) if warmup is None else warmup)
    tokenizer = train_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    model, mconf = build_model(model_name, {**(overrides or {}), "vocab_size": tokenizer.vocab_size,
                                            "image_size": cfg.image_size, "max_text_len": cfg.max_text_len})
    if hasattr(model, "set_word_starts") and mconf.get("whole_word_masking"):
        model.set_word_starts(tokenizer)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    source = DigitsSource(DigitsScenes("train", seed=cfg.seed, image_size=cfg.image_size,
                                       count_weights=tuple(cfg.scene_mix)), Collator(tokenizer, cfg.max_text_len),
                          cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    history = []
    for step in range(steps):
        out = model(source.next_batch())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        sched.step()
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            rec = {"step": step + 1, **{k: round(v / n, 4) for k, v in sorted(sums.items())}}
            history.append(rec)
            sums = {}
            if not quiet:
                print(json.dumps(rec), f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    if save:
        torch.save({"model": model_name, "config": mconf, "state": model.state_dict(),
                    "tokenizer": tokenizer.to_json()}, save)
    res = evaluation.evaluate(model, tokenizer, torch.device("cpu"), max_text_len=cfg.max_text_len, n_scenes=20,
                              zero_shot_images=eval_images)
    metrics = {"model": model_name, "steps": steps, "train_s": round(train_s, 1), "lr": cfg.lr,
               "overrides": overrides or {}, "zero_shot_acc": res["zero_shot_acc"], "zero_shot_n": res["zero_shot_n"],
               "method": res["method"], "history": history}
    if hasattr(model, "score") and any(hasattr(model, h) for h in MATCH_HEADS):
        metrics["itm_acc"] = itm_accuracy(model, tokenizer, cfg.max_text_len, n=itm_pairs)
    metrics["wall_s"] = round(time.perf_counter() - t0, 1)
    return metrics


def cfg_default(name: str):
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override (JSON value)")
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, help="torch.save the trained model here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    m = train(a.model, a.steps, overrides=overrides, lr=a.lr, warmup=a.warmup, batch_size=a.batch_size, seed=a.seed,
              eval_images=a.eval_images, save=a.save)
    m["command"] = "python benchmarks/zoo_learning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps({k: v for k, v in m.items() if k != "history"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(m, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
