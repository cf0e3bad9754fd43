"""The pretraining loop behind ``vlcore pretrain``: one process, or one per GPU/CPU slot under torchrun.

Every model trains with its own objective: the loop backpropagates ``model(batch)["loss"]`` and logs the other
scalars the model returns. AdamW with warm-up + cosine, gradient clipping, gradient accumulation, bf16 autocast
on GPUs, activation checkpointing (every block of the model's ``nn.ModuleList``s), ``torch.compile``, DDP or FSDP.
A resumed run restores weights, optimizer, scheduler, every rank's RNG and the data position, so it continues
with exactly the losses an uninterrupted run would have had, and the run's own settings (flags given explicitly
override them; ``--resume auto`` finds the run to continue after a restart).

A step whose loss or gradient is not finite is skipped, not applied (see :mod:`vlcore.train.guard`); SIGINT and
SIGTERM end the current step, save a checkpoint and exit 130 / 143.

``vlcore finetune`` is this loop with ``TrainConfig.task`` set: the model is a :class:`TaskModel` (the backbone,
from ``init_from``'s weights and tokenizer or fresh, plus the task's head), batches come from a
:class:`TaskSource`, and the evaluation at the end is the task's (:mod:`vlcore.train.finetune_eval`).
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
from vlcore.data.tasks import TaskData
from vlcore.data.tasks_batch import TaskSource
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.train import checkpoint, distributed, evaluation, faults, resume, run_folder
from vlcore.train.finetune import TaskModel
from vlcore.train.finetune_eval import evaluate_task, format_result
from vlcore.train.guard import BufferSnapshot, NonFiniteSteps, RunStopped, StopRequests
from vlcore.train.optim import build_optimizer, build_scheduler
from vlcore.train.progress import MetricsLog, Progress, plot_metrics
from vlcore.train.threads import configure_intra_op_threads

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
    max_skipped_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    dist: str = "ddp"
    out_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False  # replace the run already in out_dir (else that is an error)
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
    init_vision: str | None = None  # local timm ViT / Swin checkpoint for the vision tower (fresh runs only)
    init_text: str | None = None  # local BERT checkpoint for the text tower (fresh runs only)
    # vlcore finetune: the downstream task (vlcore/train/finetune.py), the run whose weights and tokenizer it
    # starts from (None: --model from scratch) and the held-out examples of its evaluation (0: the task's default)
    task: str | None = None
    init_from: str | None = None
    eval_examples: int = 0
    # Fields set on purpose (the CLI's explicit flags): on --resume the others come from the run. None: those
    # that differ from these defaults.
    explicit: tuple | None = None


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
    return checkpoint.run_dir_of(resume)


def _resolve_auto_resume(cfg: TrainConfig, info) -> TrainConfig:
    """``--resume auto`` (for ``torchrun --max-restarts``): the run to continue, or a fresh start. Rank 0 looks,
    every rank follows, so all ranks agree even when their file systems do not."""
    found = resume.find_latest_run(cfg.out_dir, cfg.model) if info.is_main else None
    found = _broadcast_object(str(found) if found is not None else None, info)
    where = cfg.out_dir or f"runs/{cfg.model}-*"
    if found is None:
        _log(info, f"--resume auto: no checkpoint in {where}; starting a new run")
        # An earlier attempt of this job that died before its first checkpoint is replaced, not refused.
        restart = cfg.out_dir is not None and run_folder.is_unsaved_attempt(cfg.out_dir)
        return dataclasses.replace(cfg, resume=None, overwrite=cfg.overwrite or restart)
    _log(info, f"--resume auto: continuing {found}")
    return dataclasses.replace(cfg, resume=found)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _save(run_dir, step, model, optimizer, scheduler, source, cfg, info, meta, metrics_step,
          skipped_steps=0) -> None:
    model_state = distributed.full_model_state(model, cfg.dist)
    optim_state = distributed.full_optim_state(model, optimizer, cfg.dist)
    rngs = _gather_objects(rng_state(), info)
    sources = _gather_objects(source.state_dict(), info)
    if info.is_main:
        train_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
                       "data": sources, "world_size": info.world_size, "config": dataclasses.asdict(cfg),
                       "metrics_step": metrics_step, "skipped_steps": skipped_steps}
        checkpoint.save_checkpoint(run_dir, step, model_state, train_state, meta, keep=cfg.keep)
    if info.enabled:
        dist.barrier()


def _stop_requested(stops: StopRequests, info) -> bool:
    """Whether any rank got SIGINT/SIGTERM: all ranks must stop after the same step to save one checkpoint."""
    if not info.enabled:
        return stops.requested
    flag = torch.tensor([int(stops.signum or 0)], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not stops.requested and flag.item():
        stops.signum = int(flag.item())  # another rank's signal (torchrun forwards it to every worker)
    return bool(flag.item())


def _interrupted(stops: StopRequests, done: int, total: int, run_dir: Path, info, command: str = "pretrain") -> None:
    """The one line a stopped run prints (rank 0) before it exits with 128 + the signal number."""
    if done < total:
        message = (f"interrupted at step {done} ({stops.name}); checkpoint saved to {run_dir / 'checkpoints'}; "
                   f"resume with: vlcore {command} --resume {run_dir}")
    else:
        message = (f"interrupted at the last step {done} ({stops.name}); checkpoint saved to "
                   f"{run_dir / 'checkpoints'}; evaluation skipped; evaluate with: vlcore eval --checkpoint {run_dir}")
    if info.is_main:
        print(message, file=sys.stderr, flush=True)
    raise RunStopped(stops.exit_code, message)


def pretrain(cfg: TrainConfig) -> dict:
    """Train, checkpoint, evaluate. Returns {"run_dir", "final_loss", "eval" (or None), "losses"}."""
    info = distributed.setup(cfg.device)
    threads = torch.get_num_threads()
    faults.install(info.rank)  # fault-injection tests only ($VLCORE_FAULTS)
    try:
        with StopRequests() as stops:
            return _pretrain(cfg, info, stops)
    finally:
        faults.uninstall()
        torch.set_num_threads(threads)  # callers in the same process (tests, notebooks) keep their setting
        distributed.teardown()


def _pretrain(cfg: TrainConfig, info, stops: StopRequests) -> dict:
    device = info.device
    if cfg.num_workers < 0:
        # On CPU the cores are better spent on the model than on data processes (measured on 2 cores:
        # 2 intra-op threads and batches made in-process train ~25 % faster than 1 thread + 1 worker).
        cfg = dataclasses.replace(cfg, num_workers=0 if device.type == "cpu" else 2)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        configure_intra_op_threads()  # usable cores / local processes (vlcore/train/threads.py)
    if cfg.resume == "auto":
        cfg = _resolve_auto_resume(cfg, info)
    refused = _broadcast_object(run_folder.refusal(cfg.out_dir, cfg.resume, cfg.overwrite) if info.is_main else None,
                                info)  # decided once: every rank must stop, or none
    if refused:
        raise run_folder.RunFolderExists(refused)
    resumed = checkpoint.load_checkpoint(cfg.resume) if cfg.resume else None
    changed: set[str] = set()
    init = None
    command = "finetune" if cfg.task else "pretrain"
    if resumed is not None:
        meta = resumed["metadata"]
        if resumed["train_state"] is None:
            raise FileNotFoundError(f"--resume {cfg.resume}: the checkpoint has no training state (.state.*); it "
                                    "can be evaluated but not resumed")
        cfg, lines, changed = resume.merge_settings(cfg, resumed["train_state"].get("config") or {})
        for line in lines:
            _log(info, f"resume: {line}")
        cfg.model = meta["model"]
        saved_world = resumed["train_state"].get("world_size", 1)
        if saved_world != info.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {saved_world} process(es), this run has "
                             f"{info.world_size}; exact resumption needs the same world size")
        tokenizer = ByteBPETokenizer.from_dict(meta["tokenizer"])
        model_overrides = meta["config"]
    elif cfg.init_from:  # fine-tuning a pretrained run: its model, config and tokenizer
        init = _init_checkpoint(cfg.init_from)
        meta = init["metadata"]
        cfg = dataclasses.replace(cfg, model=meta["model"])
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
        run_folder.prepare(run_dir, cfg.resume, cfg.overwrite)

    own_switch = "checkpoint" in {f.name for f in dataclasses.fields(models.get_config(cfg.model))}
    if own_switch:  # the model's own activation-checkpointing switch, where it has one
        model_overrides = {**model_overrides, "checkpoint": bool(cfg.activation_checkpointing)}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, model_config = build_model(cfg.model, model_overrides)
    if init is not None:
        model.load_state_dict(init["model_state"])
    if cfg.task:
        model = _task_model(cfg.task, model, model_config)
    model_config["vocab_size"] = model_config.get("vocab_size", tokenizer.vocab_size)
    if model_config["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config['vocab_size']} < tokenizer vocab {tokenizer.vocab_size}")
    image_size, max_text_len = model_config.get("image_size", cfg.image_size), model_config.get(
        "max_text_len", cfg.max_text_len)
    if cfg.init_vision and resumed is None:  # a resumed run already holds (and has trained) those weights
        from vlcore.integrations.init import init_vision

        summary = init_vision(model, cfg.init_vision)
        if info.is_main and not cfg.quiet:
            print(summary, flush=True)
    if cfg.init_text and resumed is None:
        from vlcore.integrations.init import init_text

        summary = init_text(model, cfg.init_text)
        if info.is_main and not cfg.quiet:
            print(summary, flush=True)
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
    if cfg.task:
        source = TaskSource(TaskData(cfg.task, "train", seed=cfg.seed, image_size=image_size), tokenizer,
                            max_text_len, cfg.batch_size, info.rank, info.world_size)
    elif cfg.data == DIGITS:
        source = DigitsSource(DigitsScenes("train", seed=cfg.seed, image_size=image_size,
                                           count_weights=tuple(cfg.scene_mix)), collator,
                              cfg.batch_size, info.rank, info.world_size, num_workers=cfg.num_workers)
    else:
        stream = ShardStream(cfg.data, image_size=image_size, seed=cfg.seed, rank=info.rank,
                             world_size=info.world_size, shuffle_buffer=cfg.shuffle_buffer,
                             max_bad_fraction=cfg.max_bad_fraction)
        source = ShardSource(stream, collator, cfg.batch_size, cfg.num_workers)

    start_step = 0
    nonfinite = NonFiniteSteps(cfg.max_skipped_steps)
    if resumed is not None:
        ts = resumed["train_state"]
        configured = resume.schedule_settings(optimizer)
        if cfg.dist == "fsdp" and info.enabled:
            distributed.load_full_state(train_model, optimizer, resumed["model_state"], ts["optimizer"], "fsdp")
        else:
            optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if changed & resume.SCHEDULE_FIELDS:
            resume.restore_schedule_settings(optimizer, scheduler, configured)
        source.load_state_dict(ts["data"][info.rank])
        set_rng_state(ts["rng"][info.rank])
        start_step = int(ts["step"])
        nonfinite.skipped = int(ts.get("skipped_steps", 0))
    if start_step >= cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {start_step}, nothing left for --steps {cfg.steps}")

    meta = {"model": cfg.model, "config": model_config, "tokenizer": tokenizer.to_dict(),
            "data": {"name": cfg.data if cfg.data == DIGITS else "shards", "image_size": image_size,
                     "max_text_len": max_text_len}, "vlcore_format": "1"}
    if cfg.task:
        meta["task"] = cfg.task
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": model_config},
                                                        indent=2, default=str) + "\n")
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    what = f"{cfg.task} with {cfg.model}" if cfg.task else cfg.model
    _log(info, f"vlcore {command}: {what} ({n_params / 1e6:.2f}M parameters) on {cfg.data}, device {device}"
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
    last_saved = start_step if resumed is not None else None
    for step in range(start_step, cfg.steps):
        buffers = BufferSnapshot(model)  # a skipped step must not leave what its forward wrote into buffers
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
        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names])
        if info.enabled:  # before the update: every rank must take the same skip decision
            dist.all_reduce(vec)
            vec /= info.world_size
        values = dict(zip(names, vec.tolist()))
        loss = values["loss"]
        done = step + 1
        # Gradients are averaged (DDP) or their norm is global (FSDP): one NaN anywhere shows on every rank.
        if nonfinite.check(done, loss, float(grad_norm)):
            optimizer.step()
            scheduler.step()
        else:
            buffers.restore()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        now = time.perf_counter()
        step_thr = global_batch / max(now - t_last, 1e-9)
        thr = step_thr if step == start_step else 0.9 * thr + 0.1 * step_thr
        t_last = now
        progress.update(done, loss, thr)
        skipped_now = nonfinite.consecutive > 0
        if metrics is not None and (done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1
                                    or skipped_now):
            rec = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "samples_per_s": thr, "elapsed_s": now - t_start}
            rec.update({f"loss/{k}": v for k, v in values.items() if k != "loss"})
            rec.update(skipped_samples=source.skipped, skipped_by_reason=source.skip_reasons())
            if nonfinite.skipped:
                rec["skipped_steps"] = nonfinite.skipped
            metrics.write(rec)
        if nonfinite.exhausted:  # before any save: the newest checkpoint stays the last good state
            where = f"{run_dir / 'checkpoints'} (step {last_saved})" if last_saved is not None else None
            message = nonfinite.stop_message(done, where)
            if info.is_main:
                print(message, file=sys.stderr, flush=True)
            raise RunStopped(1, message)
        faults.after_step(done)
        stop = _stop_requested(stops, info)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or stop:
            _save(run_dir, done, train_model, optimizer, scheduler, source, cfg, info, meta, done, nonfinite.skipped)
            last_saved = done
        if stop:
            _interrupted(stops, done, cfg.steps, run_dir, info, command)
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
                if cfg.task:
                    eval_model = _task_model(cfg.task, eval_model, model_config)
                eval_model.load_state_dict(full_state)
                eval_model.to(device)
        if info.is_main:
            if cfg.task:
                metrics_eval = evaluate_task(eval_model, tokenizer, device, max_text_len=max_text_len,
                                             image_size=image_size, autocast=autocast, n=cfg.eval_examples or None)
                table = format_result(metrics_eval)
            else:
                metrics_eval = evaluation.evaluate(eval_model, tokenizer, device, max_text_len=max_text_len,
                                                   image_size=image_size, autocast=autocast)
                table = evaluation.format_table(metrics_eval)
            metrics_eval["train_seconds"] = train_s
            evaluation.save_json(metrics_eval, run_dir / "eval.json")
            _log(info, table)
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
    if meta.get("task"):
        model = _task_model(meta["task"], model, meta["config"])
    model.load_state_dict(ckpt["model_state"])
    model.to(device).eval()
    return model, ByteBPETokenizer.from_dict(meta["tokenizer"]), meta


def _task_model(task: str, backbone: torch.nn.Module, model_config: dict) -> TaskModel:
    return TaskModel(task, backbone, max_text_len=int(model_config.get("max_text_len", 32)))


def _init_checkpoint(path: str) -> dict:
    """The weights, config and tokenizer a fine-tuning run starts from; a fine-tuned run's backbone counts too
    (its task head is dropped)."""
    ckpt = checkpoint.load_checkpoint(path, with_state=False)
    meta = ckpt["metadata"]
    if "model" not in meta or "config" not in meta or "tokenizer" not in meta:
        raise ValueError(f"--checkpoint: {ckpt['weights_path']} is not a vlcore checkpoint (its metadata lacks "
                         f"model/config/tokenizer: {sorted(meta)})")
    if meta.get("task"):
        ckpt["model_state"] = {k[len("backbone."):]: v for k, v in ckpt["model_state"].items()
                               if k.startswith("backbone.")}
    return ckpt
