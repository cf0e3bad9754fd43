"""The settings of a resumed run: the run's own, except those the new command gives explicitly.

``vlcore pretrain --resume RUN`` must continue RUN as it was started (its steps, batch size, lr schedule, data ...),
not with the new command line's defaults. A flag given on purpose and different from the run's value is applied
and reported (``--steps: 400 -> 600``). Launch settings (device, threads, data workers, compile, progress bar) are
the new command's: they depend on the machine, not on the run. The model, its tokenizer and its sizes are fixed by
the checkpoint's weights; a different value given for them is reported as ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlcore.train import checkpoint

# Per launch: the machine decides, not the run.
LAUNCH_FIELDS = frozenset({"resume", "out_dir", "overwrite", "device", "threads", "num_workers", "compile", "quiet",
                           "explicit"})
# Fixed by the checkpoint's model and tokenizer.
MODEL_FIELDS = frozenset({"model", "tokenizer", "vocab_size", "max_text_len", "image_size", "overrides", "task",
                          "init_from"})
# What the optimizer and scheduler states restore but a changed setting must override.
SCHEDULE_FIELDS = frozenset({"lr", "weight_decay", "steps", "warmup", "min_lr_ratio"})


def flag(name: str) -> str:
    return {"overrides": "--set", "init_from": "--checkpoint"}.get(name, "--" + name.replace("_", "-"))


def _show(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else f"{value}"


def explicit_fields(cfg) -> set[str]:
    """The fields the caller set on purpose: ``cfg.explicit`` (the CLI fills it from argparse), or, for a config
    built in Python without it, those that differ from the dataclass defaults."""
    if cfg.explicit is not None:
        return set(cfg.explicit)
    defaults = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def _like(current, saved):
    """A saved value in the current field's type (JSON turns tuples into lists)."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def merge_settings(cfg, saved: dict) -> tuple[object, list[str], set[str]]:
    """(config to resume with, report lines, names of run settings changed on purpose).

    ``saved`` is the run's recorded config (the checkpoint's); fields it lacks (an older run) keep ``cfg``'s value.
    """
    given = explicit_fields(cfg)
    values, lines, changed = {}, [], set()
    for f in dataclasses.fields(cfg):
        name = f.name
        if name in LAUNCH_FIELDS or name not in saved:
            continue
        old, new = _like(getattr(cfg, name), saved[name]), getattr(cfg, name)
        if name in given and new != old:
            if name in MODEL_FIELDS:
                lines.append(f"{flag(name)}: {_show(new)} ignored; the checkpoint's model has {_show(old)}")
            else:
                lines.append(f"{flag(name)}: {_show(old)} -> {_show(new)}")
                changed.add(name)
                continue
        values[name] = old
    return dataclasses.replace(cfg, **values), lines, changed


def schedule_settings(optimizer) -> list[tuple[float, float]]:
    """(peak lr, weight decay) of each parameter group as configured now, before a state is loaded over them."""
    return [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]


def restore_schedule_settings(optimizer, scheduler, settings: list[tuple[float, float]]) -> None:
    """The loaded optimizer and scheduler states carry the run's peak lr and weight decay: put ``settings`` back
    and recompute the current lr from the (possibly changed) schedule at the loaded step."""
    for group, (initial_lr, weight_decay) in zip(optimizer.param_groups, settings):
        group["initial_lr"], group["weight_decay"] = initial_lr, weight_decay
    scheduler.base_lrs = [initial_lr for initial_lr, _ in settings]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def find_latest_run(out_dir: str | None, model: str, root: str = "runs") -> Path | None:
    """``--resume auto``: ``out_dir`` if it holds a checkpoint, or without ``--out-dir`` the newest
    ``runs/<model>-*`` that does (a restarted job with default folder names starts a new folder each time)."""
    candidates = [Path(out_dir)] if out_dir else sorted(Path(root).glob(f"{model}-*"))
    # A finished save leaves a manifest; latest.json alone may be missing or broken while good checkpoints exist.
    saved = [c / "checkpoints" for c in candidates if checkpoint.complete_steps(c / "checkpoints")]
    if not saved:
        return None
    return max(saved, key=lambda c: c.stat().st_mtime).parent
