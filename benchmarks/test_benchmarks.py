"""Every microbenchmark as a pytest-benchmark test: one test per (suite, case, provider, mode) of the size set.

    pytest benchmarks/ --benchmark-only                      # this device's size set, saved under results/<device>/
    pytest benchmarks/ --benchmark-only -k "attention and prefix"
    pytest benchmarks/ --benchmark-only --benchmark-compare  # against the previous saved run of this device
    pytest benchmarks/ --benchmark-only --bench-size quick   # tiny smoke sizes

The cases, providers and the measurement (:func:`harness.measure`) are the scripts' own; only the timer is
pytest-benchmark's (``pedantic``: the suite's rounds and warm-up, one call per round, a CUDA sync per call on GPU).
A provider that cannot run a case is skipped with its reason (``-rs`` lists them); any other failure fails.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import bench_attention  # noqa: E402  (benchmarks/ is on sys.path: see conftest.py)
import bench_contrastive  # noqa: E402
import bench_pool  # noqa: E402
import bench_relpos  # noqa: E402
import bench_vq  # noqa: E402
import harness  # noqa: E402

SUITES = [bench_attention.SUITE, bench_contrastive.SUITE, bench_vq.SUITE, bench_pool.SUITE, bench_relpos.SUITE]


def _id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_")


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size") or harness.default_size()
    params = [pytest.param((suite, case, provider, mode, size),
                           id=_id(f"{suite.name}-{harness.case_id(case)}-{provider}-{mode}"))
              for suite in SUITES for case, provider, mode in suite.items(size)]
    metafunc.parametrize("item", params)


def _pytest_benchmark_timer(benchmark, suite, size, device):
    def timer(step):
        fn = step if device.type != "cuda" else (lambda: (step(), torch.cuda.synchronize()))
        benchmark.pedantic(fn, rounds=suite.reps[size], warmup_rounds=suite.warmup[size], iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
            return {}
        return harness.summarize_ms([t * 1e3 for t in benchmark.stats.stats.data])
    return timer


def test_benchmark(item, benchmark, bench_rows):
    suite, case, provider, mode, size = item
    device = harness.default_device()
    benchmark.group = f"{suite.name} {harness.case_id(case)} {mode}"
    benchmark.extra_info.update({"suite": suite.name, **case, "provider": provider, "mode": mode, "size": size})
    row = harness.measure(suite, case, provider, mode, timer=_pytest_benchmark_timer(benchmark, suite, size, device),
                          device=device)
    bench_rows.append(row)  # unsupported rows too: the tables keep the reason
    if row["note"].startswith("unsupported: "):
        pytest.skip(row["note"])
    if row["note"]:
        pytest.fail(row["note"])
    benchmark.extra_info.update({k: row[k] for k in ("peak_mem_mb", "tflops", "gbps") if row[k] == row[k]})
