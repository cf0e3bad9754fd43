"""Building :class:`~vlcore.kernels._launch.KernelVariant` records from a launcher's tile config (shared by the
kernel modules' ``static_variants()``). Importing this module never imports triton."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vlcore.kernels._launch import KernelVariant


def make_variant(name: str, fn: Any, cfg: Mapping[str, Any], signature: Mapping[str, str],
                 consts: Mapping[str, Any], *, dtype: str, dim: int, flags: str, default: bool,
                 aligned: Iterable[str], targets: tuple[int, ...] = (90, 80)) -> KernelVariant:
    """``fn``'s full signature (its runtime arguments typed by ``signature``, every other one a constexpr valued
    from ``cfg`` / ``consts``). ``aligned`` names the arguments a real launch sees as multiples of 16: pointers
    always, sizes and strides only when ``dim`` is a multiple of 16. ``targets``: the compute capabilities the
    config is launched on (a per-capability default lists one)."""
    args = fn.arg_names
    constexprs = {k: v for k, v in {**cfg, **consts}.items() if k in args}
    full = {a: signature.get(a, "constexpr") for a in args}
    missing = [a for a in args if full[a] == "constexpr" and a not in constexprs]
    if missing:
        raise ValueError(f"{name}: no value for the constexprs {missing}")
    divisible = tuple(a for a in aligned if a in signature and (a.endswith("_ptr") or dim % 16 == 0))
    return KernelVariant(kernel=name, fn=fn, signature=full, constexprs=constexprs, num_warps=cfg["num_warps"],
                         num_stages=cfg.get("num_stages", 3), dtype=dtype, dim=dim, flags=flags, default=default,
                         divisible=divisible, targets=targets)
