"""Compact models of the papers, registered by name with their configs as data (installed as ``vlcore.models``).

    vlcore.models.list_models()                 -> sorted names ("coca-tiny", "coca-base", ...)
    vlcore.models.create("coca-tiny", **overrides)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, tuple[Callable[..., Any], Any]] = {}
# Each model family is one module in this package; importing it registers its configs.
_FAMILIES: tuple[str, ...] = ("coca", "simvlm", "soho", "xvlm", "vilt", "align", "mural", "vinvl", "e2evlp", "kdvlp")


def register(name: str, config: Any, builder: Callable[..., Any]) -> None:
    """Register ``name`` built by ``builder(config)``; ``config`` is a dataclass instance (configs as data)."""
    if name in _REGISTRY:
        raise ValueError(f"vlcore.models: {name!r} is registered twice")
    _REGISTRY[name] = (builder, config)


def _load_all() -> None:
    for family in _FAMILIES:
        importlib.import_module(f"{__name__}.{family}")


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_config(name: str) -> Any:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"vlcore.models: unknown model {name!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name][1]


def create(name: str, **overrides: Any):
    """Build model ``name`` with config fields replaced by ``overrides`` (unknown fields raise)."""
    config = get_config(name)
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"vlcore.models.create({name!r}): unknown config fields {unknown}; fields: {sorted(fields)}")
    builder = _REGISTRY[name][0]
    return builder(dataclasses.replace(config, **overrides))
