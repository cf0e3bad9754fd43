"""What every kernel launcher (Triton and CUDA) shares: the device guard, CUDA's grid limits, the
deterministic mode and the TF32 opt-in. Importing this module never imports triton.

* **Device guard.** Triton (and a raw CUDA launch) runs on the *current* device; tensors on ``cuda:1`` while
  the current device is 0 would fault. Every launch happens inside :func:`launch_context`, which enters the
  tensor's device and hands the grid to :func:`check_grid`.
* **Grid limits.** CUDA caps grid x at 2^31 − 1 and y, z at 65 535. Launchers put the large products
  (batch × heads, row blocks) on axis 0; :func:`check_grid` turns an over-limit grid into a clear error
  instead of a launch failure deep in the driver.
* **Deterministic mode** (:func:`deterministic`). Autotuning picks block sizes by timing, and block sizes change
  the summation order, so two processes could differ in bits. In deterministic mode every kernel uses one fixed
  config per (dtype, head dim / feature dim, device capability): results are bitwise equal across processes
  and runs on the same GPU model and software versions. On by ``VLCORE_DETERMINISTIC=1``, by
  ``torch.use_deterministic_algorithms(True)``, and under ``torch.distributed`` with more than one process
  (ranks must agree); ``VLCORE_DETERMINISTIC=0`` turns it off everywhere.
* **TF32.** fp32 matmuls use TF32 only when the user opted in through torch
  (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high"/"medium")``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

# CUDA's maximum grid dimensions (x, y, z).
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)

# Test hooks: each is called as hook(kernel_name, grid_tuple, device) for every grid a launcher produces.
GRID_HOOKS: list[Callable[[str, tuple, torch.device], None]] = []


class LaunchError(ValueError):
    """A launch that CUDA would refuse (grid over its limits); raised before anything runs."""


def check_grid(name: str, grid: Sequence[int], device: torch.device | None = None) -> tuple[int, ...]:
    """``grid`` as a tuple, after checking it against CUDA's limits (raises :class:`LaunchError`)."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise LaunchError(f"{name}: a grid has 1 to 3 axes, got {grid}")
    for axis, (g, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if g > limit:
            raise LaunchError(f"{name}: grid axis {axis} is {g}, over CUDA's limit {limit} (grid {grid}); "
                              "the inputs are too large for one launch")
    for hook in GRID_HOOKS:
        hook(name, grid, device if device is not None else torch.device("cpu"))
    return grid


def checked_grid(name: str, grid, device: torch.device | None = None):
    """A grid for ``kernel[grid](...)``: a tuple is checked now, a callable (autotuned meta-parameters)
    when Triton calls it."""
    if callable(grid):
        return lambda meta: check_grid(name, grid(meta), device)
    return check_grid(name, grid, device)


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current (a no-op for CPU tensors: the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Test hooks: each is called as hook(kernel_name, device) when a launcher enters its device guard.
GUARD_HOOKS: list[Callable[[str, torch.device], None]] = []


@contextlib.contextmanager
def launch_context(name: str, t: torch.Tensor) -> Iterator[None]:
    """Enter ``t``'s device for a launch (and tell the test hooks which device was entered)."""
    with device_guard(t):
        for hook in GUARD_HOOKS:
            hook(name, t.device)
        yield


def deterministic() -> bool:
    """Is the deterministic mode on (fixed kernel configs, see the module docstring)?"""
    env = os.environ.get("VLCORE_DETERMINISTIC", "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    if torch.are_deterministic_algorithms_enabled():
        return True
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def allow_tf32() -> bool:
    """Has the user opted into TF32 for fp32 matmuls through torch's flags?"""
    try:
        return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        # torch >= 2.9 refuses the global query once the legacy and the per-backend APIs were both used; the
        # CUDA matmul backend's own setting is then the one that applies
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def fp32_dot_precision(interpret: bool) -> str:
    """``tl.dot``'s input_precision for fp32 operands: TF32 only on opt-in (the interpreter has no TF32)."""
    return "tf32" if allow_tf32() and not interpret else "ieee"


# ---- static resource report ---------------------------------------------------------------------------
# Each kernel module (kernels/<op>.py) exposes ``static_variants() -> list[KernelVariant]``: every config its
# launcher may choose (autotune lists and the fixed deterministic-mode config), with the signature a real launch
# has. benchmarks/kernel_resources.py compiles each for sm_90 and sm_80 without a GPU and reports registers,
# spills, shared memory and the instructions used.

import dataclasses  # noqa: E402
from typing import Any  # noqa: E402


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    kernel: str                 # name in the report, e.g. "attention.dkdv"
    fn: Any                     # the @triton.jit function
    signature: dict[str, str]   # every argument of fn -> triton type ("*bf16", "*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments (block sizes, flags)
    num_warps: int
    num_stages: int
    dtype: str                  # "bf16", "fp16", "fp32"
    dim: int | None             # head dim / feature dim
    flags: str = ""             # e.g. "causal,prefix,bias"
    default: bool = False       # the config used when autotuning is off (deterministic mode)
    # arguments a real launch sees as divisible by 16 (pointers 16-byte aligned, sizes/strides multiples of 16):
    # without these hints every load looks unaligned and the report would be meaningless
    divisible: tuple[str, ...] = ()
    targets: tuple[int, ...] = (90, 80)  # compute capabilities this variant is meant for
