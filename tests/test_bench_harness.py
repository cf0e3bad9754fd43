"""The benchmark harness on tiny sizes with the reference providers (what CI exercises)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlcore
from benchmarks import harness


def _provider(case):
    q = torch.randn(1, case["N"], 2, 8, requires_grad=True)
    k = torch.randn(1, case["N"], 2, 8, requires_grad=True)
    return harness.Bench(fwd=lambda: vlcore.attention(q, k, k, causal=True, backend="reference"), inputs=[q, k])


def _refusing(case):
    raise harness.Unsupported("needs a GPU")


def test_sweep_times_every_mode_and_keeps_refusals(tmp_path):
    cases = [{"N": 8}, {"N": 16}]
    rows = harness.sweep("toy", cases, {"reference": _provider, "peer": _refusing}, reps=2, warmup=1,
                         flops=lambda c, m: 4.0 * c["N"] ** 2 * 16, verbose=False)
    assert len(rows) == 2 * 2 * 3
    ok = [r for r in rows if r["provider"] == "reference"]
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"] and r["tflops"] > 0 for r in ok)
    refused = [r for r in rows if r["provider"] == "peer"]
    assert all(r["note"] == "unsupported: needs a GPU" and math.isnan(r["median_ms"]) for r in refused)
    out = harness.write_results("toy", rows, x="N", out_dir=tmp_path)
    with open(out / "toy.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and written[0]["provider"] == "reference"
    md = (out / "toy.md").read_text()
    assert "torch" in md and "| bench |" in md
    assert (out / "versions.json").exists()


def test_backward_mode_differentiates_the_inputs():
    calls = []

    def provider(case):
        x = torch.randn(4, requires_grad=True)

        def fwd():
            calls.append(1)
            return (x * 2).sum()

        return harness.Bench(fwd=fwd, inputs=[x])

    step = harness._make_step(provider({}), "bwd")
    grads = step()
    assert torch.equal(grads[0], torch.full((4,), 2.0).mul(grads[0][0] / 2))
    assert len(calls) == 1  # the forward ran once, outside the timed backward


# ---- one harness, two drivers ----------------------------------------------------------------------------

def _toy_suite(calls=None):
    def provider(case):
        x = torch.randn(case["N"], requires_grad=True)
        return harness.Bench(fwd=lambda: (x * 2).sum(), inputs=[x])

    def forward_only(case):
        return harness.Bench(fwd=lambda: torch.ones(case["N"]), no_backward="no backward on this device")

    return harness.Suite("toy", "Toy", x="N", cases=lambda size, opts: [{"kind": k, "N": n} for k in ("a", "b")
                                                                         for n in ((8, 64) if size == "quick" else (4,))],
                         providers={"p": provider, "fwd-only": forward_only, "refuses": _refusing},
                         modes=lambda size: ("fwd", "fwd_bwd"))


def test_measure_keeps_unsupported_reasons_and_uses_the_given_timer():
    suite = _toy_suite()
    timed = []

    def timer(step):
        timed.append(step())
        return harness.summarize_ms([3.0, 1.0, 2.0])

    row = harness.measure(suite, {"kind": "a", "N": 8}, "p", "fwd_bwd", timer=timer, memory=False)
    assert row["min_ms"] == 1.0 and row["median_ms"] == 2.0 and row["note"] == "" and len(timed) == 1
    row = harness.measure(suite, {"kind": "a", "N": 8}, "fwd-only", "fwd_bwd", timer=timer, memory=False)
    assert row["note"] == "unsupported: no backward on this device" and math.isnan(row["min_ms"])
    row = harness.measure(suite, {"kind": "a", "N": 8}, "refuses", "fwd", timer=timer, memory=False)
    assert row["note"] == "unsupported: needs a GPU"
    assert len(list(suite.items("quick"))) == 2 * 2 * 3 * 2  # cases x providers x modes
    assert [c["N"] for c, _, _ in suite.items("cpu")] == [4] * 12


def test_cpu_peak_memory_sees_a_temporary_allocation():
    def step():
        t = torch.ones(2**18)  # 1 MiB, dropped before the call returns
        return t.sum()

    peak = harness.peak_memory_bytes(step, device=torch.device("cpu"))
    assert peak is not None and 2**20 <= peak < 2**20 + 2**16


def test_panels_never_join_configurations_and_the_plot_is_written(tmp_path):
    rows = []
    for kind in ("a", "b"):
        for n, b in ((8, 64), (16, 32), (128, 4)):  # B varies with N: "along" x, not a configuration of its own
            for prov in ("p", "q"):
                row = harness.empty_row("toy", {"kind": kind, "B": b, "N": n}, prov, "fwd")
                row.update(min_ms=float(n), peak_mem_mb=0.5 * n)
                rows.append(row)
    groups = harness.panels(rows, "N", along=("B",))
    assert sorted(groups) == ["kind=a, mode=fwd", "kind=b, mode=fwd"]
    assert all({r["kind"] for r in g} == {g[0]["kind"]} and len(g) == 6 for g in groups.values())
    assert len(harness.panels(rows, "N")) == 6  # without `along`, every B is its own configuration
    harness.plot(rows, "N", tmp_path / "toy.png", "Toy", along=("B",))
    assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_attention_summary_reports_the_cpu_target_ratio(monkeypatch):
    from benchmarks import bench_attention

    monkeypatch.setattr(bench_attention, "paired", lambda mode: {"vlcore-cpu": 10.0, "sdpa (dense mask)": 11.0,
                                                              "median_ratio": 1.07})
    rows = []
    for prov, ms in (("vlcore-cpu", 40.0), ("sdpa (dense mask)", 50.0)):
        row = harness.empty_row("attention", dict(bench_attention.TARGET), prov, "fwd_bwd")
        row["min_ms"] = ms
        rows.append(row)
    text = bench_attention.summary(rows)
    assert "= 1.25×" in text and "= 1.10×" in text and "**1.07×**" in text


def test_the_project_test_run_does_not_collect_the_benchmarks():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    pytest_section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert 'testpaths = ["tests"]' in pytest_section


@pytest.mark.slow
def test_pytest_benchmark_run_saves_json_tables_and_compares(tmp_path):
    """`pytest benchmarks/ --benchmark-only` on one tiny case: JSON under --bench-out/<machine>/, the tables beside
    it, and a second run with --benchmark-compare against the first."""
    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--bench-size", "quick", "-q",
           "-p", "no:cacheprovider", "-k", "vq-workassign-N256-K64-D32-dtypefp32-vlcore-cpu-fwd",
           "--bench-out", str(tmp_path)]
    first = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    saved = list(tmp_path.glob("*/0001_*.json"))
    assert len(saved) == 1
    report = json.loads(saved[0].read_text())
    assert [b["extra_info"]["provider"] for b in report["benchmarks"]] == ["vlcore-cpu"]
    assert (tmp_path / "vq.md").exists() and (tmp_path / "vq.csv").exists()
    second = subprocess.run(cmd + ["--benchmark-compare"], cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "0001_" in second.stdout + second.stderr  # it compared with the first run


def test_run_all_pytest_mode_runs_one_pytest_benchmark_session(monkeypatch, tmp_path):
    from benchmarks import run_all

    calls = []
    monkeypatch.setattr(run_all.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    assert run_all.main(["--pytest", "--quick", "--only", "attention,vq,resources", "--out", str(tmp_path)]) == 0
    session, resources = calls
    assert session[1:3] == ["-m", "pytest"] and "--benchmark-only" in session
    assert session[session.index("-k") + 1] == "attention- or vq-"
    assert session[session.index("--bench-size") + 1] == "quick" and str(tmp_path) in session
    assert resources[1].endswith("kernel_resources.py")
