"""Run every benchmark script (``benchmarks/bench_*.py``) in one go and write their results.

    python benchmarks/run_all.py --quick        # tiny sizes (CPU smoke run, or a fast GPU pass)
    python benchmarks/run_all.py                # full sweeps (GPU)
    python benchmarks/run_all.py --only attention,vq
    python benchmarks/run_all.py --only resources   # just the static resource report (kernel_resources.py)
    python benchmarks/run_all.py --pytest       # the same suites through pytest-benchmark (+ its JSON, compare)

Each script runs in its own process (a failing one is reported and the others still run); the exit code is
non-zero if any failed. The size set is the device's (``gpu`` with CUDA, ``cpu`` without; ``--quick``: smoke
sizes). ``--pytest`` runs the same suites (cases, providers, :func:`harness.measure`) as one
``pytest benchmarks/ --benchmark-only`` session instead: pytest-benchmark's JSON is saved beside the tables. Results land in benchmarks/results/<device>/ with the versions and a raw log. The last
step is the static resource report (``kernel_resources.py``: every kernel config compiled for sm_90/sm_80, no GPU
needed; ``--quick`` keeps the default configs), written to benchmarks/results/static/ (or <--out>/static).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    p.add_argument("--only", default="", help="comma-separated names (bench_<name>.py)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--pytest", action="store_true", help="time the suites with pytest-benchmark (one session)")
    args = p.parse_args(argv)
    steps = {s.stem[len("bench_"):]: s for s in sorted(HERE.glob("bench_*.py"))}
    steps["resources"] = HERE / "kernel_resources.py"
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = sorted(wanted - set(steps))
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(steps)}")
        steps = {name: s for name, s in steps.items() if name in wanted}
    scripts = list(steps.values())
    failed = []
    if args.pytest:
        suites = [name for name in steps if name != "resources"]
        cmd = [sys.executable, "-m", "pytest", str(HERE / "test_benchmarks.py"), "--benchmark-only", "-q", "-rs",
               "-k", " or ".join(f"{name}-" for name in suites)]
        cmd += (["--bench-size", "quick"] if args.quick else []) + (["--bench-out", args.out] if args.out else [])
        print(f"== pytest-benchmark: {' '.join(cmd[1:])}", flush=True)
        if subprocess.call(cmd, cwd=HERE.parent):
            failed.append("pytest-benchmark")
        steps = {name: s for name, s in steps.items() if name == "resources"}
    for name, script in steps.items():
        out = args.out if name != "resources" or not args.out else str(Path(args.out) / "static")
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else []) + (["--out", out] if out else [])
        print(f"== {script.name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"== {script.name}: exit {rc} in {time.time() - t0:.1f} s", flush=True)
        if rc:
            failed.append(script.name)
    print(f"{len(scripts) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
