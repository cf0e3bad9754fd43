"""The run folder of ``vlcore pretrain``: never overwrite another run without ``--resume`` or ``--overwrite``.

A folder "holds a run" when it has ``metrics.jsonl``, ``config.json`` or a non-empty ``checkpoints/``. Starting a
new run there would truncate its metrics, replace its config and prune its checkpoints, so it is refused unless
the run is resumed in place or ``--overwrite`` is given. ``--overwrite`` deletes only the files vlcore writes
(never the folder or anything else in it), so that no checkpoint of the old run can be mistaken for one of the
new run by the loader's fallback.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlcore.train import checkpoint

_OWN_FILES = re.compile(r"metrics\.jsonl|metrics\.png|config\.json|tokenizer\.json|eval(-[\d-]+)?\.json")
_OWN_CHECKPOINT_FILES = re.compile(r"step-\d+\..+|latest\.json|\..+\.tmp")


class RunFolderExists(FileExistsError):
    """The output folder already holds a run and neither ``--resume`` (of that run) nor ``--overwrite`` was given."""


def holds_run(folder: str | Path) -> bool:
    folder = Path(folder)
    ckpts = folder / "checkpoints"
    return (folder / "metrics.jsonl").is_file() or (folder / "config.json").is_file() or \
        (ckpts.is_dir() and any(ckpts.iterdir()))


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def refusal(out_dir: str | Path | None, resume: str | Path | None, overwrite: bool) -> str | None:
    """The one-line error for starting a run in ``out_dir``, or None when that is allowed."""
    if out_dir is None or overwrite or not holds_run(out_dir):
        return None
    target = Path(out_dir)
    if resume is not None and _same(checkpoint.run_dir_of(resume), target):
        return None
    return (f"--out-dir {target} already holds a run (metrics.jsonl, config.json or checkpoints/); continue it "
            f"with --resume {target}, or pass --overwrite to replace it")


def is_unsaved_attempt(folder: str | Path) -> bool:
    """True when ``folder`` has no finished checkpoint (no ``step-N.json``) and no checkpoint of an older vlcore:
    what a job killed before its first save leaves, and what ``--resume auto`` may start again in place."""
    ckpts = Path(folder) / "checkpoints"
    return not checkpoint.complete_steps(ckpts) and not (ckpts.is_dir() and any(ckpts.glob("step-*.state.pt")))


def prepare(run_dir: str | Path, resume: str | Path | None, overwrite: bool) -> list[Path]:
    """Create ``run_dir``; with ``overwrite``, delete the files of a run there that is not the one resumed. Removes
    stale temporaries of a killed write either way. Returns what was deleted."""
    run_dir = Path(run_dir)
    clear = overwrite and refusal(run_dir, resume, overwrite=False) is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    if clear:
        for folder, own in ((run_dir, _OWN_FILES), (run_dir / "checkpoints", _OWN_CHECKPOINT_FILES)):
            if folder.is_dir():
                removed += [p for p in folder.iterdir() if p.is_file() and own.fullmatch(p.name)]
        for p in removed:
            p.unlink()
    return removed + checkpoint.clean_temporaries(run_dir) + checkpoint.clean_temporaries(run_dir / "checkpoints")
