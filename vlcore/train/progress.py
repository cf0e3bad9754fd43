"""Progress display (a bar on a terminal, plain lines otherwise), metrics JSONL and the loss plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(step, loss, samples_per_s)``: a redrawn bar on a TTY; on a pipe a line every ``every`` seconds."""

    def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True, every: float = 15.0,
                 width: int = 24):
        self.total, self.start = total, start
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.width = every, width
        self.t0 = time.perf_counter()
        self._last_print = -math.inf

    def line(self, step: int, loss: float, samples_per_s: float) -> str:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else math.inf
        frac = step / max(1, self.total)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        return (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] {100 * frac:3.0f}% "
                f"loss {loss:.4f}  {samples_per_s:,.0f} samples/s  elapsed {_fmt_time(elapsed)}  "
                f"eta {_fmt_time(eta)}")

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        final = step >= self.total
        if self.tty:
            if final or now - self._last_print >= 0.1:
                self.stream.write("\r" + self.line(step, loss, samples_per_s) + "\x1b[K")
                self.stream.flush()
                self._last_print = now
        elif final or step == self.start + 1 or now - self._last_print >= self.every:
            self.stream.write(self.line(step, loss, samples_per_s) + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON object a line; a resumed run appends after dropping records past its step."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> str:
    """Plot every loss and the learning rate against the step; returns a one-line note of what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib); metrics are in {metrics_path}"
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return "plot skipped: no metrics recorded"
    keys = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss/")})
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.5 if k == "loss" else 0.8)
    ax.set_ylabel("loss")
    if all(r[k] > 0 for r in records for k in keys if k in r):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in records], [r.get("lr", 0) for r in records], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return f"plot: {png_path}"
