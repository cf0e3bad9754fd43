"""Static resource report: every Triton kernel config, compiled for sm_90 and sm_80 without a GPU.

    python benchmarks/kernel_resources.py                 # every variant, both targets
    python benchmarks/kernel_resources.py --quick         # the default (deterministic-mode) variants only
    vlcore bench --resources [--quick]

Each kernel module ``vlcore.kernels.<op>`` exposes ``static_variants() -> list[KernelVariant]`` (see
``kernels/_launch.py``): every config its launcher may pick, with the signature, constexprs and the 16-byte
divisibility hints a real launch has. Each variant is compiled with ``triton.compile`` for a ``GPUTarget`` (no
driver needed); the cubin's registers, stack (spill) bytes and static shared memory are read with
``cuobjdump --dump-resource-usage``, Triton's dynamic shared memory from the compiled metadata, and the PTX is
searched for the instructions that decide speed: ``wgmma`` (Hopper tensor cores), ``mma.sync`` (Ampere tensor
cores), ``cp.async`` (asynchronous global→shared copies) and ``cp.async.bulk.tensor`` (TMA).

Writes ``resources.md`` and ``resources.csv`` (default ``benchmarks/results/static/``). Exit status 1 when a
*default* variant spills, exceeds its target's shared memory or fails to compile: those are the configs the
deterministic mode runs, so they must be sound on every GPU they target.

Compiles run in worker processes (``spawn``, with ``TRITON_INTERPRET=0``: under the interpreter ``@triton.jit``
returns an object that cannot be compiled) and are cached by a hash of the kernel source, the arguments, the
target and the Triton version, so an unchanged kernel is never compiled twice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "static"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlcore" / "kernel_resources"
KERNEL_MODULES = ("attention", "contrastive", "vq")
DEFAULT_PROVIDERS = tuple(f"vlcore.kernels.{m}:static_variants" for m in KERNEL_MODULES)

# Shared memory one block may use (opt-in maximum), by compute capability.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}

# PTX patterns per instruction family (counted per line: one instruction per line in Triton's PTX).
PTX_PATTERNS = {
    "wgmma": re.compile(r"\bwgmma\.mma_async"),
    "mma.sync": re.compile(r"\bmma\.sync"),
    "cp.async": re.compile(r"\bcp\.async\.(?:ca|cg)\b"),
    "tma": re.compile(r"\bcp\.async\.bulk\.tensor"),
    # 16-byte global loads: present only when the divisibility hints reached the compiler
    "ld.v4": re.compile(r"\bld\.global(?:\.\w+)*\.v4\b"),
}

COLUMNS = ("kernel", "dtype", "dim", "flags", "config", "target", "registers", "spill_bytes", "smem_bytes",
           "wgmma", "mma.sync", "cp.async", "tma", "ld.v4", "default", "problem")


# ---- parsing -------------------------------------------------------------------------------------------------
def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": .., "STACK": .., "SHARED": .., ...}}."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return usage


def count_instructions(ptx: str) -> dict[str, int]:
    """How many PTX lines use each instruction family of :data:`PTX_PATTERNS`."""
    counts = dict.fromkeys(PTX_PATTERNS, 0)
    for line in ptx.splitlines():
        for name, pattern in PTX_PATTERNS.items():
            if pattern.search(line):
                counts[name] += 1
    return counts


def find_cuobjdump() -> str:
    """Triton's bundled cuobjdump (same CUDA release as its ptxas), else the toolkit's."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    for candidate in (shutil.which("cuobjdump"), os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/cuobjdump"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("cuobjdump not found: neither in triton/backends/nvidia/bin nor on PATH / CUDA_HOME")


# ---- compiling one variant (runs in a worker process) ----------------------------------------------------------
def divisibility_attrs(fn, backend, divisible) -> dict:
    """The ``attrs`` of an ``ASTSource``: argument index path -> [["tt.divisibility", 16]].

    Triton >= 3.3 (3.6 and 3.9 included) key attributes by the argument's index path and let the backend turn the
    launcher's specialisation letter "D" (16-divisible) into attributes; older releases used AttrsDescriptor."""
    unknown = [name for name in divisible if name not in fn.arg_names]
    if unknown:
        raise ValueError(f"divisible names {unknown} are not arguments of {fn.__name__}{tuple(fn.arg_names)}")
    parse = getattr(backend, "parse_attr", None)
    attr = parse("D") if parse is not None else [["tt.divisibility", 16]]
    return {(fn.arg_names.index(name),): attr for name in divisible}


def variant_key(variant, cc: int) -> str:
    """Cache key: kernel source (with the jit functions it calls), arguments, config, target, Triton version."""
    import triton

    parts = [variant.fn.cache_key, sorted(variant.signature.items()), sorted((k, repr(v)) for k, v in
             variant.constexprs.items()), variant.num_warps, variant.num_stages, sorted(variant.divisible), cc,
             triton.__version__]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def compile_variant(variant, cc: int) -> dict:
    """Compile ``variant`` for ``sm_<cc>`` and measure it: registers, spill bytes, shared memory, instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    src = ASTSource(variant.fn, dict(variant.signature), dict(variant.constexprs),
                    divisibility_attrs(variant.fn, backend, variant.divisible))
    compiled = triton.compile(src, target=target,
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([find_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    usage = parse_resource_usage(text)
    if not usage:
        raise RuntimeError(f"cuobjdump printed no function resource line:\n{text}")
    res = usage.get(compiled.metadata.name) or next(iter(usage.values()))
    # Triton's shared memory is dynamic (metadata.shared); cuobjdump's SHARED is the static part
    smem = int(compiled.metadata.shared) + res.get("SHARED", 0)
    return {"registers": res.get("REG", 0), "spill_bytes": res.get("STACK", 0),
            "smem_bytes": smem, **count_instructions(compiled.asm["ptx"])}


def _load(provider: str) -> list:
    module, _, attr = provider.partition(":")
    return list(getattr(importlib.import_module(module), attr or "static_variants")())


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def _job(provider: str, index: int, cc: int, cache_dir: str | None) -> dict:
    """One (variant, target) in a worker: from the cache, else compiled; an error becomes the row's problem."""
    variant = _load(provider)[index]
    try:
        key = variant_key(variant, cc)
    except Exception as e:  # noqa: BLE001 - reported in the row
        return {"error": f"{type(e).__name__}: {e}"}
    path = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    try:
        result = compile_variant(variant, cc)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash of the report
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


# ---- the report ------------------------------------------------------------------------------------------------
def config_text(variant) -> str:
    blocks = [f"{k}={v}" for k, v in variant.constexprs.items() if "BLOCK" in k]
    return " ".join(blocks + [f"w{variant.num_warps}", f"s{variant.num_stages}"])


def problem_of(row: dict, cc: int) -> str:
    """Why a measured row is unsound ('' when it is fine)."""
    if row.get("error"):
        return "compile error: " + row["error"]
    problems = []
    if row["spill_bytes"] > 0:
        problems.append(f"spills {row['spill_bytes']} B")
    limit = SMEM_LIMIT.get(cc)
    if limit is not None and row["smem_bytes"] > limit:
        problems.append(f"shared memory {row['smem_bytes']} B > {limit} B")
    return "; ".join(problems)


@dataclasses.dataclass
class Report:
    rows: list[dict]
    missing: list[str]  # "module: reason" for modules without static_variants()

    @property
    def failures(self) -> list[dict]:
        """Default variants that spill, overflow shared memory or do not compile."""
        return [r for r in self.rows if r["default"] and r["problem"]]


def variant_text(kernel, dtype, dim, flags) -> str:
    """What ``--only`` patterns match: e.g. "attention.fwd fp32 D=128 [prefix,kvlen,bias]"."""
    return f"{kernel} {dtype} D={dim} [{flags}]"


def selected(text: str, only) -> bool:
    return not only or any(re.search(pattern, text) for pattern in only)


def collect(providers=DEFAULT_PROVIDERS, quick: bool = False, only=()):
    """(provider, index, variant) for every variant to compile (those matching a pattern of ``only``, when given),
    and the modules that could not provide any."""
    jobs, missing = [], []
    for provider in providers:
        module, _, attr = provider.partition(":")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{module}: import failed ({type(e).__name__}: {e})")
            continue
        if not hasattr(mod, attr or "static_variants"):
            missing.append(f"{module}: no {attr or 'static_variants'}() (its configs are not in this report)")
            continue
        for index, variant in enumerate(_load(provider)):
            text = variant_text(variant.kernel, variant.dtype, "" if variant.dim is None else variant.dim,
                                variant.flags)
            if (variant.default or not quick) and selected(text, only):
                jobs.append((provider, index, variant))
    return jobs, missing


def _outcome(future) -> dict:
    error = future.exception()  # a worker that died (e.g. the compiler crashed) breaks the pool: still a row
    return future.result() if error is None else {"error": f"worker failed: {type(error).__name__}: {error}"}


def _run_jobs(work, jobs: int | None, cache_dir: str | None, deadline: float | None) -> list[dict]:
    """Each (provider, index, variant, cc) through a spawned worker; those not done by ``deadline`` (seconds)
    come back as errors saying so, and their workers are stopped."""
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the spawned workers inherit it before importing triton
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        futures = [pool.submit(_job, p, i, cc, cache_dir) for p, i, _, cc in work]
        done, _ = concurrent.futures.wait(futures, timeout=deadline)
        results = [_outcome(f) if f in done else {"error": f"not compiled: --deadline {deadline:g} s reached"}
                   for f in futures]
        if len(done) < len(futures):
            for proc in list(getattr(pool, "_processes", {}).values()):  # a compile in flight can take a minute
                proc.terminate()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return results


def build_report(providers=DEFAULT_PROVIDERS, targets=(90, 80), quick=False, jobs: int | None = None,
                 cache_dir: str | None = str(DEFAULT_CACHE), deadline: float | None = None, only=()) -> Report:
    variants, missing = collect(providers, quick, only)
    work = [(p, i, v, cc) for p, i, v in variants for cc in targets if cc in v.targets]
    # default variants first: under a deadline the configs the test gates on are measured before the others
    work.sort(key=lambda w: not w[2].default)
    results = _run_jobs(work, jobs, cache_dir, deadline) if work else []
    rows = []
    for (_, _, v, cc), res in zip(work, results):
        row = {"kernel": v.kernel, "dtype": v.dtype, "dim": "" if v.dim is None else v.dim, "flags": v.flags,
               "config": config_text(v), "target": f"sm_{cc}", "default": v.default, **res}
        for col in ("registers", "spill_bytes", "smem_bytes", *PTX_PATTERNS):
            row.setdefault(col, "")
        row["problem"] = problem_of(row, cc)
        rows.append(row)
    return Report(rows, missing)


def describe(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']} D={row['dim']} [{row['flags']}] {row['config']} {row['target']}"


def to_markdown(report: Report) -> str:
    head = ["kernel", "dtype", "dim", "flags", "config", "target", "registers", "spill B", "smem B",
            "instructions (PTX lines)", "default", "problem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        instrs = " ".join(f"{k}×{r[k]}" for k in PTX_PATTERNS if r[k]) if not r.get("error") else ""
        cells = [r["kernel"], r["dtype"], r["dim"], r["flags"], r["config"], r["target"], r["registers"],
                 r["spill_bytes"], r["smem_bytes"], instrs or "—", "yes" if r["default"] else "",
                 ("**" + r["problem"] + "**") if r["problem"] and r["default"] else r["problem"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    if report.missing:
        lines += [""] + [f"- {m}" for m in report.missing]
    fails = report.failures
    lines += ["", f"{len(report.rows)} rows; {len(fails)} default variant(s) spill, overflow shared memory or fail to "
              f"compile" + (": " + "; ".join(describe(r) for r in fails) if fails else ".")]
    return "\n".join(lines) + "\n"


def write(report: Report, out: Path, header: str = "") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "resources.md", out / "resources.csv"
    md.write_text(header + to_markdown(report))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report.rows:
            w.writerow(r)
    return md, csv_path


_INT_COLUMNS = ("registers", "spill_bytes", "smem_bytes", *PTX_PATTERNS)


def read_rows(csv_path: Path) -> list[dict]:
    """The rows of a written resources.csv, typed as :func:`build_report` makes them."""
    rows = []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            for col in _INT_COLUMNS:
                row[col] = int(row[col]) if row[col] not in ("", None) else ""
            row["default"] = row["default"] == "True"
            rows.append(row)
    return rows


def merge_rows(old: list[dict], new: list[dict], only) -> list[dict]:
    """``old`` with the rows ``only`` selects replaced by ``new`` (a report re-run for some kernels only): each
    new row takes the place of the first old row of its (kernel, dtype, dim, flags, target), else goes last."""
    key = lambda r: (r["kernel"], r["dtype"], str(r["dim"]), r["flags"], r["target"])
    slot = {}  # key -> (kept rows before it, its old position)
    kept = []
    for i, r in enumerate(old):
        if selected(variant_text(r["kernel"], r["dtype"], r["dim"], r["flags"]), only):
            slot.setdefault(key(r), (len(kept), i))
        else:
            kept.append(r)
    where = lambda ir: (*slot.get(key(ir[1]), (len(kept), len(old))), ir[0])
    placed = [r for _, r in sorted(enumerate(new), key=where)]
    out, j = [], 0
    for i, r in enumerate(kept + [None]):
        while j < len(placed) and slot.get(key(placed[j]), (len(kept),))[0] <= i:
            out.append(placed[j])
            j += 1
        if r is not None:
            out.append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the default (deterministic-mode) variants")
    p.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for resources.md/.csv (default {DEFAULT_OUT})")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--provider", action="append", default=None,
                   help="module:function returning KernelVariants (repeatable; default the vlcore kernel modules)")
    p.add_argument("--no-cache", action="store_true", help=f"always compile (cache: {DEFAULT_CACHE})")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds: variants not compiled by then are reported as such (default variants go first)")
    p.add_argument("--only", action="append", default=[],
                   help='regex on "KERNEL DTYPE D=DIM [FLAGS]" (repeatable): compile only the matching variants')
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace the matching rows of the existing resources.csv, keep the others")
    args = p.parse_args(argv)
    if args.merge and not args.only:
        p.error("--merge: needs --only (without it the whole report is rebuilt)")
    try:
        targets = tuple(int(t) for t in args.targets.split(",") if t.strip())
    except ValueError:
        p.error(f"--targets: expected compute capabilities like 90,80, got {args.targets!r}")
    import triton

    report = build_report(tuple(args.provider or DEFAULT_PROVIDERS), targets, args.quick, args.jobs,
                          None if args.no_cache else str(DEFAULT_CACHE), args.deadline, tuple(args.only))
    if args.merge:
        old = Path(args.out) / "resources.csv"
        if not old.is_file():
            p.error(f"--merge: no {old} to merge into")
        report = Report(merge_rows(read_rows(old), report.rows, args.only), report.missing)
    header = (f"# Static kernel resources ({'default variants' if args.quick else 'every variant'}; "
              f"triton {triton.__version__}; targets {', '.join(f'sm_{t}' for t in targets)})\n\n")
    md, csv_path = write(report, Path(args.out), header)
    print(to_markdown(report), end="")
    print(f"wrote {md} and {csv_path}")
    for r in report.failures:
        print(f"FAIL (default variant): {describe(r)}: {r['problem']}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
