"""The pretraining loop behind ``vlcore pretrain``: one process, or one per GPU/CPU slot under torchrun.

Every model trains with its own objective: the loop backpropagates ``model(batch)["loss"]`` and logs the other
scalars the model returns. AdamW with warm-up + cosine, gradient clipping, gradient accumulation, bf16 autocast
on GPUs, activation checkpointing (every block of the model's ``nn.ModuleList``s), ``torch.compile``, DDP or FSDP.
A resumed run restores weights, optimizer, scheduler, every rank's RNG and the data position, so it continues
with exactly the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlcore import models
from vlcore.data.digits_scenes import ANSWERS, QUESTIONS, DigitsScenes, in_words
from vlcore.data.loader import Collator, DigitsSource, ShardSource
from vlcore.data.shards import ShardStream, read_captions
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.train import checkpoint, distributed, evaluation
from vlcore.train.optim import build_optimizer, build_scheduler
from vlcore.train.progress import MetricsLog, Progress, plot_metrics

DIGITS = "digits-scenes"


@dataclass
class TrainConfig:
    model: str = "coca-tiny"
    data: str = DIGITS
    steps: int = 3800
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    dist: str = "ddp"
    out_dir: str | None = None
    resume: str | None = None
    save_every: int = 500
    keep: int = 2
    log_every: int = 10
    eval: str = "auto"
    tokenizer: str | None = None
    vocab_size: int = 512
    max_text_len: int = 16
    image_size: int = 64
    num_workers: int = -1  # -1: auto (0 on CPU, where the cores train; 2 per GPU process)
    threads: int = 0
    scene_mix: tuple = (0.5, 0.25, 0.25)
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.1  # shards/manifests: stop when more of the samples are unusable
    overrides: dict = field(default_factory=dict)
    quiet: bool = False


def _log(info, *args):
    if info.is_main:
        print(*args, flush=True)


def autocast_for(device: torch.device, precision: str):
    """A context-manager factory: bf16 autocast on CUDA ('auto' picks it when the GPU supports bf16)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16), "bf16"
    raise ValueError(f"--precision must be auto, bf16 or fp32; got {precision!r}")


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every block of the model's ModuleLists in the backward; returns how many blocks."""
    from torch.utils.checkpoint import checkpoint as ckpt

    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        for block in module:
            if any(p.requires_grad for p in block.parameters()):
                orig = block.forward
                # Instance attribute: parameter names (and so checkpoints) are unchanged.
                block.forward = functools.partial(lambda f, *a, **k: ckpt(f, *a, use_reentrant=False, **k), orig)
                n += 1
    if n == 0:
        raise ValueError(f"--activation-checkpointing: {type(model).__name__} has no nn.ModuleList of blocks to "
                         "checkpoint")
    return n


def _config_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))


def build_model(name: str, overrides: dict) -> tuple[torch.nn.Module, dict]:
    """The model and the full config it was built with (recorded in checkpoints)."""
    base = models.get_config(name)
    fields = {f.name: f for f in dataclasses.fields(base)}
    fixed = {}
    for k, v in overrides.items():  # nested dataclass fields come back from JSON as dicts
        cur = getattr(base, k, None)
        fixed[k] = type(cur)(**v) if dataclasses.is_dataclass(cur) and isinstance(v, dict) else v
    unknown = sorted(set(fixed) - set(fields))
    if unknown:
        raise TypeError(f"model {name!r}: unknown config fields {unknown}; fields: {sorted(fields)}")
    config = dataclasses.replace(base, **fixed)
    return models.create(name, **fixed), _config_dict(config)


@functools.lru_cache(maxsize=4)
def _digits_tokenizer(seed: int, image_size: int, vocab_size: int) -> str:
    ds = DigitsScenes("train", seed=seed, image_size=image_size)
    scenes = ds.scenes(range(2000))
    texts = [s.caption for s in scenes] + [in_words(s.caption) for s in scenes] + list(QUESTIONS) + list(ANSWERS)
    return ByteBPETokenizer.train(texts, vocab_size=vocab_size).to_json()


def train_tokenizer(cfg: TrainConfig) -> ByteBPETokenizer:
    """A BPE trained on this run's captions (plus phrases, questions and answers for digits-scenes)."""
    if cfg.data == DIGITS:
        return ByteBPETokenizer.from_json(_digits_tokenizer(cfg.seed, cfg.image_size, cfg.vocab_size))
    else:
        texts = read_captions(cfg.data)
        if not texts:
            raise ValueError(f"no captions found in {cfg.data!r} to train a tokenizer on")
    return ByteBPETokenizer.train(texts, vocab_size=cfg.vocab_size)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj, info) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj, info):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_dir_of(resume: str) -> Path:
    weights, _ = checkpoint.resolve(resume)
    return weights.parent.parent


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _save(run_dir, step, model, optimizer, scheduler, source, cfg, info, meta, metrics_step) -> None:
    model_state = distributed.full_model_state(model, cfg.dist)
    optim_state = distributed.full_optim_state(model, optimizer, cfg.dist)
    rngs = _gather_objects(rng_state(), info)
    sources = _gather_objects(source.state_dict(), info)
    if info.is_main:
        train_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
                       "data": sources, "world_size": info.world_size, "config": dataclasses.asdict(cfg),
                       "metrics_step": metrics_step}
        checkpoint.save_checkpoint(run_dir, step, model_state, train_state, meta, keep=cfg.keep)
    if info.enabled:
        dist.barrier()


def pretrain(cfg: TrainConfig) -> dict:
    """Train, checkpoint, evaluate. Returns {"run_dir", "final_loss", "eval" (or None), "losses"}."""
    info = distributed.setup(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _pretrain(cfg, info)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests, notebooks) keep their setting
        distributed.teardown()


def _pretrain(cfg: TrainConfig, info) -> dict:
    device = info.device
    if cfg.num_workers < 0:
        # On CPU the cores are better spent on the model than on data processes (measured on 2 cores:
        # 2 intra-op threads and batches made in-process train ~25 % faster than 1 thread + 1 worker).
        cfg = dataclasses.replace(cfg, num_workers=0 if device.type == "cpu" else 2)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        # The cores shared by this machine's processes (torchrun: LOCAL_WORLD_SIZE of them), less the data
        # workers; oversubscribed threads spin-wait and cost far more than they gain.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local - cfg.num_workers))
    resumed = checkpoint.load_checkpoint(cfg.resume) if cfg.resume else None
    if resumed is not None:
        meta = resumed["metadata"]
        if cfg.model != meta["model"]:
            _log(info, f"note: resuming a {meta['model']} checkpoint (--model {cfg.model} ignored)")
        cfg.model = meta["model"]
        if resumed["train_state"] is None:
            raise FileNotFoundError(f"--resume {cfg.resume}: the checkpoint has no training state (.state.pt); it "
                                    "can be evaluated but not resumed")
        saved_world = resumed["train_state"].get("world_size", 1)
        if saved_world != info.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {saved_world} process(es), this run has "
                             f"{info.world_size}; exact resumption needs the same world size")
        tokenizer = ByteBPETokenizer.from_dict(meta["tokenizer"])
        model_overrides = meta["config"]
    else:
        models.get_config(cfg.model)  # an unknown name fails before any work
        tokenizer = ByteBPETokenizer.load(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(cfg)
        model_overrides = {**cfg.overrides, "vocab_size": tokenizer.vocab_size, "image_size": cfg.image_size,
                           "max_text_len": cfg.max_text_len}

    if cfg.resume and not cfg.out_dir:
        run_dir = _run_dir_of(cfg.resume)
    else:
        stamp = _broadcast_object(time.strftime("%Y%m%d-%H%M%S"), info)
        run_dir = Path(cfg.out_dir or os.path.join("runs", f"{cfg.model}-{stamp}"))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    own_switch = "checkpoint" in {f.name for f in dataclasses.fields(models.get_config(cfg.model))}
    if own_switch:  # the model's own activation-checkpointing switch, where it has one
        model_overrides = {**model_overrides, "checkpoint": bool(cfg.activation_checkpointing)}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, model_config = build_model(cfg.model, model_overrides)
    model_config["vocab_size"] = model_config.get("vocab_size", tokenizer.vocab_size)
    if model_config["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config['vocab_size']} < tokenizer vocab {tokenizer.vocab_size}")
    image_size, max_text_len = model_config.get("image_size", cfg.image_size), model_config.get(
        "max_text_len", cfg.max_text_len)
    model.to(device)
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
    if cfg.activation_checkpointing and not model_config.get("checkpoint", False):
        enable_activation_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    train_model = distributed.wrap(model, info, cfg.dist)
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    autocast, precision = autocast_for(device, cfg.precision)

    collator = Collator(tokenizer, max_text_len=max_text_len)
    if cfg.data == DIGITS:
        source = DigitsSource(DigitsScenes("train", seed=cfg.seed, image_size=image_size,
                                           count_weights=tuple(cfg.scene_mix)), collator,
                              cfg.batch_size, info.rank, info.world_size, num_workers=cfg.num_workers)
    else:
        stream = ShardStream(cfg.data, image_size=image_size, seed=cfg.seed, rank=info.rank,
                             world_size=info.world_size, shuffle_buffer=cfg.shuffle_buffer,
                             max_bad_fraction=cfg.max_bad_fraction)
        source = ShardSource(stream, collator, cfg.batch_size, cfg.num_workers)

    start_step = 0
    if resumed is not None:
        ts = resumed["train_state"]
        if cfg.dist == "fsdp" and info.enabled:
            distributed.load_full_state(train_model, optimizer, resumed["model_state"], ts["optimizer"], "fsdp")
        else:
            optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        source.load_state_dict(ts["data"][info.rank])
        set_rng_state(ts["rng"][info.rank])
        start_step = int(ts["step"])
    if start_step >= cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {start_step}, nothing left for --steps {cfg.steps}")

    meta = {"model": cfg.model, "config": model_config, "tokenizer": tokenizer.to_dict(),
            "data": {"name": cfg.data if cfg.data == DIGITS else "shards", "image_size": image_size,
                     "max_text_len": max_text_len}, "vlcore_format": "1"}
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": model_config},
                                                        indent=2, default=str) + "\n")
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    _log(info, f"vlcore pretrain: {cfg.model} ({n_params / 1e6:.2f}M parameters) on {cfg.data}, device {device}"
               f"{f' x {info.world_size} processes ({cfg.dist})' if info.enabled else ''}, {precision}")
    _log(info, f"  steps {start_step}->{cfg.steps}, global batch {global_batch} ({cfg.batch_size} x "
               f"{cfg.grad_accum} accumulation x {info.world_size} processes), lr {cfg.lr:g}, warm-up "
               f"{cfg.warmup}, tokenizer vocab {tokenizer.vocab_size}, run folder {run_dir}")

    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resumed else None) \
        if info.is_main else None
    progress = Progress(cfg.steps, start_step, enabled=info.is_main and not cfg.quiet)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    train_model.train()
    t_start = time.perf_counter()
    t_last, thr = t_start, 0.0
    ddp = info.enabled and cfg.dist == "ddp"
    for step in range(start_step, cfg.steps):
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(source.next_batch(), device)
            sync = contextlib.nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else train_model.no_sync()
            with sync:
                with autocast():
                    out = train_model(batch)
                if "loss" not in out:
                    raise KeyError(f"{cfg.model}: forward(batch) returned {sorted(out)} without 'loss'")
                (out["loss"] / cfg.grad_accum).backward()
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    sums[k] = sums.get(k, 0) + v.detach().float() / cfg.grad_accum
        distributed.sync_replicated_grads(train_model)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names])
        if info.enabled:
            dist.all_reduce(vec)
            vec /= info.world_size
        values = dict(zip(names, vec.tolist()))
        loss = values["loss"]
        losses.append(loss)
        now = time.perf_counter()
        step_thr = global_batch / max(now - t_last, 1e-9)
        thr = step_thr if step == start_step else 0.9 * thr + 0.1 * step_thr
        t_last = now
        done = step + 1
        progress.update(done, loss, thr)
        if metrics is not None and (done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1):
            rec = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "samples_per_s": thr, "elapsed_s": now - t_start}
            rec.update({f"loss/{k}": v for k, v in values.items() if k != "loss"})
            rec.update(skipped_samples=source.skipped, skipped_by_reason=source.skip_reasons())
            metrics.write(rec)
        if not np.isfinite(loss):
            raise FloatingPointError(f"step {done}: the loss is {loss}; lower --lr or use --precision fp32")
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _save(run_dir, done, train_model, optimizer, scheduler, source, cfg, info, meta, done)
    progress.close()
    train_s = time.perf_counter() - t_start
    _log(info, f"trained {cfg.steps - start_step} steps in {train_s:.0f} s; final loss {losses[-1]:.4f}"
               + (f"; {source.skip_summary()}" if source.skip_summary() else ""))
    if info.enabled and cfg.dist == "ddp":
        if not distributed.ranks_agree(model):
            raise RuntimeError("after training the ranks hold different weights: a model op is not deterministic "
                               "across processes or skips DDP's gradient averaging")
        _log(info, f"weights identical on all {info.world_size} ranks")
    if info.is_main:
        _log(info, plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png"))

    result = {"run_dir": str(run_dir), "final_loss": losses[-1], "losses": losses, "eval": None,
              "train_seconds": train_s, "model": model}
    do_eval = cfg.eval == "on" or (cfg.eval == "auto" and cfg.data == DIGITS)
    if do_eval:
        eval_model = model
        if cfg.dist == "fsdp" and info.enabled:  # evaluate an unsharded copy on rank 0 (gathering is collective)
            full_state = distributed.full_model_state(train_model, "fsdp")
            if info.is_main:
                eval_model, _ = build_model(cfg.model, model_config)
                eval_model.load_state_dict(full_state)
                eval_model.to(device)
        if info.is_main:
            metrics_eval = evaluation.evaluate(eval_model, tokenizer, device, max_text_len=max_text_len,
                                               image_size=image_size, autocast=autocast)
            metrics_eval["train_seconds"] = train_s
            evaluation.save_json(metrics_eval, run_dir / "eval.json")
            _log(info, evaluation.format_table(metrics_eval))
            _log(info, f"saved {run_dir / 'eval.json'}")
            result["eval"] = metrics_eval
        if info.enabled:
            dist.barrier()
    elif cfg.eval == "auto":
        _log(info, "evaluation skipped: the held-out digit metrics need --data digits-scenes (--eval on forces it)")
    _log(info, f"checkpoint: {run_dir / 'checkpoints'}  metrics: {run_dir / 'metrics.jsonl'}")
    sys.stdout.flush()
    return result


def model_from_checkpoint(path: str, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, tokenizer, metadata) from a run folder or weights file."""
    ckpt = checkpoint.load_checkpoint(path, with_state=False)
    meta = ckpt["metadata"]
    if "model" not in meta or "config" not in meta or "tokenizer" not in meta:
        raise ValueError(f"{ckpt['weights_path']} is not a vlcore checkpoint (its metadata lacks model/config/"
                         f"tokenizer: {sorted(meta)})")
    model, _ = build_model(meta["model"], meta["config"])
    model.load_state_dict(ckpt["model_state"])
    model.to(device).eval()
    return model, ByteBPETokenizer.from_dict(meta["tokenizer"]), meta
