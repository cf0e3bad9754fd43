"""Fault injection: SIGKILL at random steps and between a checkpoint file's complete temporary and its rename, then
``--resume auto``, again and again: the run still ends with the uninterrupted run's weights and losses, bit for
bit. The CI case is small; a larger matrix (more seeds, gradient accumulation, data workers) is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _matrix(out: Path, *args, timeout=600) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TESTS / "fault_matrix.py"), str(out), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"fault matrix: {result['faults']} faults injected, survived: {result['identical']} ({result})")
    return result


def _check(result: dict, at_least: int) -> None:
    assert result["identical"], result
    assert result["faults"] == len(result["fired"]) >= at_least, result  # every kill was a planned fault
    assert any(f.startswith("write") for f in result["fired"]) and any(f.startswith("step") for f in result["fired"])


def test_killed_runs_resume_to_identical_weights(tmp_path):
    _check(_matrix(tmp_path, "--seed", "0", "--faults", "8"), at_least=5)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("seed,extra", [(1, []), (2, ["--grad-accum", "2"]), (3, ["--num-workers", "1"]),
                                        (4, ["--steps", "20", "--save-every", "2"])])
def test_fault_matrix_large(tmp_path, seed, extra):
    _check(_matrix(tmp_path, "--seed", str(seed), "--faults", "14", *extra), at_least=8)
