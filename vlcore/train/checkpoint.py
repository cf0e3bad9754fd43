"""Checkpoints: weights (safetensors) + training state, written atomically, with a ``latest.json`` pointer.

Layout of ``<run>/checkpoints/``::

    step-00000400.safetensors   weights; metadata: model name, config (JSON), tokenizer (JSON), step
    step-00000400.state.pt      optimizer, scheduler, RNG states, data position, step (torch.save)
    latest.json                 {"step": 400, "weights": "step-00000400.safetensors", "state": ...}

Every file is written to a temporary name in the same folder, fsynced, then ``os.replace``d over its final name
(and the folder fsynced), and ``latest.json`` is replaced last: a crash at any point leaves the previous
``latest.json`` pointing at complete files. Tied weights (one tensor under two names) are stored once and the
aliases recorded in the metadata. Without the ``safetensors`` package the weights go through ``torch.save``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

try:
    import safetensors.torch as _st
except ImportError:  # pragma: no cover - declared dependency; torch.save fallback keeps checkpoints working
    _st = None

WEIGHTS_EXT = ".safetensors" if _st is not None else ".weights.pt"


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then fsync and rename over ``path``; on any error ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass


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
    if _st is not None and str(path).endswith(".safetensors"):
        atomic_write(path, lambda tmp: _st.save_file(tensors, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"tensors": tensors, "metadata": meta}, tmp))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with aliases restored, metadata with string values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")
    if str(path).endswith(".safetensors"):
        if _st is None:
            raise ImportError(f"{path} is a safetensors file: pip install safetensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tensors, meta = blob["tensors"], blob["metadata"]
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, meta


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, train_state: dict, metadata: dict,
                    keep: int = 2) -> Path:
    """Write step ``step`` and point ``latest.json`` at it; keep the newest ``keep`` checkpoints."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    stem = f"step-{step:08d}"
    weights, state = ckpt_dir / (stem + WEIGHTS_EXT), ckpt_dir / (stem + ".state.pt")
    save_weights(weights, model_state, {**metadata, "step": str(step)})
    atomic_write(state, lambda tmp: torch.save(train_state, tmp))
    pointer = {"step": step, "weights": weights.name, "state": state.name}
    atomic_write(ckpt_dir / "latest.json", lambda tmp: Path(tmp).write_text(json.dumps(pointer)))
    if keep > 0:
        olds = sorted(p for p in ckpt_dir.glob("step-*" + WEIGHTS_EXT) if p.name != weights.name)
        for old in olds[: max(0, len(olds) - (keep - 1))]:
            old.unlink(missing_ok=True)
            Path(str(old)[: -len(WEIGHTS_EXT)] + ".state.pt").unlink(missing_ok=True)
    return weights


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, state file or None) for a run folder, its checkpoints folder, latest.json or a weights file."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "latest.json" if (p / "checkpoints").is_dir() else p / "latest.json"
    if p.name == "latest.json":
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint under {path}: {p} does not exist")
        ptr = json.loads(p.read_text())
        return p.parent / ptr["weights"], p.parent / ptr["state"]
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    stem = str(p)[: -len(".safetensors")] if str(p).endswith(".safetensors") else str(p)[: -len(".weights.pt")]
    state = Path(stem + ".state.pt")
    return p, state if state.is_file() else None


def load_checkpoint(path: str | Path, with_state: bool = True) -> dict:
    """{"model_state", "metadata" (model, config, tokenizer as parsed JSON), "train_state" or None}."""
    weights, state = resolve(path)
    tensors, meta = load_weights(weights)
    parsed = dict(meta)
    for k in ("config", "tokenizer", "data"):
        if k in parsed:
            parsed[k] = json.loads(parsed[k])
    train_state = None
    if with_state and state is not None:
        train_state = torch.load(state, map_location="cpu", weights_only=False)
    return {"model_state": tensors, "metadata": parsed, "train_state": train_state, "weights_path": weights}
