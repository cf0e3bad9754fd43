"""Checkpoints: weights and training state as safetensors + JSON (nothing is ever unpickled), a sha256 manifest
per checkpoint, atomic writes, a ``latest.json`` pointer, and a loader that falls back to the newest good one.

Layout of ``<run>/checkpoints/``::

    step-00000400.safetensors        weights; metadata: model name, config (JSON), tokenizer (JSON), step
    step-00000400.state.safetensors  the training state's tensors (optimizer moments, torch RNG states ...)
    step-00000400.state.json         the rest of the training state (step, scheduler, data position, config,
                                     numpy/Python RNG), naming its tensors: see ``state_codec``
    step-00000400.json               manifest: size and sha256 of the three files above, written last
    latest.json                      {"step": 400, "manifest": "step-00000400.json", ...}

Saving: every file goes to a temporary name in the same folder, is fsynced and ``os.replace``d over its final
name. The manifest is written after the files it lists (its hashes are read back from disk) and ``latest.json``
moves only after it, so a crash at any point leaves ``latest.json`` naming a complete checkpoint. A failed write
raises :class:`CheckpointWriteError` (an OSError; errno ENOSPC and "no space left on device writing <file>" when
the disk is full) and leaves every earlier checkpoint as it was. Pruning keeps the newest ``keep`` complete
checkpoints whose files still match their manifests (a damaged one does not count), always the one just
written, and never the one this process resumed from.

Loading a run folder (or its ``checkpoints/`` or ``latest.json``) verifies the checkpoint ``latest.json`` names
against its manifest; a missing, truncated or altered file or a broken ``latest.json`` gives a warning naming
the file, and the next newest checkpoint whose files match its manifest is used (an error only when none does).
A step file named explicitly is verified and never swapped for another. Pickled files (``*.pt`` from earlier
vlcore versions) are refused unopened. The hashes detect damage, not tampering: whoever can write the folder can
write a matching manifest, and all they can make vlcore load is tensors and JSON.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlcore.train import state_codec

FORMAT = "vlcore-checkpoint/2"
WEIGHTS_EXT = ".safetensors"
_MANIFEST = re.compile(r"step-(\d+)\.json$")
_PARTS = {"weights": ".safetensors", "state": ".state.safetensors", "skeleton": ".state.json"}
_resumed_from: dict[Path, int] = {}  # checkpoints folder -> step loaded with its training state (never pruned)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged with no good one to fall back to, or in a refused format."""


class CheckpointFallbackWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older good one."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint file failed (disk full, read-only folder ...); earlier checkpoints are intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _paths(ckpt_dir: Path, step: int) -> dict[str, Path]:
    stem = f"step-{step:08d}"
    out = {part: ckpt_dir / (stem + ext) for part, ext in _PARTS.items()}
    out["manifest"] = ckpt_dir / (stem + ".json")
    return out


# ---------------------------------------------------------------------------------------------- writing
_DISK_FULL_TEXT = ("no space left", "storagefull", "file write failed", "os error 28", "disk quota")


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError | None:
    """The error to raise for ``exc`` while writing ``path``: disk full and OS errors name the file."""
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            any(s in text.lower() for s in _DISK_FULL_TEXT):
        return CheckpointWriteError(errno.ENOSPC, f"no space left on device writing {path}")
    if isinstance(exc, OSError):
        return CheckpointWriteError(exc.errno, f"could not write {path}: {exc.strerror or text}")
    return None  # a bug rather than the disk: keep the original error


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then fsync and rename over ``path``; on any error ``path`` is untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        translated = _write_error(path, e) if isinstance(e, Exception) else None
        if translated is not None:
            raise translated from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the ``.<name>.<random>.tmp`` files a killed ``atomic_write`` left in ``folder``; returns them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        t = t.detach()
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.to("cpu").contiguous().clone()
    return tensors, aliases


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    tensors, aliases = _dedupe(state)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["aliases"] = json.dumps(aliases)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, allow_nan=False)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, train_state: dict, metadata: dict,
                    keep: int = 2) -> Path:
    """Write step ``step`` (weights, state, manifest) and point ``latest.json`` at it; prune (see module doc)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    paths = _paths(ckpt_dir, step)
    tensors, skeleton = state_codec.encode(train_state)
    # An older manifest of this step (a run resumed from an earlier step) must not vouch for the new files.
    paths["manifest"].unlink(missing_ok=True)
    save_weights(paths["weights"], model_state, {**metadata, "step": str(step)})
    atomic_write(paths["state"], lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    _write_json(paths["skeleton"], {"format": FORMAT, "state": skeleton})
    files = {paths[p].name: {"bytes": paths[p].stat().st_size, "sha256": _sha256(paths[p])} for p in _PARTS}
    _write_json(paths["manifest"], {"format": FORMAT, "step": step, "files": files})
    _write_json(ckpt_dir / "latest.json", {"step": step, "manifest": paths["manifest"].name,
                                           "weights": paths["weights"].name, "state": paths["state"].name})
    if keep > 0:
        prune(ckpt_dir, keep, protect={step, _resumed_from.get(ckpt_dir.resolve())}, trusted=step)
    return paths["weights"]


def complete_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps that have a manifest (a finished save), newest first."""
    ckpt_dir = Path(ckpt_dir)
    found = (_MANIFEST.fullmatch(p.name) for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else ()
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def prune(ckpt_dir: str | Path, keep: int, protect=(), trusted: int | None = None) -> list[Path]:
    """Keep the newest ``keep`` checkpoints whose files match their manifests (a damaged one does not count) and
    the steps in ``protect``; delete every other checkpoint older than the oldest kept one. ``trusted``: a step
    just written and hashed, not read again. Costs reading up to ``keep - 1`` older checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    good: list[int] = []
    for step in complete_steps(ckpt_dir):
        if len(good) == keep:
            break
        try:
            if step != trusted:
                verify(ckpt_dir, step)
            good.append(step)
        except CheckpointError:
            continue
    if not good:
        return []
    kept = set(good) | {s for s in protect if s is not None}
    removed = []
    for p in ckpt_dir.glob("step-*"):
        m = re.match(r"step-(\d+)\.", p.name)
        if m and int(m.group(1)) < good[-1] and int(m.group(1)) not in kept:
            removed.append(p)
    # Manifests go first: a half-pruned checkpoint is then incomplete, never damaged-but-listed.
    for p in sorted(removed, key=lambda p: not _MANIFEST.fullmatch(p.name)):
        p.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------------------------------------- reading
def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with aliases restored, metadata with string values) of a safetensors weights file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")
    _refuse_pickle(path)
    with _parsing(path):
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get("aliases", "{}"))
        if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
            raise CheckpointError(f"{path}: the 'aliases' metadata does not name tensors of the file")
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors, meta


@contextlib.contextmanager
def _parsing(path: Path):
    """Whatever a damaged or crafted file makes the parsers raise becomes one CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (SafetensorError, ValueError, RecursionError, TypeError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint file ({type(e).__name__}: {e})") from None


def _refuse_pickle(path: Path) -> None:
    if path.suffix in (".pt", ".pth", ".pkl", ".bin"):
        raise CheckpointError(f"{path} is a pickle (written by an older vlcore or another tool); vlcore never "
                              "unpickles a file it is given, as loading one can run any code. Only safetensors "
                              "weights and JSON are read")


def load_state(ckpt_dir: str | Path, step: int) -> dict:
    """The training state of step ``step``: its tensors (safetensors) placed into its JSON skeleton."""
    paths = _paths(Path(ckpt_dir), step)
    with _parsing(paths["state"]):
        with safe_open(str(paths["state"]), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    with _parsing(paths["skeleton"]):
        doc = json.loads(paths["skeleton"].read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
            raise CheckpointError(f"{paths['skeleton']}: not a {FORMAT} training state")
        return state_codec.decode(tensors, doc["state"])


def verify(ckpt_dir: str | Path, step: int, parts=tuple(_PARTS)) -> None:
    """Check the ``parts`` of step ``step`` against its manifest; CheckpointError naming the first bad file."""
    paths = _paths(Path(ckpt_dir), step)
    manifest = paths["manifest"]
    try:
        doc = json.loads(manifest.read_text())
        files = doc["files"]
        assert isinstance(files, dict) and doc.get("format") == FORMAT
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as e:
        raise CheckpointError(f"{manifest} is missing or unreadable ({type(e).__name__}: {e})") from None
    for part in parts:
        path = paths[part]  # names come from the step, never from the manifest: it cannot point elsewhere
        entry = files.get(path.name)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{manifest} does not list {path.name}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, {manifest.name} says "
                                  f"{entry.get('bytes')}")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} is damaged: its sha256 differs from the one in {manifest.name}")


def _checkpoints_dir(p: Path) -> Path:
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a run folder, its ``checkpoints/``, ``latest.json`` or a step file (reads nothing)."""
    p = Path(path)
    if p.is_dir():
        return p if (p / "checkpoints").is_dir() or p.name != "checkpoints" else p.parent
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _pointer_step(ckpt_dir: Path, problems: list[str]) -> int | None:
    latest = ckpt_dir / "latest.json"
    if not latest.exists():
        return None
    try:
        step = json.loads(latest.read_text())["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step is {step!r}")
        return step
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{latest} is unreadable ({type(e).__name__}: {e})")
        return None


def _legacy_message(ckpt_dir: Path) -> str | None:
    pickled = sorted(ckpt_dir.glob("step-*.state.pt"))
    if not pickled:
        return None
    weights = pickled[-1].name[: -len(".state.pt")] + WEIGHTS_EXT
    return (f"{ckpt_dir} holds checkpoints of an older vlcore whose training state is a pickle "
            f"({pickled[-1].name}); vlcore never unpickles a file it is given, as loading one can run any code. "
            f"Their weights still load for eval/caption (--checkpoint {ckpt_dir / weights}), but training cannot "
            "resume from them")


def _choose(ckpt_dir: Path, with_state: bool) -> int:
    """The step to load from a checkpoints folder: latest.json's if it verifies, else the newest that does."""
    parts = tuple(_PARTS) if with_state else ("weights",)
    problems: list[str] = []
    pointed = _pointer_step(ckpt_dir, problems)
    steps = complete_steps(ckpt_dir)
    if pointed is not None and pointed not in steps:
        problems.append(f"{ckpt_dir / 'latest.json'} names step {pointed}, which has no manifest "
                        f"({_paths(ckpt_dir, pointed)['manifest'].name})")
    order = ([pointed] if pointed in steps else []) + [s for s in steps if s != pointed]
    for step in order:
        try:
            verify(ckpt_dir, step, parts)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; using {_paths(ckpt_dir, step)['manifest'].name} (step {step}), the newest "
                          "checkpoint whose files match their manifest", CheckpointFallbackWarning, stacklevel=3)
        return step
    if not steps:
        legacy = _legacy_message(ckpt_dir)
        if legacy:
            raise CheckpointError(legacy)
        if not problems:
            raise FileNotFoundError(f"no checkpoint under {ckpt_dir}: it holds no step-*.json manifest")
    raise CheckpointError(f"no usable checkpoint under {ckpt_dir}: " + "; ".join(problems))


def _step_of_file(p: Path) -> int | None:
    m = re.fullmatch(r"step-(\d+)\.(safetensors|state\.safetensors|state\.json|json)", p.name)
    return int(m.group(1)) if m and (p.parent / f"step-{m.group(1)}.json").is_file() else None


def resolve(path: str | Path, with_state: bool = True) -> tuple[Path, Path | None]:
    """(weights file, state file or None) that ``load_checkpoint(path)`` would read; verifies as it does."""
    where, step = _locate(Path(path), with_state)
    if step is None:
        return where, None
    paths = _paths(where, step)
    return paths["weights"], paths["state"]


def _locate(p: Path, with_state: bool) -> tuple[Path, int | None]:
    """(checkpoints folder, verified step), or (a bare weights file, None) for weights without a manifest."""
    if p.is_dir() or p.name == "latest.json":
        folder = _checkpoints_dir(p) if p.is_dir() else p.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        return folder, _choose(folder, with_state)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    _refuse_pickle(p)
    step = _step_of_file(p)
    if step is not None:  # named explicitly: verified, never replaced by another step
        verify(p.parent, step, tuple(_PARTS) if with_state else ("weights",))
        return p.parent, step
    if not p.name.endswith(".safetensors") or p.name.endswith(".state.safetensors"):
        raise CheckpointError(f"{p} is not a vlcore checkpoint (a run folder, latest.json or a step file)")
    legacy = p.with_name(p.name[: -len(".safetensors")] + ".state.pt")
    if with_state and legacy.exists():
        _refuse_pickle(legacy)
    warnings.warn(f"{p} has no manifest (step-N.json): its weights are loaded unverified",
                  CheckpointFallbackWarning, stacklevel=3)
    return p, None


def load_checkpoint(path: str | Path, with_state: bool = True) -> dict:
    """{"model_state", "metadata" (model, config, tokenizer as parsed JSON), "train_state" or None,
    "weights_path", "step"} from a run folder, its checkpoints folder, latest.json or a step file.

    Loading with the training state marks the checkpoint as resumed from: this process never prunes it.
    """
    where, step = _locate(Path(path), with_state)
    weights = where if step is None else _paths(where, step)["weights"]
    tensors, meta = load_weights(weights)
    parsed = dict(meta)
    with _parsing(weights):
        for k in ("config", "tokenizer", "data"):
            if k in parsed:
                parsed[k] = json.loads(parsed[k])
    train_state = None
    if with_state and step is not None:
        train_state = load_state(where, step)
        _resumed_from[where.resolve()] = step
    return {"model_state": tensors, "metadata": parsed, "train_state": train_state, "weights_path": weights,
            "step": step}
