"""One way to time and measure every op against its peers, and to write the results.

A benchmark script defines *cases* (dicts of sizes), *providers* (name -> factory) and calls :func:`sweep`:

    def vlcore_triton(case):               # a provider: build inputs, return a Bench
        q = torch.randn(..., requires_grad=True)
        return Bench(fwd=lambda: vlcore.attention(q, k, v), inputs=[q, k, v])
    rows = sweep("attention", cases, {"vlcore-triton": vlcore_triton, ...}, modes=("fwd", "bwd", "fwd_bwd"),
                 flops=lambda case, mode: ...)
    write_results("attention", rows, x="N", title="PrefixLM attention")

A provider that cannot run a case raises :class:`Unsupported` (or any exception): the row is kept with the
reason, never silently dropped. Timing: ``triton.testing.do_bench`` on CUDA (median, p20, p80 in ms); on
CPU a perf_counter loop with the same statistics. Memory: peak CUDA bytes allocated during one run above
what was allocated before it (inputs excluded); on CPU the peak is not measured (reported empty).
Results: ``benchmarks/results/<device>/<name>.{csv,md,png}`` and ``versions.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the scripts' --dtype names


class Unsupported(Exception):
    """Raised by a provider that cannot run a case; the message becomes the row's note."""


@dataclasses.dataclass
class Bench:
    """What a provider returns: ``fwd()`` builds the output (a tensor or a tuple of tensors); ``inputs``
    are the leaves the backward differentiates (may be empty for forward-only ops)."""

    fwd: Callable[[], Any]
    inputs: Sequence[torch.Tensor] = ()
    setup: Callable[[], Any] | None = None  # per-call work that must be counted (e.g. FlexAttention's mask)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _make_step(bench: Bench, mode: str) -> Callable[[], Any]:
    def forward():
        if bench.setup is not None:
            bench.setup()
        return bench.fwd()

    if mode == "fwd":
        return forward
    if not bench.inputs:
        raise Unsupported("no differentiable inputs")
    grads_cache: dict[str, Any] = {}

    def backward_of(out):
        outs = _outputs(out)
        if not outs:
            raise Unsupported("output does not require grad")
        if "g" not in grads_cache:
            grads_cache["g"] = [torch.randn_like(o) for o in outs]
        return torch.autograd.grad(outs, list(bench.inputs), grads_cache["g"], retain_graph=(mode == "bwd"),
                                   allow_unused=True)

    if mode == "fwd_bwd":
        return lambda: backward_of(forward())
    if mode == "bwd":
        out = forward()
        return lambda: backward_of(out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def time_ms(fn: Callable[[], Any], *, device: torch.device, warmup: int = 3, reps: int = 10) -> dict[str, float]:
    """Median, p20 and p80 of one call of ``fn`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": qs[1], "p80_ms": qs[7]}


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device) -> int | None:
    """Peak CUDA memory of one call above what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def sweep(name: str, cases: Sequence[dict[str, Any]], providers: dict[str, Callable[[dict], Bench]], *,
          modes: Sequence[str] = MODES, flops: Callable[[dict, str], float] | None = None,
          bytes_moved: Callable[[dict, str], float] | None = None, device: torch.device | None = None,
          warmup: int = 3, reps: int = 10, verbose: bool = True) -> list[dict[str, Any]]:
    """Every case × provider × mode: a row with time, peak memory, TFLOP/s and GB/s where given."""
    device = device or default_device()
    rows = []
    for case in cases:
        for pname, factory in providers.items():
            for mode in modes:
                row = {"bench": name, **case, "provider": pname, "mode": mode, "median_ms": math.nan,
                       "p20_ms": math.nan, "p80_ms": math.nan, "peak_mem_mb": math.nan, "tflops": math.nan,
                       "gbps": math.nan, "note": ""}
                try:
                    bench = factory(case)
                    step = _make_step(bench, mode)
                    row.update(time_ms(step, device=device, warmup=warmup, reps=reps))
                    peak = peak_memory_bytes(step, device=device)
                    if peak is not None:
                        row["peak_mem_mb"] = peak / 2**20
                    if flops is not None:
                        row["tflops"] = flops(case, mode) / (row["median_ms"] * 1e-3) / 1e12
                    if bytes_moved is not None:
                        row["gbps"] = bytes_moved(case, mode) / (row["median_ms"] * 1e-3) / 1e9
                except Unsupported as e:
                    row["note"] = f"unsupported: {e}"
                except Exception as e:  # a peer failing (OOM, missing backend) is a result, not a crash
                    row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                finally:
                    bench = step = None  # noqa: F841  (free the inputs before the next provider)
                rows.append(row)
                if verbose:
                    _print_row(row)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    keys = [k for k in row if k not in ("bench", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops", "gbps",
                                        "note")]
    head = " ".join(f"{k}={row[k]}" for k in keys)
    if row["note"]:
        print(f"{head}: {row['note']}", flush=True)
        return
    extra = "".join(f" {v:.1f} {u}" for v, u in ((row["tflops"], "TFLOP/s"), (row["gbps"], "GB/s"),
                                                  (row["peak_mem_mb"], "MiB")) if not math.isnan(v))
    print(f"{head}: {row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}){extra}", flush=True)


def versions() -> dict[str, Any]:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import vlcore

    info["vlcore"] = vlcore.__version__
    return info


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: Sequence[dict[str, Any]], *, x: str | None = None, title: str = "",
                  out_dir: Path | None = None) -> Path:
    """Write ``<name>.csv``, ``<name>.md`` (with versions) and, when matplotlib is importable and ``x`` names
    a case column, ``<name>.png`` (median time vs x, one line per provider and mode)."""
    out = Path(out_dir) if out_dir else RESULTS / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    meta = versions()
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    header = f"# {title or name}\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n"
    (out / f"{name}.md").write_text(header + markdown_table(rows))
    if x is not None and rows:
        _plot(rows, x, out / f"{name}.png", title or name)
    return out


def _plot(rows, x, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written for {path.name}; pip install 'vlcore[bench]')")
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for prov in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r[x], r["median_ms"]) for r in rows
                         if r["provider"] == prov and r["mode"] == mode and not math.isnan(r["median_ms"]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_title(f"{title} — {mode}")
        ax.set_xlabel(x)
        ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (CPU smoke run / CI)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--providers", default="", help="comma-separated subset of providers to run")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    return p


def finish(args: argparse.Namespace, name: str, rows: Sequence[dict[str, Any]], *, x: str, title: str) -> None:
    """The end of every bench script: write the results unless ``--no-write`` and say where."""
    if not args.no_write:
        print(f"results in {write_results(name, rows, x=x, title=title, out_dir=args.out)}")


def select_providers(providers: dict[str, Callable], wanted: str) -> dict[str, Callable]:
    if not wanted:
        return providers
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in providers]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; available: {sorted(providers)}")
    return {n: providers[n] for n in names}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")
