"""One prepared GPU session: every native check of vlcore in one command, within a time budget (default 530 s,
fits the 9 minutes of one H200 run), writing everything under one folder.

    bash benchmarks/gpu_session.sh OUT [--budget 530] [--only build,gpu-tests] [--dry-run]

Each stage runs as its own process under ``timeout`` with its own budget (its share of ``--budget``, never more
than what is left); a failing or timed-out stage is recorded and the next one runs. The session always ends
with a summary table (stage, status, exit code, seconds, budget) in ``OUT/summary.md`` and on stdout.

``--dry-run`` (no GPU needed) runs each stage's CPU-side counterpart: the same scripts and test selections at
tiny sizes under the Triton interpreter, collection instead of a GPU test run, the build's configuration
instead of the nvcc build. It proves the session's own logic before device minutes are spent.

What comes back from a device run is limited (8 files, no deep folders), so OUT holds: ``summary.md``,
``session.log`` (every stage's output in order), ``junit-gpu.xml``, ``junit-kernels.xml`` and ``details.tar.gz``
(each stage's log and files: benchmark results, the resource report, the training run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)
KERNEL_TESTS = ("tests/test_attention_kernels.py tests/test_relpos_kernels.py tests/test_contrastive_kernels.py "
                "tests/test_vq_kernels.py tests/test_pool_kernels.py")
FULL_BUDGET = 530  # the budget the stage shares below add up to


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    share: int          # seconds of a FULL_BUDGET session
    gpu: str            # bash command on the GPU machine ({work} = this stage's folder, {out} = OUT)
    dry: str            # the CPU-side counterpart for --dry-run ("" = nothing to run on CPU: recorded as such)
    what: str


def _pytest(selection: str, junit: str, extra: str = "") -> str:
    # xdist (in the device image) spreads the Triton compiles over the CPU cores; one GPU serves all workers
    # and pytest-timeout (also there) turns a hung test into one failure instead of a lost stage
    return (f"XDIST=$({PY} -c 'import xdist' 2>/dev/null && echo '-n 8'); "
            f"TMO=$({PY} -c 'import pytest_timeout' 2>/dev/null && echo '--timeout=90'); "
            f"{PY} -m pytest -q -rfE -p no:cacheprovider $XDIST $TMO {extra} --junitxml={{out}}/{junit} {selection}")


STAGES = (
    Stage("nvidia-smi", 5, "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit "
          "--format=csv && nvidia-smi -L", "command -v nvidia-smi || echo 'no nvidia-smi here'",
          "the GPU, driver, memory"),
    Stage("versions", 10, f"{PY} benchmarks/gpu_session.py --versions; nvcc --version | tail -2",
          f"{PY} benchmarks/gpu_session.py --versions", "python, torch, triton, CUDA, nvcc, peers"),
    Stage("wheels", 10, f"cat {{work}}/install.log 2>/dev/null; {PY} -c 'import xformers, open_clip; "
          "print(\"xformers\", xformers.__version__, \"open_clip\", open_clip.__version__)'",
          "ls -l .whl/*.whl 2>/dev/null || echo 'no .whl/ here (benchmarks/fetch_wheels.sh fetches them)'",
          "peers carried as wheels in .whl/ (installed by gpu_session.sh into a --target folder)"),
    Stage("install", 20, f"VLCORE_BUILD_CUDA=0 {PY} -m pip install -q --no-build-isolation --no-deps --no-index "
          "-e .", f"{PY} -c 'import vlcore.kernels, vlcore; print(\"vlcore\", vlcore.__version__, \"importable\")'",
          "pip install -e . without the extension (the later stages need vlcore importable even if nvcc fails)"),
    Stage("build", 90, "TIMEFORMAT='build wall %R s'; time VLCORE_BUILD_CUDA=1 VLCORE_CUDA_ARCHS=90 "
          f"VLCORE_BUILD_JOBS=16 {PY} setup.py -q build_ext --inplace && {PY} -c 'import vlcore._C'",
          f"(nvcc --version || echo 'no nvcc here') | tail -1; VLCORE_BUILD_CUDA=1 VLCORE_CUDA_ARCHS=90 {PY} setup.py "
          "--version",
          "vlcore._C for sm_90 only, in place (timed)"),
    Stage("info", 10, f"{PY} -m vlcore.info", f"{PY} -m vlcore.info", "python -m vlcore.info"),
    Stage("gpu-tests", 110, _pytest("tests", "junit-gpu.xml", "-m gpu"),
          f"{PY} -m pytest -q -p no:cacheprovider --collect-only -m gpu tests | tail -3",
          "every gpu-marked test (bf16/fp16/fp32 at GPU shapes)"),
    Stage("determinism", 40, f"{PY} benchmarks/gpu_checks.py determinism",
          f"{PY} benchmarks/gpu_checks.py determinism", "dtable/dq/dk/dv bitwise equal across two processes"),
    Stage("cuda-backends", 20, f"{PY} benchmarks/gpu_checks.py cuda-backends --require-cuda",
          f"{PY} benchmarks/gpu_checks.py cuda-backends", "vlcore._C (backend='cuda') against the references"),
    Stage("compile", 60, f"{PY} benchmarks/gpu_checks.py compile --backend inductor",
          f"{PY} benchmarks/gpu_checks.py compile --backend aot_eager",
          "torch.compile(fullgraph=True, inductor) against eager"),
    Stage("train", 45, f"{PY} -m vlcore.cli pretrain --model coca-base --precision bf16 --device cuda --steps 4 "
          "--batch-size 16 --log-every 1 --eval off --save-every 1000 --quiet --out-dir {work}/run",
          f"{PY} -m vlcore.cli pretrain --model coca-tiny --precision fp32 --device cpu --steps 1 --batch-size 4 "
          "--log-every 1 --eval off --save-every 1000 --quiet --out-dir {work}/run",
          "end-to-end bf16 coca-base training steps"),
    Stage("kernel-tests", 45, _pytest(KERNEL_TESTS, "junit-kernels.xml", "-m 'not gpu'"),
          f"{PY} -m pytest -q -p no:cacheprovider --collect-only -m 'not gpu' {KERNEL_TESTS} | tail -3",
          "the kernel test files natively (their CPU-interpreter cases now on the GPU)"),
    Stage("bench-quick", 40, f"{PY} benchmarks/run_all.py --quick --out {{work}}/bench",
          f"{PY} benchmarks/run_all.py --help > /dev/null && echo 'run_all options parse'",
          "benchmarks/run_all.py --quick (with the quick resource report)"),
    Stage("resources", 25, f"{PY} benchmarks/kernel_resources.py --jobs 16 --out {{work}} "
          "--deadline $((STAGE_SECONDS - 15))",
          f"{PY} benchmarks/kernel_resources.py --help > /dev/null && echo 'kernel_resources options parse'",
          "static resource report, every variant (sm_90, sm_80)"),
)
assert sum(s.share for s in STAGES) == FULL_BUDGET

TIMED_OUT = (124, 137)  # timeout's exit status (and SIGKILL after its grace period)
SKIPPED = 3             # gpu_checks.py: what the check needs is missing here


@dataclasses.dataclass
class Result:
    stage: str
    status: str  # passed, failed, timed out, skipped, not run
    rc: int | None
    seconds: float
    budget: int
    note: str = ""


def versions() -> str:
    import importlib.metadata as md
    import platform

    lines = [f"python {platform.python_version()} ({sys.executable})"]
    for name in ("torch", "triton", "numpy", "pytest", "timm", "transformers", "torchvision", "xformers",
                 "open_clip_torch", "flash_attn", "vlcore"):
        try:
            lines.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    try:
        import torch

        lines.append(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    except Exception as e:  # noqa: BLE001 - a version line must never crash the session
        lines.append(f"torch: {e}")
    return "\n".join(lines)


DRY_STAGE_LIMIT = 120  # a dry run's CPU counterparts are slower than the GPU stages and unrelated to their shares


def stage_budget(stage: Stage, budget: int, left: float, is_last: bool, dry: bool = False) -> int:
    """This stage's seconds: its share of the session budget, never more than what is left; the last stage gets
    all that is left."""
    share = DRY_STAGE_LIMIT if dry else left if is_last else stage.share * budget / FULL_BUDGET
    return int(max(0, min(share, left)))


def run_stage(stage: Stage, seconds: int, dry: bool, out: Path, log) -> Result:
    work = out / "stages" / stage.name
    work.mkdir(parents=True, exist_ok=True)
    cmd = (stage.dry if dry else stage.gpu).format(work=shlex.quote(str(work)), out=shlex.quote(str(out)))
    if not cmd:
        return Result(stage.name, "skipped", None, 0.0, seconds, "nothing to run on CPU")
    if seconds < 3:
        return Result(stage.name, "not run", None, 0.0, seconds, "session budget used up")
    header = f"\n===== {stage.name} ({stage.what}); budget {seconds} s\n$ {cmd}\n"
    log.write(header)
    log.flush()
    print(header, end="", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", STAGE_SECONDS=str(seconds))  # a stage may pace itself by it
    t0 = time.time()
    with open(work / "stage.log", "w") as stage_log:
        # timeout(1) kills the whole stage (pytest workers, compilers) at its budget; -k: SIGKILL 5 s later
        proc = subprocess.Popen(["timeout", "-k", "5", str(seconds), "bash", "-c", cmd], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            stage_log.write(line)
            log.write(line)
            sys.stdout.write(line)
        rc = proc.wait()
    took = time.time() - t0
    status = ("timed out" if rc in TIMED_OUT else "passed" if rc == 0 else "skipped" if rc == SKIPPED
              else "failed")
    note = "dry run (CPU counterpart)" if dry else ""
    log.write(f"===== {stage.name}: {status} (exit {rc}) in {took:.1f} s\n")
    return Result(stage.name, status, rc, took, seconds, note)


def summary(results: list[Result], budget: int, wall: float, dry: bool) -> str:
    lines = [f"# GPU session summary{' (dry run on CPU)' if dry else ''}", "",
             f"budget {budget} s, wall {wall:.0f} s; " + ", ".join(
                 f"{sum(r.status == s for r in results)} {s}" for s in ("passed", "failed", "timed out", "skipped",
                                                                          "not run")), "",
             "| stage | status | exit | seconds | budget s | what | note |", "|---|---|---|---|---|---|---|"]
    what = {s.name: s.what for s in STAGES}
    for r in results:
        lines.append(f"| {r.stage} | {r.status} | {'' if r.rc is None else r.rc} | {r.seconds:.1f} | {r.budget} | "
                     f"{what.get(r.stage, '')} | {r.note} |")
    return "\n".join(lines) + "\n"


PACK_FILE_LIMIT = 4 << 20  # bytes; larger files (checkpoints) are listed in session.log, not packed


def pack(out: Path, log) -> None:
    """Fold the per-stage folders into details.tar.gz (a device run brings back only a few top-level files, at most
    16 MiB each): training checkpoints and other large files stay out."""
    stages = out / "stages"
    if not stages.is_dir():
        return

    def small(info: tarfile.TarInfo):
        if info.isfile() and info.size > PACK_FILE_LIMIT:
            log.write(f"not packed (over {PACK_FILE_LIMIT >> 20} MiB): {info.name} ({info.size} bytes)\n")
            return None
        return info

    with tarfile.open(out / "details.tar.gz", "w:gz") as tar:
        tar.add(stages, arcname="stages", filter=small)
    shutil.rmtree(stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="folder for everything the session writes")
    p.add_argument("--budget", type=int, default=FULL_BUDGET, help="seconds for the whole session (default 530)")
    p.add_argument("--only", default="", help=f"comma-separated stages: {','.join(s.name for s in STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="CPU counterpart of every stage (no GPU)")
    p.add_argument("--versions", action="store_true", help="print the versions and exit (a stage's helper)")
    args = p.parse_args(argv)
    if args.versions:
        print(versions())
        return 0
    if not args.out:
        p.error("the output folder is required, e.g. bash benchmarks/gpu_session.sh \"$OUT\"")
    if args.budget < 30:
        p.error(f"--budget: at least 30 seconds, got {args.budget}")
    names = [s.name for s in STAGES]
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    stages = [s for s in STAGES if s.name in wanted]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, reserve = time.time(), 8  # seconds kept for the summary and the packing
    results = []
    with open(out / "session.log", "w") as log:
        for i, stage in enumerate(stages):
            left = args.budget - reserve - (time.time() - start)
            seconds = stage_budget(stage, args.budget, left, i == len(stages) - 1, args.dry_run)
            try:
                results.append(run_stage(stage, seconds, args.dry_run, out, log))
            except Exception as e:  # noqa: BLE001 - the session must reach its summary
                results.append(Result(stage.name, "failed", None, 0.0, seconds, f"session error: {e}"))
        text = summary(results, args.budget, time.time() - start, args.dry_run)
        log.write("\n" + text)
        pack(out, log)
    (out / "summary.md").write_text(text)
    print("\n" + text, end="")
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
