"""What keeps a run from losing work: non-finite steps are skipped, not applied; SIGINT/SIGTERM stop it cleanly.

* :class:`NonFiniteSteps`: a step whose loss or gradient norm is NaN/inf leaves weights, optimizer, scheduler and
  the model's buffers (running statistics, EMA codebooks, step counters) exactly as they were; it is counted, and
  ``max_consecutive`` skips in a row stop the run (the last checkpoint, written before them, stays the newest).
* :class:`StopRequests`: the first SIGINT or SIGTERM only sets a flag that the loop reads between steps (so it
  can save a consistent checkpoint); a second one stops at once without saving.
* :class:`RunStopped`: a ``SystemExit`` with the process exit code, raised after the one-line reason is printed,
  so ``vlcore pretrain`` ends without a traceback and callers in Python can still catch it.
"""

from __future__ import annotations

import math
import signal
import sys
import threading

import torch

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class RunStopped(SystemExit):
    """The run stopped before its last step for a reason already printed (``message``); ``code`` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message


class NonFiniteSteps:
    """Decides per step whether the update is applied; counts skipped steps and consecutive ones."""

    def __init__(self, max_consecutive: int, skipped: int = 0):
        if max_consecutive < 1:
            raise ValueError(f"--max-skipped-steps must be >= 1; got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = skipped  # over the whole run (restored on resume)
        self.consecutive = 0
        self.first_of_streak = 0

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when step ``step`` (1-based) may be applied; records it as skipped otherwise."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self.first_of_streak = step
        return False

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self, step: int, last_checkpoint: str | None) -> str:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        return (f"vlcore pretrain: stopped at step {step}: {self.consecutive} consecutive steps "
                f"({self.first_of_streak}..{step}) had a non-finite loss or gradient and were skipped "
                f"(--max-skipped-steps {self.max_consecutive}); {kept}; lower --lr, raise --warmup or use "
                f"--precision fp32")


class BufferSnapshot:
    """A copy of a module's buffers, to undo what a forward pass wrote into them (EMA codebooks, BN statistics)."""

    def __init__(self, module: torch.nn.Module):
        self._pairs = [(b, b.detach().clone()) for b in module.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self._pairs:
                live.copy_(saved)


class StopRequests:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of raising; restored on exit.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) this does nothing.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT.get(self.signum, 128 + int(self.signum or 0))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        # A second signal: the user does not want to wait for the step and the checkpoint.
        message = f"{signal.Signals(signum).name} again: stopped without saving the current step"
        print(message, file=sys.stderr, flush=True)
        raise RunStopped(SIGNAL_EXIT.get(signum, 128 + signum), message)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_EXIT:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
