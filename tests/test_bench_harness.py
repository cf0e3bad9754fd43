"""The benchmark harness on tiny sizes with the reference providers (what CI exercises)."""

import csv
import math

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
