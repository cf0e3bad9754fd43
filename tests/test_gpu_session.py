"""The prepared GPU session (benchmarks/gpu_session.{sh,py}): its plan, budgets, stage outcomes, what it leaves in
OUT, and (slow) a whole dry run of every stage's CPU counterpart."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_session as gs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _stage(cmd: str, name: str = "probe") -> gs.Stage:
    return gs.Stage(name, 10, gpu=cmd, dry=cmd, what="a probe")


def test_plan_covers_every_required_check():
    names = [s.name for s in gs.STAGES]
    assert len(set(names)) == len(names)
    gpu = {s.name: s.gpu.format(work="W", out="O") for s in gs.STAGES}  # every command formats
    for s in gs.STAGES:
        s.dry.format(work="W", out="O")
    assert "nvidia-smi" in gpu["nvidia-smi"]
    assert "VLCORE_CUDA_ARCHS=90 " in gpu["build"] and "build_ext --inplace" in gpu["build"]
    assert "vlcore.info" in gpu["info"]
    assert "-m gpu" in gpu["gpu-tests"] and "--junitxml=O/junit-gpu.xml" in gpu["gpu-tests"]
    assert "--junitxml=O/junit-kernels.xml" in gpu["kernel-tests"] and "test_vq_kernels.py" in gpu["kernel-tests"]
    assert "determinism" in gpu["determinism"] and "--require-cuda" in gpu["cuda-backends"]
    assert "--backend inductor" in gpu["compile"]
    assert "run_all.py --quick" in gpu["bench-quick"] and "kernel_resources.py" in gpu["resources"]
    assert "coca-base" in gpu["train"] and "--precision bf16" in gpu["train"]
    assert sum(s.share for s in gs.STAGES) == gs.FULL_BUDGET <= 9 * 60
    # install (vlcore importable without the extension) comes before everything that imports vlcore
    assert names.index("install") < names.index("build") < names.index("info") < names.index("gpu-tests")


def test_stage_budgets_scale_and_never_exceed_what_is_left():
    stage = gs.STAGES[0]
    assert gs.stage_budget(stage, gs.FULL_BUDGET, 1000, False) == stage.share
    assert gs.stage_budget(stage, gs.FULL_BUDGET * 2, 1000, False) == stage.share * 2
    assert gs.stage_budget(stage, gs.FULL_BUDGET, 2.5, False) == 2
    assert gs.stage_budget(stage, gs.FULL_BUDGET, 77, True) == 77  # the last stage gets all that is left
    assert gs.stage_budget(stage, gs.FULL_BUDGET, -5, False) == 0
    assert gs.stage_budget(stage, gs.FULL_BUDGET, 1000, False, dry=True) == gs.DRY_STAGE_LIMIT


@pytest.mark.parametrize("cmd,status,rc", [("echo fine", "passed", 0), ("echo bad; exit 1", "failed", 1),
                                           ("exit 3", "skipped", 3), ("sleep 30", "timed out", 124)])
def test_run_stage_outcomes(tmp_path, cmd, status, rc):
    log_path = tmp_path / "session.log"
    with open(log_path, "w") as log:
        result = gs.run_stage(_stage(cmd), 3, False, tmp_path, log)
    assert (result.status, result.rc) == (status, rc)
    assert result.seconds < 15
    assert f"probe: {status}" in log_path.read_text()
    assert (tmp_path / "stages" / "probe" / "stage.log").exists()


def test_run_stage_without_budget_is_not_run(tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert gs.run_stage(_stage("echo x"), 2, False, tmp_path, log).status == "not run"


def test_dry_run_of_some_stages_writes_the_summary_and_few_files(tmp_path, capsys):
    rc = gs.main([str(tmp_path), "--dry-run", "--only", "nvidia-smi,wheels,bench-quick,resources"])
    text = (tmp_path / "summary.md").read_text()
    assert rc == 0, text
    for name in ("nvidia-smi", "wheels", "bench-quick", "resources"):
        assert f"| {name} | passed |" in text
    assert "| build |" not in text and "dry run on CPU" in text
    assert "# GPU session summary" in capsys.readouterr().out
    # what a device run brings back is limited to 8 top-level files
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["details.tar.gz", "session.log", "summary.md"]
    with tarfile.open(tmp_path / "details.tar.gz") as tar:
        assert "stages/bench-quick/stage.log" in tar.getnames()


def test_pack_leaves_large_files_out(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "PACK_FILE_LIMIT", 100)
    (tmp_path / "stages" / "train").mkdir(parents=True)
    (tmp_path / "stages" / "train" / "ckpt.pt").write_bytes(b"x" * 1000)
    (tmp_path / "stages" / "train" / "stage.log").write_text("ok")
    with open(tmp_path / "session.log", "w") as log:
        gs.pack(tmp_path, log)
    with tarfile.open(tmp_path / "details.tar.gz") as tar:
        assert tar.getnames() == ["stages", "stages/train", "stages/train/stage.log"]
    assert "not packed" in (tmp_path / "session.log").read_text() and not (tmp_path / "stages").exists()


def test_bad_arguments_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gs.main([str(tmp_path), "--only", "nonsense"])
    assert "unknown stage(s) nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gs.main([str(tmp_path), "--budget", "5"])
    assert "--budget" in capsys.readouterr().err
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_shell_entry_resolves_a_relative_out_folder(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "rel_out", "--dry-run", "--only", "nvidia-smi"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rel_out" / "summary.md").is_file()  # relative to the caller, not to the repository


@pytest.mark.slow
@pytest.mark.long
def test_whole_dry_run(tmp_path):
    """Every stage's CPU counterpart through the shell entry point, then the summary (~3 minutes on 2 cores)."""
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    text = (tmp_path / "summary.md").read_text()
    for stage in gs.STAGES:
        assert f"| {stage.name} |" in text
    assert "not run" not in text.split("| stage |")[1], text
    must_pass = ("versions", "install", "info", "gpu-tests", "determinism", "compile", "train", "kernel-tests")
    for name in must_pass:
        assert f"| {name} | passed |" in text, text + proc.stdout[-3000:]
    assert "| cuda-backends | skipped |" in text or "| cuda-backends | passed |" in text
    assert len(list(tmp_path.iterdir())) <= 8
