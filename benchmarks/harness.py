"""One harness for every op's benchmarks: the case definitions, the providers and the measurement are written once
and driven two ways — a script / ``run_all.py`` sweep, and ``pytest benchmarks/ --benchmark-only``.

A benchmark script defines a :class:`Suite`: cases per *size set* (``quick`` smoke sizes, ``cpu`` sizes, ``gpu``
sizes; the default is chosen by the device), *providers* (name -> factory returning a :class:`Bench`), modes:

    def vlcore_cpu(case):                  # a provider: build inputs, return a Bench
        q = torch.randn(..., requires_grad=True)
        return Bench(fwd=lambda: vlcore.attention(q, k, v), inputs=[q, k, v])
    SUITE = Suite("attention", "PrefixLM attention", x="N", cases=cases, providers={"vlcore-cpu": vlcore_cpu},
                  modes=("fwd", "fwd_bwd"), flops=flops)

:func:`measure` runs one (case, provider, mode) with a timer and returns a row; :func:`sweep` (the scripts) times
with :func:`time_ms`, ``benchmarks/test_benchmarks.py`` with pytest-benchmark's fixture — the same rows either way,
written by :func:`write_results`. A provider that cannot run a case raises :class:`Unsupported`: the row keeps the
reason (pytest reports it as a skip with that reason), never silently dropped; any other exception is an error.
Timing: ``triton.testing.do_bench`` on CUDA (median, p20, p80 in ms); on CPU a perf_counter loop; every row also
has the minimum (``min_ms``), the statistic to read on a shared machine. Memory: peak bytes allocated during one
run above what was allocated before it (inputs excluded) — CUDA's allocator statistics, on CPU the allocation
events of torch's profiler. Results: ``benchmarks/results/<device>/<name>.{csv,md,png}`` and ``versions.json``
(``<device>`` is ``cpu`` on CPU, the GPU's name otherwise).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
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
SIZES = ("quick", "cpu", "gpu")  # the size sets every suite defines
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
    no_backward: str = ""  # why this provider has no backward (its bwd / fwd_bwd rows are unsupported with it)


@dataclasses.dataclass
class Suite:
    """One op's benchmark: ``cases(size, opts)`` lists the case dicts of a size set (``opts``: the script's extra
    options, ``{}`` under pytest), ``providers`` maps names to factories, ``x`` is the case column on the plots'
    x axis (every other case column that varies makes its own panel)."""

    name: str
    title: str
    x: str
    cases: Callable[[str, dict], list[dict[str, Any]]]
    providers: dict[str, Callable[[dict], Bench]]
    modes: Callable[[str], Sequence[str]] = lambda size: MODES
    flops: Callable[[dict, str], float] | None = None
    bytes_moved: Callable[[dict, str], float] | None = None
    reps: dict[str, int] = dataclasses.field(default_factory=lambda: {"quick": 2, "cpu": 7, "gpu": 10})
    warmup: dict[str, int] = dataclasses.field(default_factory=lambda: {"quick": 1, "cpu": 2, "gpu": 3})
    derived: Callable[[dict], dict] | None = None  # extra columns of a case (e.g. relpos's N), for tables and plots
    along: tuple[str, ...] = ()  # case columns that vary together with x (e.g. B = tokens / N): not a panel of their own
    summary: Callable[[list[dict]], str] | None = None  # a paragraph for the markdown (e.g. the target's ratio)

    def items(self, size: str, opts: dict | None = None, providers: Sequence[str] = ()):
        """Every (case, provider, mode) of a size set, in the order they run."""
        wanted = list(providers) or list(self.providers)
        for case in self.cases(size, opts or {}):
            for pname in wanted:
                for mode in self.modes(size):
                    yield case, pname, mode


def default_size() -> str:
    """The size set of this machine: ``gpu`` with CUDA, ``cpu`` without."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def case_id(case: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def device_slug() -> str:
    """``cpu`` on CPU (the model is in versions.json), the GPU's name otherwise: ``benchmarks/results/<slug>/``."""
    if not torch.cuda.is_available():
        return "cpu"
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
    if bench.no_backward:
        raise Unsupported(bench.no_backward)
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

        med, p20, p80, low = do_bench(fn, quantiles=[0.5, 0.2, 0.8, 0.0], warmup=25, rep=100)
        return {"min_ms": low, "median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize_ms(times)


def summarize_ms(times: Sequence[float]) -> dict[str, float]:
    """min, median, p20, p80 of per-call times in ms."""
    times = list(times)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"min_ms": min(times), "median_ms": statistics.median(times), "p20_ms": qs[1], "p80_ms": qs[7]}


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device) -> int | None:
    """Peak memory of one call above what was allocated before it: CUDA's allocator statistics; on CPU the running
    sum of the profiler's allocation events (``profile_memory=True``), None if the profiler gives none."""
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out  # what the call returns counts until it is dropped, as a training step holds it
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def empty_row(bench: str, case: dict[str, Any], provider: str, mode: str) -> dict[str, Any]:
    return {"bench": bench, **case, "provider": provider, "mode": mode, "min_ms": math.nan, "median_ms": math.nan,
            "p20_ms": math.nan, "p80_ms": math.nan, "peak_mem_mb": math.nan, "tflops": math.nan, "gbps": math.nan,
            "note": ""}


def measure(suite: Suite, case: dict[str, Any], provider: str, mode: str, *,
            timer: Callable[[Callable[[], Any]], dict[str, float]], device: torch.device | None = None,
            memory: bool = True) -> dict[str, Any]:
    """One row: build the provider's Bench for the case, time ``mode`` with ``timer`` (a step -> stats in ms),
    then measure its peak memory; Unsupported and other exceptions become the row's note."""
    device = device or default_device()
    row = empty_row(suite.name, {**case, **(suite.derived(case) if suite.derived is not None else {})}, provider, mode)
    bench = step = None
    try:
        bench = suite.providers[provider](case)
        step = _make_step(bench, mode)
        row.update(timer(step))
        if memory:
            peak = peak_memory_bytes(step, device=device)
            if peak is not None:
                row["peak_mem_mb"] = peak / 2**20
        if suite.flops is not None:
            row["tflops"] = suite.flops(case, mode) / (row["median_ms"] * 1e-3) / 1e12
        if suite.bytes_moved is not None:
            row["gbps"] = suite.bytes_moved(case, mode) / (row["median_ms"] * 1e-3) / 1e9
    except Unsupported as e:
        row["note"] = f"unsupported: {e}"
    except Exception as e:  # a peer failing (OOM, missing backend) is a result, not a crash
        row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        bench = step = None  # noqa: F841  (free the inputs before the next provider)
    return row


def run_suite(suite: Suite, size: str, opts: dict | None = None, providers: Sequence[str] = (),
              verbose: bool = True) -> list[dict[str, Any]]:
    """The script / run_all path: every item of a size set timed with :func:`time_ms`."""
    device = default_device()
    timer = functools.partial(time_ms, device=device, warmup=suite.warmup[size], reps=suite.reps[size])
    rows = []
    for case, pname, mode in suite.items(size, opts, providers):
        rows.append(measure(suite, case, pname, mode, timer=timer, device=device))
        if verbose:
            _print_row(rows[-1])
    return rows


def sweep(name: str, cases: Sequence[dict[str, Any]], providers: dict[str, Callable[[dict], Bench]], *,
          modes: Sequence[str] = MODES, flops: Callable[[dict, str], float] | None = None,
          bytes_moved: Callable[[dict, str], float] | None = None, device: torch.device | None = None,
          warmup: int = 3, reps: int = 10, verbose: bool = True) -> list[dict[str, Any]]:
    """Every case × provider × mode: a row with time, peak memory, TFLOP/s and GB/s where given."""
    suite = Suite(name, name, x="", cases=lambda size, opts: list(cases), providers=dict(providers),
                  modes=lambda size: modes, flops=flops, bytes_moved=bytes_moved)
    device = device or default_device()
    timer = functools.partial(time_ms, device=device, warmup=warmup, reps=reps)
    rows = []
    for case, pname, mode in suite.items("quick"):
        rows.append(measure(suite, case, pname, mode, timer=timer, device=device))
        if verbose:
            _print_row(rows[-1])
    return rows


def _print_row(row: dict[str, Any]) -> None:
    keys = [k for k in row if k not in ("bench", "min_ms", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops",
                                        "gbps", "note")]
    head = " ".join(f"{k}={row[k]}" for k in keys)
    if row["note"]:
        print(f"{head}: {row['note']}", flush=True)
        return
    extra = "".join(f" {v:.1f} {u}" for v, u in ((row["tflops"], "TFLOP/s"), (row["gbps"], "GB/s"),
                                                  (row["peak_mem_mb"], "MiB")) if not math.isnan(v))
    print(f"{head}: {row['median_ms']:.3f} ms (min {row['min_ms']:.3f}, p20 {row['p20_ms']:.3f}, p80 "
          f"{row['p80_ms']:.3f}){extra}", flush=True)


def versions() -> dict[str, Any]:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "cpu": _cpu_model()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import vlcore

    info["vlcore"] = vlcore.__version__
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


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


NOTE = ("Times are per call in ms: ``min_ms`` is the minimum over the repeats (the statistic to compare on a shared "
        "machine: noise from other processes only ever adds time), ``median_ms``/``p20_ms``/``p80_ms`` show the "
        "spread. ``peak_mem_mb``: peak bytes allocated by one call above what was allocated before it (inputs "
        "excluded). A provider that cannot run a case keeps its row with the reason in ``note``.")


def write_results(name: str, rows: Sequence[dict[str, Any]], *, x: str | None = None, title: str = "",
                  out_dir: Path | None = None, along: Sequence[str] = (), summary: str = "") -> Path:
    """Write ``<name>.csv``, ``<name>.md`` (with versions, how to read it and ``summary``) and, when matplotlib
    is importable and ``x`` names a case column, ``<name>.png`` (see :func:`plot`)."""
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
    header = f"# {title or name}\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n" + NOTE + "\n\n"
    if summary:
        header += summary.rstrip() + "\n\n"
    (out / f"{name}.md").write_text(header + markdown_table(rows))
    if x is not None and rows:
        plot(rows, x, out / f"{name}.png", title or name, along=along)
    return out


_STAT_COLS = ("bench", "provider", "min_ms", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops", "gbps", "note")


def panels(rows: Sequence[dict[str, Any]], x: str, along: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by configuration: every column that is not ``x``, a statistic, the provider, or a column that
    varies together with x (``along``). A line never leaves its panel, so it never joins configurations."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = ", ".join(f"{k}={v}" for k, v in r.items() if k not in _STAT_COLS and k != x and k not in along)
        out.setdefault(key, []).append(r)
    return out


def _spans_decades(values: Sequence[float]) -> bool:
    values = [v for v in values if isinstance(v, (int, float)) and v > 0 and not math.isnan(v)]
    return bool(values) and max(values) / min(values) >= 10


def plot(rows, x, path, title, along: Sequence[str] = ()):
    """One panel pair per configuration (time | memory), a line per provider over ``x``; log axes where the values
    span a decade or more; unsupported/error rows are absent (their reasons are in the table)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written for {path.name}; pip install 'vlcore[bench]')")
        return
    import textwrap

    groups = {k: g for k, g in panels(rows, x, along).items() if any(not math.isnan(r["min_ms"]) for r in g)}
    if not groups:
        return
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    markers = "osD^vP*Xh<>"
    pairs_per_row = 2 if len(groups) > 1 else 1
    nrows = math.ceil(len(groups) / pairs_per_row)
    fig, axes = plt.subplots(nrows, 2 * pairs_per_row, figsize=(5.2 * 2 * pairs_per_row, 3.6 * nrows + 0.9),
                             squeeze=False, layout="constrained")
    for idx, (key, group) in enumerate(groups.items()):
        ax_t, ax_m = axes[idx // pairs_per_row][2 * (idx % pairs_per_row): 2 * (idx % pairs_per_row) + 2]
        for ax, col, label in ((ax_t, "min_ms", "time, min of repeats (ms)"), (ax_m, "peak_mem_mb", "peak memory (MiB)")):
            for prov in providers:
                pts = sorted((r[x], r[col]) for r in group if r["provider"] == prov and not math.isnan(r[col]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[providers.index(prov) % 11],
                            color=colors[prov], label=prov, linewidth=1.4, markersize=4)
            xs = [r[x] for r in group]
            if _spans_decades(xs):
                ax.set_xscale("log", base=2)
            if _spans_decades([r[col] for r in group]):
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title("\n".join(textwrap.wrap(key or "all cases", 48)) + ("" if col == "min_ms" else " — memory"),
                         fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    for ax in axes.flat[2 * len(groups):]:
        ax.set_visible(False)
    shown = [p for p in providers if any(r["provider"] == p and not math.isnan(r["min_ms"]) for r in rows)]
    handles = [plt.Line2D([], [], color=colors[p], marker=markers[providers.index(p) % 11], label=p) for p in shown]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(shown), 5), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (CPU smoke run / CI)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--providers", default="", help="comma-separated subset of providers to run")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    return p


def finish(args: argparse.Namespace, name: str, rows: Sequence[dict[str, Any]], *, x: str, title: str,
           along: Sequence[str] = ()) -> None:
    """The end of every bench script: write the results unless ``--no-write`` and say where."""
    if not args.no_write:
        print(f"results in {write_results(name, rows, x=x, title=title, out_dir=args.out, along=along)}")


def main(suite: Suite, argv=None, add_args: Callable[[argparse.ArgumentParser], None] | None = None
         ) -> list[dict[str, Any]]:
    """A bench script's command line: ``--quick`` (smoke sizes) or ``--size``, the suite's own options, a sweep,
    the results written."""
    parser = arg_parser(suite.title)
    parser.add_argument("--size", choices=SIZES, default=None, help="size set (default: gpu with CUDA, else cpu)")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else (args.size or default_size())
    wanted = list(select_providers(suite.providers, args.providers))
    rows = run_suite(suite, size, vars(args), providers=wanted)
    if not args.no_write:
        print(f"results in {write_suite(suite, rows, out_dir=args.out)}")
    return rows


def write_suite(suite: Suite, rows: Sequence[dict[str, Any]], out_dir: Path | None = None) -> Path:
    summary = suite.summary(list(rows)) if suite.summary is not None and rows else ""
    return write_results(suite.name, rows, x=suite.x, title=suite.title, out_dir=out_dir, along=suite.along,
                         summary=summary)


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
