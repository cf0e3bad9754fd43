"""The command line's user-error path: argument types that name what they expect, a parser whose errors are
one line, and how an exception becomes ``vlcore <command>: error: ...`` with exit status 2.

A user error (bad value, missing file, unknown name) is one line naming the argument with what was expected
and what was found; ``--debug`` re-raises it with the traceback. Anything else is reported as an internal
error (exit 1), also in one line, with the hint to rerun with ``--debug``.
"""

from __future__ import annotations

import argparse
import math
import sys

USER_ERROR = 2
INTERNAL_ERROR = 1
INTERRUPTED = 130


class UsageError(ValueError):
    """A bad command line: the message names the argument, what it expects and what it found."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` ("expected an integer >= 1, found '0'")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite float in [low, high] (or (low, high] with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            lo = f"> {low:g}" if low_open else f">= {low:g}"
            rng = f"a number {lo}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise argparse.ArgumentTypeError(f"expected {rng}, found {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N, and a CUDA device only where one exists."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, found {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"found {text!r}, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"found {text!r}, but this machine has {count} CUDA device(s)")
    return text


def check_backend_environment() -> None:
    """``VLCORE_BACKEND`` checked before any work (a typo would otherwise fail only at the first op call)."""
    import os

    from vlcore import dispatch

    if not os.environ.get("VLCORE_BACKEND", "").strip():
        return
    for op in dispatch.ops():
        try:
            dispatch.requested_backend(op, None)
        except dispatch.BackendError as e:
            raise UsageError(str(e)) from None


def _user_error_types() -> tuple[type, ...]:
    from vlcore.dispatch import BackendError

    # ValueError includes DataError and UsageError; KeyError/TypeError come from registries and --set fields;
    # the OSErrors are paths a user gave; ModuleNotFoundError a --plugin that does not exist.
    return (ValueError, KeyError, TypeError, BackendError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, FileExistsError, ModuleNotFoundError)


def one_line(e: BaseException) -> str:
    """The message on one line (KeyError quotes its text; multi-line messages list reasons)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text or type(e).__name__


def report(command: str, e: BaseException) -> int:
    """Print ``e`` as the one-line error of ``command``; the exit status."""
    if isinstance(e, KeyboardInterrupt):
        print(f"vlcore {command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    if isinstance(e, _user_error_types()):
        print(f"vlcore {command}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR
    print(f"vlcore {command}: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the "
          "traceback)", file=sys.stderr)
    return INTERNAL_ERROR
