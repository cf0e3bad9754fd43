"""Soak: thousands of tiny steps with data-loader workers and periodic checkpoints; the training process's resident
memory stays flat and its open files and threads do not grow (sampled from /proc while it runs)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _sample(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exited, not yet reaped
        return None
    return {"t": time.monotonic(), "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]), "fds": fds}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_soak_rss_files_and_threads_stay_flat(tmp_path):
    steps = 3000
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vlcore.cli", "pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny",
           "--steps", str(steps), "--batch-size", "4", "--image-size", "32", "--warmup", "10", "--device", "cpu",
           "--threads", "1", "--num-workers", "2", "--eval", "off", "--quiet", "--log-every", "50",
           "--save-every", "250", "--keep", "2", "--out-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    samples, t0 = [], time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 1800:
            s = _sample(proc.pid)
            metrics = tmp_path / "run" / "metrics.jsonl"
            if s is not None and metrics.exists():
                s["records"] = len(metrics.read_text().splitlines())
                samples.append(s)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert f"trained {steps} steps" in out
    # while it trains (after the first tenth: allocator and worker start-up; before the last record: the end's
    # plot imports matplotlib), compare the second quarter with the last one
    n_records = steps // 50 + 1  # and step 1's
    run = [s for s in samples if n_records // 10 < s["records"] < n_records]
    assert len(run) >= 20, f"only {len(run)} samples"
    q = len(run) // 4
    early, late = run[q: 2 * q], run[-q:]
    rss_early = max(s["rss_mb"] for s in early)
    rss_late = max(s["rss_mb"] for s in late)
    # open files come and go with the batches in flight (a shared-memory descriptor per tensor from a worker):
    # a leak raises the floor and the median, not the peaks
    fds = {name: (min(s["fds"] for s in part), statistics.median(s["fds"] for s in part))
           for name, part in (("early", early), ("late", late))}
    summary = (f"soak: {steps} steps in {run[-1]['t'] - t0:.0f} s, {len(samples)} samples; RSS {rss_early:.1f} -> "
               f"{rss_late:.1f} MB; open files (min, median) {fds['early']} -> {fds['late']}; threads "
               f"{max(s['threads'] for s in early)} -> {max(s['threads'] for s in late)}")
    print(summary)
    trace = " ".join(f"{s['records']}:{s['rss_mb']:.0f}/{s['fds']}" for s in samples[:: max(1, len(samples) // 40)])
    print(f"records:RSS MB/fds {trace}")
    summary += f"\n{trace}"
    assert rss_late <= rss_early * 1.05 + 8, summary
    assert fds["late"][0] <= fds["early"][0] + 2 and fds["late"][1] <= fds["early"][1] + 4, summary
    assert max(s["threads"] for s in late) <= max(s["threads"] for s in early), summary
