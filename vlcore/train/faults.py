"""Fault injection for the tests that prove a killed run resumes exactly: SIGKILL at chosen points.

Off unless ``VLCORE_FAULTS`` is set (then it costs one check per step and per checkpoint file rename)::

    VLCORE_FAULTS="step:3@1;write:2"   VLCORE_FAULTS_ONCE_DIR=/tmp/fired

* ``step:N``  — the process kills itself right after step N's update, before that step's checkpoint is written;
* ``write:N`` — at its N-th rename of a checkpoint file (``<run>/checkpoints/*``): the temporary file is complete
  but not in place yet, the moment a crash inside a checkpoint write leaves behind;
* ``@R`` limits a fault to rank R (default: every rank).

With ``VLCORE_FAULTS_ONCE_DIR`` each fault fires once over all restarts of the job (a marker file records it), so
the same command relaunched, as ``torchrun --max-restarts`` does, meets the next fault instead of the same one.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV, ONCE_ENV = "VLCORE_FAULTS", "VLCORE_FAULTS_ONCE_DIR"


@dataclass(frozen=True)
class Fault:
    point: str  # "step" or "write"
    at: int
    rank: int | None

    @property
    def name(self) -> str:
        return f"{self.point}-{self.at}" + ("" if self.rank is None else f"-rank{self.rank}")


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        point, _, rest = item.partition(":")
        at, _, rank = rest.partition("@")
        if point not in ("step", "write") or not at.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{ENV}: expected entries like 'step:3', 'write:2@1' separated by ';'; got {item!r}")
        faults.append(Fault(point, int(at), int(rank) if rank else None))
    return faults


class _Injector:
    def __init__(self, faults: list[Fault], rank: int, once_dir: str | None):
        self.rank, self.once_dir = rank, Path(once_dir) if once_dir else None
        self.faults = [f for f in faults if f.rank in (None, rank)]
        self.renames = 0
        if any(f.point == "write" for f in self.faults):
            self._real_replace = os.replace
            os.replace = self._replace  # every checkpoint write ends in os.replace (atomic rename)

    def _pending(self, point: str, at: int) -> Fault | None:
        for f in self.faults:
            if f.point == point and f.at == at:
                if self.once_dir is None or not (self.once_dir / f.name).exists():
                    return f
        return None

    def _fire(self, fault: Fault) -> None:
        if self.once_dir is not None:
            self.once_dir.mkdir(parents=True, exist_ok=True)
            (self.once_dir / fault.name).touch()
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int) -> None:
        fault = self._pending("step", step)
        if fault is not None:
            self._fire(fault)

    def _replace(self, src, dst, *args, **kwargs):
        if Path(dst).parent.name == "checkpoints":
            self.renames += 1
            fault = self._pending("write", self.renames)
            if fault is not None:
                self._fire(fault)
        return self._real_replace(src, dst, *args, **kwargs)

    def uninstall(self) -> None:
        if getattr(self, "_real_replace", None) is not None:
            os.replace = self._real_replace


_active: _Injector | None = None


def install(rank: int) -> None:
    """Arm the faults of ``$VLCORE_FAULTS`` for this process (no-op without it)."""
    global _active
    uninstall()
    spec = os.environ.get(ENV, "")
    if spec:
        _active = _Injector(parse(spec), rank, os.environ.get(ONCE_ENV))


def uninstall() -> None:
    global _active
    if _active is not None:
        _active.uninstall()
    _active = None


def after_step(step: int) -> None:
    if _active is not None:
        _active.after_step(step)
