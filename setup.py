"""Build of vlcore: the pure-Python package plus the optional CUDA extension ``vlcore._C``.

``kernels/`` and ``models/`` are top-level folders that install *inside* the package as ``vlcore.kernels`` and
``vlcore.models`` (``package_dir``), so nothing named ``kernels`` or ``models`` lands in site-packages.

CUDA build (never imports torch; the extension talks to tensors through raw pointers):
  VLCORE_BUILD_CUDA   auto (default: build when nvcc is found) | 1 (nvcc required, errors fail) | 0 (skip)
  VLCORE_CUDA_ARCHS   semicolon list of compute capabilities, default "80;90" ("90a" allowed)
  VLCORE_BUILD_JOBS   parallel nvcc jobs (default: bounded by cores and by memory, ~3 GiB a job)
  CUDA_HOME           toolkit root (default: from the nvcc on PATH, then /usr/local/cuda)
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _version() -> str:
    text = (ROOT / "vlcore" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _requirements(name: str) -> list[str]:
    path = ROOT / name
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _find_nvcc() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


def _cuda_home(nvcc: Path) -> Path:
    """The toolkit root holding include/cuda_runtime.h (nvcc on PATH may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parent.parent]
    text = nvcc.read_text(errors="ignore") if nvcc.stat().st_size < 4096 else ""
    m = re.search(r"(/\S+)/bin/nvcc", text)  # wrapper scripts: exec /usr/local/cuda-13.0/bin/nvcc "$@"
    if m:
        candidates.append(m.group(1))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise RuntimeError(f"found nvcc at {nvcc} but no CUDA toolkit with include/cuda_runtime.h; set CUDA_HOME")


def _nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _cxx_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError):
        return cxx


def _archs() -> list[str]:
    raw = os.environ.get("VLCORE_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise ValueError(f"VLCORE_CUDA_ARCHS: expected entries like 80;90;90a, got {raw!r}")
    return archs


def _parallel_jobs() -> int:
    if os.environ.get("VLCORE_BUILD_JOBS"):
        return max(1, int(os.environ["VLCORE_BUILD_JOBS"]))
    cores = os.cpu_count() or 1
    try:  # an nvcc job for two architectures peaks around 2-3 GiB
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        by_mem = max(1, int(mem_gib // 3))
    except (ValueError, OSError, AttributeError):
        by_mem = 2
    return max(1, min(cores, by_mem))


def _build_mode() -> str:
    mode = os.environ.get("VLCORE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"VLCORE_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    return mode


class BuildExtWithNvcc(build_ext):
    """Compiles ``csrc/*.cu`` with nvcc (in parallel) and links them with the pybind11 binding module."""

    def build_extensions(self):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("VLCORE_BUILD_CUDA=1 but nvcc was not found; set CUDA_HOME or put nvcc on PATH")
        cuda_home = _cuda_home(nvcc)
        archs = _archs()
        cxx = (sysconfig.get_config_var("CXX") or "c++").split()[0]
        build_info = {
            "VLCORE_BUILD_CUDA_VERSION": _nvcc_version(nvcc),
            "VLCORE_BUILD_ARCHS": ";".join(archs),
            "VLCORE_BUILD_COMPILER": _cxx_version(cxx),
            "VLCORE_BUILD_DATE": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "VLCORE_BUILD_VERSION": _version(),
        }
        for ext in self.extensions:
            self._build_cuda_objects(ext, nvcc, cuda_home, archs)
            ext.include_dirs += [str(cuda_home / "include"), str(CSRC)]
            ext.library_dirs += [str(cuda_home / "lib64"), str(cuda_home / "lib")]
            # Static cudart: the extension needs only the driver (libcuda) at run time, found lazily, so
            # importing vlcore._C works on machines without a GPU and never clashes with torch's cudart.
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            ext.define_macros += [(k, '"' + v.replace('"', "'") + '"') for k, v in build_info.items()]
        super().build_extensions()

    def _build_cuda_objects(self, ext: Extension, nvcc: Path, cuda_home: Path, archs: list[str]) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        if not cu_sources:
            return
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        last = archs[-1].rstrip("a")  # PTX of the newest plain architecture, for forward compatibility
        gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--use_fast_math", "-lineinfo",
                 "--expt-relaxed-constexpr", "-I", str(CSRC), *gencode]

        def compile_one(src: str) -> str:
            obj = obj_dir / (Path(src).stem + ".o")
            cmd = [str(nvcc), "-c", str(ROOT / src), "-o", str(obj), *flags]
            print(" ".join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{proc.stdout}\n{proc.stderr}")
            return str(obj)

        jobs = min(_parallel_jobs(), len(cu_sources))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            ext.extra_objects += list(pool.map(compile_one, cu_sources))


def _extensions() -> list[Extension]:
    mode = _build_mode()
    if mode == "0" or (mode == "auto" and _find_nvcc() is None):
        why = "VLCORE_BUILD_CUDA=0" if mode == "0" else "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        print(f"WARNING vlcore: skipping the CUDA extension vlcore._C ({why}); installing pure Python.",
              file=sys.stderr)
        return []
    import pybind11  # a declared build requirement (pyproject.toml)

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")
    )
    return [
        Extension(
            "vlcore._C",
            sources=sources,
            include_dirs=[pybind11.get_include()],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            language="c++",
        )
    ]


setup(
    name="vlcore",
    version=_version(),
    description="Fused Triton/CUDA kernels and compact models for vision-language pretraining",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=(
        find_packages(include=["vlcore", "vlcore.*"])
        + ["vlcore.kernels"]
        + ["vlcore.models" + p[len("models"):] for p in find_packages(include=["models", "models.*"])]
    ),
    package_dir={"vlcore": "vlcore", "vlcore.kernels": "kernels", "vlcore.models": "models"},
    package_data={"vlcore": ["data/*"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtWithNvcc},
    install_requires=[
        "torch>=2.5",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "scikit-learn",  # the embedded digits-scenes dataset is made of the digit scans it ships
        "safetensors",  # checkpoints
        "matplotlib",  # the loss curve of `vlcore pretrain`, benchmark plots
        "pillow",  # images in tar shards / JSONL manifests, `vlcore caption` on files
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark", "hypothesis==6.170.17", "ruff", "scipy", "nltk", "pycocoevalcap"],
        # captioning metrics of `vlcore finetune --task captioning`: BLEU-4 (nltk's corpus_bleu) and CIDEr-D
        # (pycocoevalcap, the COCO caption evaluation; its wheel is ~100 MB, hence optional)
        "eval": ["nltk", "pycocoevalcap"],
        # peers that install cleanly beside any torch (open_clip, xformers, Inf-CL need matching torch builds:
        # the benchmarks list them as missing when absent)
        "bench": ["tabulate", "faiss-cpu"],
        # timm / transformers / open_clip for vlcore.integrations and their tests
        "interop": _requirements("requirements-interop.txt"),
    },
    entry_points={"console_scripts": ["vlcore=vlcore.cli:run"]},
    zip_safe=False,
)
