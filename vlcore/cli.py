"""The ``vlcore`` command line: pretrain, finetune, eval, caption, bench, info.

    vlcore pretrain                      # coca-tiny on the embedded digits-scenes dataset, then evaluation
    torchrun --nproc_per_node 8 -m vlcore.cli pretrain --model coca-tiny --data 'shards/{00000..00099}.tar'
    vlcore eval --checkpoint runs/coca-tiny-20260101-120000
    vlcore finetune --task vqa --checkpoint runs/vilt-tiny-20260101-120000
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

from vlcore import cli_args
from vlcore.cli_args import Parser, UsageError, device, float_in, int_at_least

_DESCRIPTION = "vlcore: fused kernels and compact models for vision-language pretraining."


def _plugins(names: list[str] | None) -> None:
    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"--plugin: expected an importable module, found {name!r} ({e})") from None


def _json_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--set: expected KEY=VALUE, found {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = _json_value(v)
    return out


def _scene_mix(text: str) -> tuple:
    try:
        mix = tuple(float(x) for x in text.split(","))
    except ValueError:
        mix = ()
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise UsageError(f"--scene-mix: expected three non-negative weights like 0.4,0.3,0.3, found {text!r}")
    return mix


def _model_names() -> str:
    try:
        from vlcore import models

        names = models.list_models()
    except Exception as e:  # noqa: BLE001 - the help text must render even if a model file is broken
        return f"(the model registry failed to load: {e})"
    return ", ".join(names) if names else "(none registered yet)"


# ---------------------------------------------------------------------------------------------- pretrain
class _Default:
    """A pretrain option's default as argparse stores it when the flag is absent: ``--resume`` takes such options
    from the run, not from these defaults, so "not given" must differ from "given with the default's value"."""

    def __init__(self, value):
        self.value = value

    def __str__(self) -> str:  # what --help prints as the default
        return str(self.value)


def _mark_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        # append actions extend their default list in place; theirs is None, which already means "not given"
        if action.default is not argparse.SUPPRESS and not isinstance(action, argparse._AppendAction):
            action.default = _Default(action.default)


def _explicit_options(args) -> tuple:
    """Names of the options given on the command line; the others are replaced by their real defaults."""
    given = []
    for name, value in vars(args).items():
        if isinstance(value, _Default):
            setattr(args, name, value.value)
        elif value is not None:
            given.append(name)
    return tuple(given)


def _add_pretrain(sub) -> None:
    from vlcore.train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "pretrain", help="pretrain a model (default: coca-tiny on the embedded digits-scenes dataset)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pretrain a vision-language model with its own objective, save checkpoints, metrics "
                    "(JSONL + PNG) and, on digits-scenes, evaluate on held-out data at the end. With no arguments "
                    "it trains coca-tiny on digits-scenes on whatever device exists (CUDA if available). "
                    "Multi-GPU / multi-node: launch with torchrun (torchrun --nproc_per_node N -m vlcore.cli "
                    "pretrain ...); DDP by default, --dist fsdp to shard.",
        epilog=f"models: {_model_names()}")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="registered model name (see the list below)")
    _train_options(p, g, d, pretrain=True)
    p.set_defaults(func=_cmd_pretrain)


def _train_options(p, g, d, pretrain: bool) -> None:
    """The options pretrain and finetune share (finetune: not the pretraining data's), in groups."""
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a model config field (value parsed as JSON), repeatable, e.g. --set width=128"
                        + ("" if pretrain else " (--model only: a --checkpoint keeps its run's config)"))
    if pretrain:
        _pretrain_data_options(g, d)
    else:
        g.add_argument("--image-size", type=int_at_least(1), default=d.image_size, help="input resolution (--model)")
        g.add_argument("--max-text-len", type=int_at_least(2), default=d.max_text_len,
                       help="text length incl. BOS/EOS (--model)")
        g.add_argument("--vocab-size", type=int_at_least(263), default=d.vocab_size,
                       help="vocabulary size of the BPE trained for --model")
        g.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE first (custom models)")
    _optimisation_options(p, d)
    _hardware_output_options(p, d)
    _mark_defaults(p)


def _pretrain_data_options(g, d) -> None:
    g.add_argument("--data", default=d.data,
                   help="'digits-scenes' (embedded, generated from scikit-learn's digits) or tar shards / JSONL "
                        "manifests: 'dir/', 'shards/{00000..00009}.tar', globs, comma-separated lists")
    g.add_argument("--scene-mix", default=",".join(f"{w:g}" for w in d.scene_mix), metavar="P1,P2,P3",
                   help="digits-scenes: how often a training image holds one, two, three digits")
    g.add_argument("--image-size", type=int_at_least(1), default=d.image_size, help="input resolution (square)")
    g.add_argument("--max-text-len", type=int_at_least(2), default=d.max_text_len, help="caption length incl. BOS/EOS")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer JSON file to use (default: train a byte-level BPE on the run's captions)")
    g.add_argument("--vocab-size", type=int_at_least(263), default=d.vocab_size, help="vocabulary size when training the BPE")
    g.add_argument("--num-workers", type=int_at_least(-1), default=d.num_workers,
                   help="data loader processes that make the batches (0: in the training process; "
                        "-1: auto, 0 on CPU and 2 per GPU process)")
    g.add_argument("--shuffle-buffer", type=int_at_least(0), default=d.shuffle_buffer,
                   help="sample shuffle window (shards)")
    g.add_argument("--max-bad-fraction", type=float_in(0, 1), default=d.max_bad_fraction,
                   help="shards/manifests: stop when more than this fraction of the samples is unusable (each "
                        "skip is counted by reason in the metrics and the summary)")
    g.add_argument("--init-vision", default=None, metavar="PATH",
                   help="initialise the vision tower from a local timm ViT / Swin checkpoint (file or folder)")
    g.add_argument("--init-text", default=None, metavar="PATH",
                   help="initialise the text tower from a local BERT checkpoint (file or folder; align / mural "
                        "with --set text_post_norm=true)")
    g.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import MODULE first (e.g. one that registers your models with vlcore.models.register)")


def _optimisation_options(p, d) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int_at_least(1), default=d.steps, help="optimizer steps")
    o.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="micro-batch per process")
    o.add_argument("--grad-accum", type=int_at_least(1), default=d.grad_accum, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float_in(0, low_open=True), default=d.lr, help="peak learning rate (AdamW)")
    o.add_argument("--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio, help="final lr / peak lr (cosine)")
    o.add_argument("--warmup", type=int_at_least(0), default=d.warmup, help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay, help="AdamW decay of weight matrices")
    o.add_argument("--clip-grad", type=float_in(0), default=d.clip_grad, help="max gradient norm (0: no clipping)")
    o.add_argument("--max-skipped-steps", type=int_at_least(1), default=d.max_skipped_steps,
                   help="a step with a non-finite loss or gradient is skipped (not applied, counted in the metrics); "
                        "this many in a row stop the run")
    o.add_argument("--seed", type=int_at_least(0), default=d.seed, help="seed of weights, data and dropout")


def _hardware_output_options(p, d) -> None:
    r = p.add_argument_group("hardware")
    r.add_argument("--device", type=device, default=d.device, help="auto (CUDA when available), cpu, cuda, cuda:1")
    r.add_argument("--threads", type=int_at_least(0), default=d.threads,
                   help="torch intra-op threads per process (0: on CPU the machine's cores / local processes, "
                        "less the data workers; torch's default on GPU)")
    r.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on GPUs that support it, fp32 otherwise")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward (less memory, ~30%% more compute)")
    r.add_argument("--dist", default=d.dist, choices=["ddp", "fsdp"],
                   help="data-parallel strategy under torchrun (fsdp: FSDP2 fully_shard per block)")
    c = p.add_argument_group("output and checkpoints")
    c.add_argument("--out-dir", default=None, help="run folder (default runs/<model>-<date>-<time>)")
    c.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run exactly: its folder, its checkpoints/latest.json or a weights file (auto: the "
                        "--out-dir folder, or the newest runs/<model>-*, if it has a checkpoint, else start anew; for "
                        "torchrun --max-restarts); the run's "
                        "settings are kept, flags given explicitly override them (each change is printed)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (its metrics, config and checkpoints); without it "
                        "an existing run folder is an error")
    c.add_argument("--save-every", type=int_at_least(0), default=d.save_every, help="checkpoint every N steps (and at the end)")
    c.add_argument("--keep", type=int_at_least(1), default=d.keep, help="checkpoints to keep")
    c.add_argument("--log-every", type=int_at_least(1), default=d.log_every, help="metrics JSONL record every N steps")
    c.add_argument("--eval", default=d.eval, choices=["auto", "on", "off"],
                   help="held-out evaluation at the end (auto: on for digits-scenes)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_pretrain_inputs(args) -> None:
    """The names and paths a run needs, checked before any work (tokenizer training, model building)."""
    from vlcore import models
    from vlcore.data.shards import expand_urls
    from vlcore.data.skips import DataError
    from vlcore.train.loop import DIGITS

    if args.resume is None and args.model not in models.list_models():
        raise UsageError(f"--model: expected a registered model ({', '.join(models.list_models())}), found "
                         f"{args.model!r} (a model of your own: --plugin MODULE that registers it)")
    if args.resume is None and args.overrides:
        fields = sorted(f.name for f in dataclasses.fields(models.get_config(args.model)))
        unknown = sorted(set(_overrides(args.overrides)) - set(fields))
        if unknown:
            raise UsageError(f"--set: expected fields of {args.model}'s config ({', '.join(fields)}), found "
                             f"{', '.join(unknown)}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise UsageError(f"--tokenizer: expected a tokenizer JSON file, found {args.tokenizer!r}, "
                         f"{'a folder' if Path(args.tokenizer).is_dir() else 'which does not exist'}")
    if args.data != DIGITS:
        try:
            expand_urls(args.data)
        except DataError as e:
            raise UsageError(f"--data: expected {DIGITS!r} or existing tar shards / JSONL manifests; {e}") from None


def _train_config(args, explicit: tuple, **extra):
    """The TrainConfig of a pretrain / finetune command line: every option named like a TrainConfig field."""
    from vlcore.train.loop import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if "scene_mix" in values:
        values["scene_mix"] = _scene_mix(values["scene_mix"])
    values["overrides"] = _overrides(args.overrides)
    return TrainConfig(**{**values, **extra}, explicit=explicit)


def _cmd_pretrain(args) -> int:
    from vlcore.train.loop import TrainConfig, pretrain

    explicit = tuple(n for n in _explicit_options(args) if n in {f.name for f in dataclasses.fields(TrainConfig)})
    _plugins(args.plugin)
    _check_pretrain_inputs(args)
    cfg = _train_config(args, explicit)
    return _run_training(pretrain, cfg, "pretrain")


def _run_training(pretrain, cfg, command: str) -> int:
    from vlcore.train.checkpoint import CheckpointWriteError

    try:
        pretrain(cfg)  # an existing run folder (FileExistsError) is a user error: main's one line, exit 2
    except CheckpointWriteError as e:  # disk full etc.: the previous checkpoint is intact
        print(f"vlcore {command}: {e}; earlier checkpoints are intact", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- finetune
FINETUNE_DEFAULTS = {"steps": 500, "lr": 3e-4, "warmup": 50, "save_every": 500}


def _add_finetune(sub) -> None:
    from vlcore.data.tasks import TASKS
    from vlcore.train.loop import TrainConfig

    d = TrainConfig(**FINETUNE_DEFAULTS)
    p = sub.add_parser(
        "finetune", help="fine-tune a pretrained run (or a model from scratch) on a downstream task",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune on a digits-scenes downstream task with the pretraining loop (progress, "
                    "checkpoints, --resume, torchrun), then evaluate on held-out examples with the task's metric "
                    "(printed and written to eval.json): vqa (VQA score), grounding (Acc@0.5 IoU), nlvr2 / ve / "
                    "vcr (accuracy), captioning (BLEU-4, CIDEr), retrieval (R@1/5/10). Recipes: "
                    "vlcore/train/finetune.py.",
        epilog=f"models: {_model_names()}")
    g = p.add_argument_group("task and model")
    g.add_argument("--task", required=True, choices=TASKS, help="the downstream task")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--checkpoint", dest="init_from", default=None, metavar="RUN",
                       help="start from this run (folder, its checkpoints/latest.json or a weights file): its "
                            "model, config, weights and tokenizer")
    start.add_argument("--model", default=None, help="start from random weights of this registered model")
    g.add_argument("--eval-examples", type=int_at_least(0), default=0,
                   help="held-out examples to evaluate (0: the task's default)")
    _train_options(p, g, d, pretrain=False)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from vlcore import models
    from vlcore.train.loop import TrainConfig, pretrain

    explicit = tuple(n for n in _explicit_options(args) if n in {f.name for f in dataclasses.fields(TrainConfig)})
    _plugins(args.plugin)
    if args.resume is None and args.init_from is None and args.model is None:
        raise UsageError("--checkpoint or --model: expected the run to fine-tune (--checkpoint RUN) or a model to "
                         "train from scratch (--model NAME), found neither")
    if args.init_from is not None and not Path(args.init_from).exists():
        raise UsageError(f"--checkpoint: expected a run folder, its checkpoints/latest.json or a weights file, "
                         f"found {args.init_from!r}, which does not exist")
    if args.init_from is not None and args.overrides:
        raise UsageError("--set: a --checkpoint run keeps its model config; --set goes with --model")
    if args.model is not None and args.model not in models.list_models():
        raise UsageError(f"--model: expected a registered model ({', '.join(models.list_models())}), found "
                         f"{args.model!r}")
    model = args.model or TrainConfig.model
    return _run_training(pretrain, _train_config(args, explicit, model=model), "finetune")


# ---------------------------------------------------------------------------------------------- eval / caption
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out digits-scenes data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Zero-shot digit classification on held-out single digits (prompts 'a 0'..'a 9'), "
                                   "image-text retrieval R@1/R@5 on held-out scenes, caption exact match for "
                                   "captioners and box IoU for models with a box head. Prints a table and writes "
                                   "JSON.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run folder, its checkpoints/latest.json, or a weights file")
    p.add_argument("--scenes", type=int_at_least(1), default=100, help="held-out scenes for retrieval")
    p.add_argument("--zero-shot-images", type=int_at_least(1), default=None,
                   help="held-out single-digit images to classify (default: all 359 held-out scans)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the held-out images' placement")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="evaluation batch")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="as for pretrain")
    p.add_argument("--out", default=None, help="JSON path (default: eval-<date>-<time>.json in the run folder; the eval.json "
                        "that pretrain wrote stays as it is)")
    p.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE first (custom models)")
    p.set_defaults(func=_cmd_eval)


def _load(args):
    from vlcore.train import distributed
    from vlcore.train.loop import model_from_checkpoint

    _plugins(args.plugin)
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint: expected a run folder, its checkpoints/latest.json or a weights file, "
                         f"found {args.checkpoint!r}, which does not exist")
    device = distributed.pick_device(args.device)
    model, tokenizer, meta = model_from_checkpoint(args.checkpoint, device)
    return model, tokenizer, meta, device


def _cmd_eval(args) -> int:
    from vlcore.train import checkpoint, evaluation
    from vlcore.train.loop import autocast_for

    model, tokenizer, meta, device = _load(args)
    autocast, _ = autocast_for(device, args.precision)
    data = meta.get("data", {})
    if meta.get("task"):  # a fine-tuned run: its task's held-out metric
        return _eval_task(args, model, tokenizer, meta, device, autocast)
    metrics = evaluation.evaluate(model, tokenizer, device, max_text_len=int(data.get("max_text_len", 16)),
                                  image_size=int(data.get("image_size", 64)), seed=args.seed,
                                  n_scenes=args.scenes, batch_size=args.batch_size, autocast=autocast,
                                  zero_shot_images=args.zero_shot_images)
    metrics.update(model=meta["model"], step=int(meta.get("step", 0)))
    print(f"{meta['model']} at step {metrics['step']}")
    print(evaluation.format_table(metrics))
    out = Path(args.out) if args.out else _fresh_eval_path(checkpoint.run_dir_of(args.checkpoint))
    evaluation.save_json(metrics, out)
    print(f"saved {out}")
    return 0


def _eval_task(args, model, tokenizer, meta, device, autocast) -> int:
    from vlcore.train import checkpoint, evaluation
    from vlcore.train.finetune_eval import evaluate_task, format_result

    data = meta.get("data", {})
    metrics = evaluate_task(model, tokenizer, device, max_text_len=int(data.get("max_text_len", 16)),
                            image_size=int(data.get("image_size", 64)), seed=args.seed, batch_size=args.batch_size,
                            autocast=autocast)
    metrics.update(model=meta["model"], step=int(meta.get("step", 0)))
    print(f"{meta['model']} fine-tuned for {meta['task']}, at step {metrics['step']}")
    print(format_result(metrics))
    out = Path(args.out) if args.out else _fresh_eval_path(checkpoint.run_dir_of(args.checkpoint))
    evaluation.save_json(metrics, out)
    print(f"saved {out}")
    return 0


def _fresh_eval_path(run_dir: Path) -> Path:
    """``eval-<date>-<time>.json`` in the run folder, never an existing file (pretrain's eval.json included)."""
    import time

    stem = f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = run_dir / f"{stem}.json", 1
    while out.exists():  # two evaluations within one second
        n += 1
        out = run_dir / f"{stem}-{n}.json"
    return out


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption images (or held-out digit scenes) with a captioning checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Generate captions with a captioner's generate() (CoCa, SimVLM). Give image "
                                   "files, or none to caption held-out digits-scenes images next to their reference "
                                   "captions.")
    p.add_argument("images", nargs="*", help="image files (need Pillow); none: held-out digits-scenes")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder or weights file")
    p.add_argument("--num", type=int_at_least(1), default=8, help="held-out scenes to caption when no image is given")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "top_p"], help="decoding")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="default: the model's max_text_len")
    p.add_argument("--beams", type=int_at_least(1), default=4, help="beam width (strategy beam)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=0.9, help="nucleus mass (strategy top_p)")
    p.add_argument("--temperature", type=float_in(0, low_open=True), default=1.0, help="sampling temperature (strategy top_p)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed and held-out scene seed")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda")
    p.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE first (custom models)")
    p.set_defaults(func=_cmd_caption)


def _generate_kwargs(fn, args) -> dict:
    """The decoding options of the chosen strategy, under the names ``generate`` accepts."""
    if args.strategy == "greedy":
        return {}
    wanted = {"beam_size": args.beams} if args.strategy == "beam" else {"top_p": args.top_p,
                                                                         "temperature": args.temperature}
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


def _image_file(path: str, size: int):
    from vlcore.data.samples import decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"images: expected image files, found {path!r} ({e.strerror or e})") from None
    try:
        return decode_image(data, size)
    except Exception as e:  # noqa: BLE001 - any decoder failure: the file is not an image we can read
        raise UsageError(f"images: expected an image file (JPEG, PNG, WebP, BMP, GIF, TIFF), found {path!r} "
                         f"that does not decode ({type(e).__name__}: {e})") from None


def _cmd_caption(args) -> int:
    import torch

    from vlcore.data.digits_scenes import retrieval_set, scenes_to_arrays
    model, tokenizer, meta, device = _load(args)
    if not hasattr(model, "generate"):
        raise UsageError(f"--checkpoint: expected a captioner's checkpoint (coca-*, simvlm-*: models with "
                         f"generate()), found a {meta['model']} checkpoint")
    data = meta.get("data", {})
    size = int(data.get("image_size", 64))
    if args.images:
        images = torch.stack([_image_file(f, size) for f in args.images])
        refs = [None] * len(args.images)
        names = list(args.images)
    else:
        scenes = retrieval_set(n=args.num, seed=args.seed, image_size=size)
        arr = scenes_to_arrays(scenes)
        images, refs, names = arr["image"], arr["caption"], [f"held-out scene {i}" for i in range(len(scenes))]
    torch.manual_seed(args.seed)
    kwargs = _generate_kwargs(model.generate, args)
    with torch.no_grad():
        ids = model.generate(images.to(device), max_new_tokens=args.max_new_tokens or int(data.get("max_text_len", 16)),
                             strategy=args.strategy, **kwargs).cpu()
    for name, row, ref in zip(names, ids, refs):
        text = tokenizer.decode(row.tolist()).strip()
        print(f"{name}: {text}" + (f"   (reference: {ref})" if ref is not None else ""))
    return 0


# ---------------------------------------------------------------------------------------------- bench / info
def _benchmarks_dir() -> Path | None:
    env = os.environ.get("VLCORE_BENCHMARKS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for c in candidates:
        if (c / "run_all.py").is_file():
            return c
    return None


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (benchmarks/run_all.py of a source checkout)",
                       description="Runs benchmarks/run_all.py from the vlcore source checkout (an editable "
                                   "install, the current folder, or $VLCORE_BENCHMARKS): every bench_*.py script, "
                                   "results under benchmarks/results/<device>/.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run, or a fast GPU pass)")
    p.add_argument("--only", default="", help="comma-separated benchmark names (bench_<name>.py), e.g. attention,vq")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--resources", action="store_true",
                   help="only the static resource report: every kernel config compiled for sm_90/sm_80 without a "
                        "GPU (registers, spills, shared memory, tensor-core instructions); with --quick the "
                        "default configs")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import subprocess

    bench = _benchmarks_dir()
    if bench is None:
        print("vlcore bench: the benchmarks/ folder was not found. It ships with the source checkout, not with a "
              "wheel: clone the repository and `pip install -e .`, run from the checkout's root, or set "
              "VLCORE_BENCHMARKS=/path/to/vlcore/benchmarks.", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(bench / "run_all.py")] + (["--quick"] if args.quick else [])
    if args.resources:  # kernel_resources.py writes to <out> itself, not <out>/static
        cmd = [sys.executable, str(bench / "kernel_resources.py")] + (["--quick"] if args.quick else [])
    else:
        cmd += ["--only", args.only] if args.only else []
    cmd += ["--out", args.out] if args.out else []
    return subprocess.call(cmd, cwd=bench.parent)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, the CUDA extension's build and each op's available backends",
                       description="Same as python -m vlcore.info: versions, the build of vlcore._C and, per op, "
                                   "which backends are available here and why the others are not.")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    from vlcore import info

    return int(info.main([]) or 0)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from vlcore._version import __version__

    parser = Parser(prog="vlcore", description=_DESCRIPTION,
                    epilog="Run `vlcore <command> --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"vlcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_eval(sub)
    _add_caption(sub)
    _add_bench(sub)
    _add_info(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    formatwarning = warnings.formatwarning
    if not args.debug:  # a warning (e.g. a checkpoint fallback) is one line, like the errors
        warnings.formatwarning = lambda message, category, *_, **__: f"vlcore {args.command}: warning: {message}\n"
    try:
        cli_args.check_backend_environment()
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if args.debug:
            raise
        return cli_args.report(args.command, e)
    finally:
        warnings.formatwarning = formatwarning


def run() -> None:
    """The ``vlcore`` program: :func:`main`, then exit with its status.

    A worker started by torchrun (``TORCHELASTIC_RUN_ID`` set) leaves with ``os._exit`` once its output is flushed:
    by then the run folder is written and the process group destroyed, and skipping interpreter shutdown removes
    the window in which a communication library's thread touching Python objects aborts the process
    (SIGABRT after a run that succeeded, which torchrun reports as a failed job).
    """
    code = main()
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
