"""pytest-benchmark wiring of the microbenchmarks (``pytest benchmarks/ --benchmark-only``).

* ``--bench-size quick|cpu|gpu`` picks the size set (default: ``gpu`` with CUDA, ``cpu`` without);
* pytest-benchmark's storage defaults to ``benchmarks/results/<device>/`` and every run is saved there
  (``--benchmark-autosave``), so ``--benchmark-compare`` compares with the previous run of this device;
* at the end, the rows measured in this session are written as CSV / markdown / PNG beside them by the same
  :func:`harness.write_suite` the scripts use (``--bench-no-tables`` to skip, ``--bench-out DIR`` elsewhere).

The project's own test run (``python -m pytest``, testpaths = tests) never collects this folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the bench scripts import `harness` as a top-level module

import harness  # noqa: E402

_DEFAULT_STORAGE = "file://./.benchmarks"


def pytest_addoption(parser):
    group = parser.getgroup("vlcore benchmarks")
    group.addoption("--bench-size", choices=harness.SIZES, default=None,
                    help="size set of the microbenchmarks (default: gpu with CUDA, cpu without)")
    group.addoption("--bench-out", default=None, help="folder of the CSV / markdown / PNG tables and the "
                    "pytest-benchmark storage (default benchmarks/results/<device>)")
    group.addoption("--bench-no-tables", action="store_true", help="write no CSV / markdown / PNG tables")


def results_dir(config) -> Path:
    return Path(config.getoption("--bench-out") or harness.RESULTS / harness.device_slug())


def pytest_configure(config):
    """Runs before pytest-benchmark's own configure (that one is trylast): point its storage at the results
    folder and save every measured run, unless the command line says otherwise."""
    opt = config.option
    if not hasattr(opt, "benchmark_storage"):  # pytest-benchmark not installed: the tests skip
        return
    if opt.benchmark_storage == _DEFAULT_STORAGE:
        opt.benchmark_storage = f"file://{results_dir(config)}"
    if not (opt.benchmark_save or opt.benchmark_autosave or opt.benchmark_disable or opt.benchmark_skip):
        from pytest_benchmark.utils import get_tag

        opt.benchmark_autosave = get_tag()
    config._vlcore_bench_rows = []


@pytest.fixture
def bench_rows(request):
    return request.config._vlcore_bench_rows


def pytest_sessionfinish(session):
    config = session.config
    rows = getattr(config, "_vlcore_bench_rows", None)
    if not rows or config.getoption("--bench-no-tables") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from test_benchmarks import SUITES

    out = results_dir(config)
    for suite in SUITES:
        mine = [r for r in rows if r["bench"] == suite.name]
        if mine:
            harness.write_suite(suite, mine, out_dir=out)
    print(f"\nvlcore benchmark tables in {out}")
