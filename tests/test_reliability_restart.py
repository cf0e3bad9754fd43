"""``--resume auto`` under ``torchrun --max-restarts``: a 2-process gloo job in which one rank is SIGKILLed mid-run
is restarted, resumes from its last checkpoint and ends with the same weights, bit for bit, as a job that was never
interrupted. Every wait has a timeout: a hang fails the test instead of blocking CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlcore.train import checkpoint

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).resolve().parent


def _tokenizer(tmp_path) -> str:
    """The run's tokenizer, trained once here instead of in every process of every attempt."""
    from vlcore.train.loop import TrainConfig, train_tokenizer

    path = tmp_path / "tokenizer.json"
    train_tokenizer(TrainConfig(model="test-tiny")).save(path)
    return str(path)


def _torchrun(out: Path, *args, env_extra=None, restarts=0, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    # --standalone: a fresh rendezvous store per attempt. With the static one (--master-port) a restarted gloo group
    # can read the killed attempt's addresses from the store and fail to connect.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2",
           "-m", "vlcore.cli", "pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny", "--batch-size", "4",
           "--device", "cpu", "--threads", "1", "--eval", "off", "--quiet", "--log-every", "1", "--warmup", "1",
           "--steps", "6", "--save-every", "2", "--keep", "2", "--resume", "auto", "--out-dir", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun hung for {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_torchrun_restart_after_a_killed_rank_resumes_to_identical_weights(tmp_path):
    tok = _tokenizer(tmp_path)
    ref = _torchrun(tmp_path / "ref", "--tokenizer", tok)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "--resume auto: no checkpoint" in ref.stdout

    fired = tmp_path / "fired"
    out = _torchrun(tmp_path / "run", "--tokenizer", tok, restarts=1,
                    env_extra={"VLCORE_FAULTS": "step:3@1", "VLCORE_FAULTS_ONCE_DIR": str(fired)})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert (fired / "step-3-rank1").exists()  # rank 1 was SIGKILLed after step 3 ...
    assert f"--resume auto: continuing {tmp_path / 'run'}" in out.stdout  # ... and the restart found step 2
    assert "steps 2->6" in out.stdout, out.stdout
    a = checkpoint.load_checkpoint(tmp_path / "ref")["model_state"]
    b = checkpoint.load_checkpoint(tmp_path / "run")["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
