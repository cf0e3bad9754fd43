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


# --------------------------------------------------------------------------- many-to-many maps, both ways
#
# A Link joins peer keys to vlcore keys: the peer tensors concatenated along dim 0 are the vlcore tensors
# concatenated along dim 0 (a fused q|k|v projection and its three parts, a fused k|v and its two), or, one to
# one, the same values in another shape ((1,) vs (), (N, D) vs (1, N, D)) or transposed (open_clip's
# (D, E) projection matrices vs nn.Linear weights). One list of links serves both directions.

Link = tuple[tuple[str, ...], tuple[str, ...], bool]  # (peer keys, vlcore keys, transposed)


def _move(values: list[torch.Tensor], shapes: list[torch.Size], transposed: bool) -> list[torch.Tensor]:
    if transposed:
        values = [v.t() for v in values]
    if len(values) == 1 and len(shapes) == 1:
        return [values[0].reshape(shapes[0])]
    joined = torch.cat(values, dim=0)
    return [p.reshape(s) for p, s in zip(joined.split([s[0] for s in shapes], dim=0), shapes)]


def _check_numel(owner: str, src: tuple[str, ...], dst: tuple[str, ...], values, shapes) -> None:
    have, want = sum(v.numel() for v in values), sum(torch.Size(s).numel() for s in shapes)
    if have != want:
        raise ValueError(f"{owner}: {list(src)} hold {have} values ({[tuple(v.shape) for v in values]}), but "
                         f"{list(dst)} expect {want} ({[tuple(s) for s in shapes]})")


def convert_links(source: Mapping[str, torch.Tensor], links: Iterable[Link], target: nn.Module, *,
                  owner: str, ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """A state dict for ``target`` from ``source`` through ``links`` (peer -> vlcore). Raises naming a source key
    that no link covers, a vlcore key a link names but ``target`` lacks, a size mismatch, or a ``target`` key
    left without a value."""
    links, ignore = list(links), tuple(ignore)
    wanted = target.state_dict()
    covered = {k for src, _, _ in links for k in src}
    for key in source:
        if key not in covered and not key.startswith(ignore):
            raise UnmappableKeyError(f"{owner}: cannot map checkpoint key {key!r}")
    out: dict[str, torch.Tensor] = {}
    for src, dst, transposed in links:
        absent = [k for k in dst if k not in wanted]
        if absent:
            raise UnmappableKeyError(f"{owner}: checkpoint key {src[0]!r} maps to {absent[0]!r}, which "
                                     f"{type(target).__name__} does not have")
        lost = [k for k in src if k not in source]
        if lost:
            raise UnmappableKeyError(f"{owner}: the checkpoint has {src[0]!r} but not {lost[0]!r}")
        values, shapes = [source[k] for k in src], [wanted[k].shape for k in dst]
        _check_numel(owner, src, dst, values, shapes)
        out.update(zip(dst, _move(values, shapes, transposed)))
    missing = [k for k in wanted if k not in out]
    if missing:
        raise UnmappableKeyError(f"{owner}: the checkpoint has no value for {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} ({len(missing)} keys)")
    return out


def invert_links(ours: Mapping[str, torch.Tensor], links: Iterable[Link], peer: Mapping[str, torch.Tensor], *,
                 owner: str) -> dict[str, torch.Tensor]:
    """The peer state dict (keys and shapes of ``peer``) from vlcore's ``ours`` through ``links``, reversed."""
    out: dict[str, torch.Tensor] = {}
    for src, dst, transposed in links:
        values = [ours[k] for k in dst]
        shapes = [peer[k].shape for k in src]
        if transposed:
            shapes = [torch.Size(reversed(s)) for s in shapes]
        _check_numel(owner, dst, src, values, shapes)
        moved = _move(values, shapes, False)
        out.update(zip(src, [m.t() for m in moved] if transposed else moved))
    missing = [k for k in peer if k not in out]
    if missing:
        raise UnmappableKeyError(f"{owner}: no vlcore tensor for peer key {missing[0]!r}")
    return out
