"""benchmarks/roofline.py: the on-paper model against hand-computed values, and the report it writes."""

import math

from benchmarks import roofline as rl


def test_causal_tiles_cover_the_lower_triangle_at_tile_granularity():
    covered, visible = rl._tiles_visible(128, 64, 32, causal=True)
    # rows 0..63 see keys < 64 (2 tiles of 32), rows 64..127 keys < 128 (4 tiles): (2 + 4)·64·32 pairs
    assert covered == 6 * 64 * 32 and visible == 128 * 129 / 2
    assert rl._tiles_visible(100, 64, 32, causal=False) == (100 * 100, 100 * 100)


def test_time_is_the_slower_of_compute_and_memory():
    e = rl.Estimate("k", "s", flops=989e12 * 0.75, flops_min=989e12 * 0.75, bytes=0, bytes_min=0, exps=0,
                    unit="wgmma", spills=False, peers="")
    assert math.isclose(e.time("H100 SXM"), 1.0) and math.isclose(e.fraction("H100 SXM"), 0.75)
    e.bytes = 2 * 3.35e12  # two seconds of HBM traffic on an H100
    assert math.isclose(e.time("H100 SXM"), 2.0)
    e.spills, e.bytes = True, 0  # a spilling config halves the MMA efficiency
    assert math.isclose(e.time("H100 SXM"), 2.0)


def test_report_has_every_kernel(tmp_path):
    out = tmp_path / "roofline.md"
    assert rl.main(["--out", str(out)]) == 0
    text = out.read_text()
    for kernel in ("attention.fwd", "attention.bwd", "contrastive.fwd", "contrastive.bwd", "vq.nearest"):
        assert f"| {kernel}" in text
