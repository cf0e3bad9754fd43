"""State-dict conversion shared by the per-library modules: rename keys, check every key and shape."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn


class UnmappableKeyError(KeyError):
    """A checkpoint key that has no counterpart in the vlcore module (its name is in the message)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def convert(source: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], target: nn.Module, *,
            owner: str, ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``source`` renamed by ``rename`` into a state dict for ``target``, checked both ways.

    ``rename(key)`` returns the target key, or None for a key it cannot map (raises, naming it). Keys that start
    with one of ``ignore`` are dropped (a classifier head, cached index buffers). Raises when a mapped key is
    not in ``target``, when shapes differ, or when a ``target`` parameter receives no value.
    """
    ignore = tuple(ignore)
    wanted = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key.startswith(ignore) or any(key.endswith(s) for s in ignore if s.startswith(".")):
            continue
        new = rename(key)
        if new is None or new not in wanted:
            where = "" if new is None else f" (mapped to {new!r}, which {type(target).__name__} does not have)"
            raise UnmappableKeyError(f"{owner}: cannot map checkpoint key {key!r}{where}")
        if tuple(value.shape) != tuple(wanted[new].shape):
            raise ValueError(f"{owner}: checkpoint key {key!r} has shape {tuple(value.shape)}, but {new!r} "
                             f"expects {tuple(wanted[new].shape)}")
        out[new] = value
    missing = [k for k in wanted if k not in out]
    if missing:
        raise UnmappableKeyError(f"{owner}: the checkpoint has no value for {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} ({len(missing)} keys)")
    return out


def state_dict_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
