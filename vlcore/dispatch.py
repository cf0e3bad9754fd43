"""Backend registry and dispatcher: declared capabilities, and an explanation for every refusal.

Each op family registers its backends (``reference``, ``triton``, ``cuda``) with what they can do: devices,
dtypes, an environment requirement (is triton importable, is ``vlcore._C`` built with this op) and an
input-specific check. The dispatcher picks, for given inputs,

* the backend named by ``backend=`` or ``VLCORE_BACKEND`` — and raises with *every* reason if it cannot run;
* otherwise the highest-priority backend that natively runs on the tensors' device and accepts the inputs:
  CPU tensors get ``cpu`` when it accepts them, else ``reference``. The compiled backends run on CPU only under
  ``TRITON_INTERPRET=1`` and only when asked for explicitly. A refused preferred backend is logged once, with
  its reasons.

``VLCORE_BACKEND`` is either one name for every op (``triton``) or per op (``attention=triton,vq=cuda``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("vlcore")

REFERENCE = "reference"
TRITON = "triton"
CUDA = "cuda"
CPU = "cpu"


class BackendError(RuntimeError):
    """A requested backend cannot run these inputs; the message lists every reason."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a backend needs to know to accept or refuse a call: device, dtype and op-specific features."""

    device: torch.device
    dtype: torch.dtype
    features: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.features[key]


@dataclasses.dataclass(frozen=True)
class Backend:
    op: str
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: int
    load: Callable[[], Any]  # returns the implementation (module or object); called lazily, cached
    requires: Callable[[], str | None] = lambda: None  # None when the environment allows it, else why not
    supports: Callable[[Problem], list[str]] = lambda p: []  # input-specific refusals
    interpreter_cpu: bool = False  # runs CPU tensors under TRITON_INTERPRET=1 (explicit request only)
    description: str = ""

    def impl(self) -> Any:
        return _load_cached(self.op, self.name)

    def environment_refusal(self) -> str | None:
        return _requires_cached(self.op, self.name)

    def refusals(self, problem: Problem) -> list[str]:
        reasons = []
        why = self.environment_refusal()
        if why:
            reasons.append(why)
        dev = problem.device.type
        if dev not in self.devices and not (self.interpreter_cpu and dev == "cpu" and triton_interpreter()):
            where = ", ".join(self.devices)
            hint = " (or CPU under TRITON_INTERPRET=1)" if self.interpreter_cpu else ""
            reasons.append(f"runs on {where}{hint} tensors, got {dev}")
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {str(problem.dtype).replace('torch.', '')}")
        if not reasons:  # input checks may assume the basics hold
            reasons += self.supports(problem)
        return reasons


_REGISTRY: dict[str, dict[str, Backend]] = {}
_LOGGED: set[tuple[str, str]] = set()


def register(backend: Backend) -> Backend:
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    _IMPLS.pop((backend.op, backend.name), None)
    _REQUIRES.pop((backend.op, backend.name), None)
    _ENV_CHOICES.clear()
    return backend


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> list[Backend]:
    """The backends of ``op``, preferred first."""
    return sorted(_REGISTRY.get(op, {}).values(), key=lambda b: -b.priority)


def get(op: str, name: str) -> Backend:
    try:
        return _REGISTRY[op][name]
    except KeyError:
        known = ", ".join(b.name for b in backends(op)) or "none"
        raise BackendError(f"vlcore.{op}: unknown backend {name!r}; known backends: {known}") from None


# Plain dict memos rather than functools.lru_cache: torch.compile traces through dicts without warnings.
_IMPLS: dict[tuple[str, str], Any] = {}
_REQUIRES: dict[tuple[str, str], str | None] = {}


def _load_cached(op: str, name: str) -> Any:
    key = (op, name)
    if key not in _IMPLS:
        _IMPLS[key] = _REGISTRY[op][name].load()
    return _IMPLS[key]


def _requires_cached(op: str, name: str) -> str | None:
    key = (op, name)
    if key not in _REQUIRES:
        try:
            _REQUIRES[key] = _REGISTRY[op][name].requires()
        except Exception as e:  # an environment probe must never break dispatch
            _REQUIRES[key] = f"availability check failed: {type(e).__name__}: {e}"
    return _REQUIRES[key]


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(op: str, backend: str | None) -> str | None:
    """The explicit choice for ``op``: the ``backend=`` argument, else ``VLCORE_BACKEND``."""
    if backend is not None:
        return backend
    env = os.environ.get("VLCORE_BACKEND", "").strip()
    if not env:
        return None
    if "=" not in env:
        if env not in {b.name for family in _REGISTRY.values() for b in family.values()}:
            names = sorted({b.name for family in _REGISTRY.values() for b in family.values()})
            raise BackendError(f"VLCORE_BACKEND={env!r}: unknown backend; valid names: {', '.join(names)} "
                               "(or OP=BACKEND pairs such as attention=triton,vq=cuda)")
        return env
    return _env_choices(env).get(op)


# Parsed per-op settings by VLCORE_BACKEND text (valid ones only: a bad setting raises on every call).
_ENV_CHOICES: dict[str, dict[str, str]] = {}


def _env_choices(env: str) -> dict[str, str]:
    """``op=backend,...`` checked against the registry: a misspelt op or backend is an error, never ignored
    (silently ignoring ``vq_nearest=triton`` would run the default backend while the user believes otherwise)."""
    if env in _ENV_CHOICES:
        return _ENV_CHOICES[env]
    out: dict[str, str] = {}
    for item in env.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key or not value:
            raise BackendError(f"VLCORE_BACKEND={env!r}: expected one backend name for every op (e.g. triton) or "
                               f"OP=BACKEND pairs separated by commas (e.g. attention=triton,vq=cuda); "
                               f"found the item {item.strip()!r}")
        if key not in _REGISTRY:
            raise BackendError(f"VLCORE_BACKEND={env!r}: unknown op {key!r}; valid ops: {', '.join(ops())}")
        names = [b.name for b in backends(key)]
        if value not in names:
            raise BackendError(f"VLCORE_BACKEND={env!r}: op {key!r} has no backend {value!r}; its backends: "
                               f"{', '.join(names)}")
        out[key] = value
    _ENV_CHOICES[env] = out
    return out


def choose(op: str, problem: Problem, backend: str | None = None) -> Backend:
    """The backend that runs ``op`` on ``problem`` (see the module docstring for the rules)."""
    wanted = requested_backend(op, backend)
    if wanted is not None:
        chosen = get(op, wanted)
        reasons = chosen.refusals(problem)
        if reasons:
            raise BackendError(
                f"vlcore.{op}: backend {wanted!r} cannot run these inputs:\n  - " + "\n  - ".join(reasons)
            )
        return chosen
    refused = []
    for cand in backends(op):
        if problem.device.type not in cand.devices:
            continue  # not this device's backend (compiled backends on CPU: explicit request only, interpreter)
        reasons = cand.refusals(problem)
        if not reasons:
            for name, why in refused:
                if (op, name) not in _LOGGED:
                    _LOGGED.add((op, name))
                    log.warning("vlcore.%s: backend %r not used (%s); using %r", op, name, "; ".join(why), cand.name)
            return cand
        refused.append((cand.name, reasons))
    detail = "\n".join(f"  - {name}: " + "; ".join(why) for name, why in refused)
    raise BackendError(f"vlcore.{op}: no backend can run these inputs:\n{detail}")


def describe() -> list[dict[str, Any]]:
    """One row per (op, backend): availability in this environment, devices, dtypes, priority."""
    rows = []
    for op in ops():
        for b in backends(op):
            why = b.environment_refusal()
            rows.append(
                {
                    "op": op,
                    "backend": b.name,
                    "available": why is None,
                    "why_not": why or "",
                    "devices": ",".join(b.devices) + (" (+cpu interpreter)" if b.interpreter_cpu else ""),
                    "dtypes": ",".join(str(d).replace("torch.", "") for d in b.dtypes),
                    "priority": b.priority,
                    "description": b.description,
                }
            )
    return rows


# ---- requirement probes shared by the op families ------------------------------------------------------


@functools.cache
def triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if not torch.cuda.is_available() and not triton_interpreter():
        return "no CUDA device (on CPU set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter)"
    return None


def cuda_ext_missing(symbol: str) -> str | None:
    """None when ``vlcore._C`` is built and exposes ``symbol`` (the op's kernels), else why not."""
    from vlcore import _ext

    mod, why = _ext.load()
    if mod is None:
        return why
    if not hasattr(mod, symbol):
        return f"vlcore._C was built without {symbol} (rebuild: pip install -e .)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
