"""No lost runs: a step with a non-finite loss or gradient is skipped (nothing of it applied) and counted, and K
consecutive ones stop the run with one line while the last good checkpoint stays."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_vlm
import torch

from vlcore import cli
from vlcore.train import checkpoint
from vlcore.train.guard import RunStopped
from vlcore.train.loop import TrainConfig, pretrain


def _cfg(out, **kw):
    base = dict(model="test-tiny", steps=4, batch_size=4, lr=3e-3, warmup=1, save_every=2, keep=5, log_every=1,
                eval="off", quiet=True, out_dir=str(out), device="cpu", seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _Injector:
    """Wraps TinyVLM.forward: remembers the weights each call starts from, counts calls in a buffer (which a
    skipped step must leave as it was) and poisons the loss or its gradient on the calls listed."""

    def __init__(self, monkeypatch, bad_calls, kind="loss"):
        self.bad_calls, self.kind = set(bad_calls), kind
        self.weights_at_call: list[dict] = []
        real = tiny_vlm.TinyVLM.forward
        injector = self

        def forward(model, batch):
            injector.weights_at_call.append({k: v.detach().clone() for k, v in model.named_parameters()})
            if not hasattr(model, "calls"):
                model.register_buffer("calls", torch.zeros((), dtype=torch.long))
            model.calls += 1
            out = real(model, batch)
            if len(injector.weights_at_call) in injector.bad_calls:
                out = dict(out, loss=out["loss"] * float("nan") if injector.kind == "loss"
                           else _NaNGrad.apply(out["loss"]))
            return out

        monkeypatch.setattr(tiny_vlm.TinyVLM, "forward", forward)


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_not_applied_and_is_counted(tmp_path, monkeypatch, kind):
    inj = _Injector(monkeypatch, bad_calls={2}, kind=kind)
    res = pretrain(_cfg(tmp_path / "run", steps=4))
    before, after = inj.weights_at_call[1], inj.weights_at_call[2]  # around step 2, the poisoned one
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert not all(torch.equal(inj.weights_at_call[2][k], inj.weights_at_call[3][k]) for k in before)
    ckpt = checkpoint.load_checkpoint(tmp_path / "run")
    assert int(ckpt["model_state"]["calls"]) == 3  # the skipped forward's buffer update was undone
    ts = ckpt["train_state"]
    assert ts["scheduler"]["last_epoch"] == 3 and ts["skipped_steps"] == 1
    assert all(int(s["step"]) == 3 for s in ts["optimizer"]["state"].values())  # AdamW stepped 3 times, not 4
    recs = _records(tmp_path / "run")
    assert [r.get("skipped_steps", 0) for r in recs] == [0, 1, 1, 1]
    assert len(res["losses"]) == 4


def test_consecutive_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _Injector(monkeypatch, bad_calls=range(3, 100))
    with pytest.raises(RunStopped) as e:
        pretrain(_cfg(tmp_path / "run", steps=10, save_every=2, max_skipped_steps=2))
    assert e.value.code == 1
    assert "stopped at step 4: 2 consecutive steps (3..4)" in e.value.message
    assert "step 2" in e.value.message and "--max-skipped-steps 2" in e.value.message
    # step 4 is a save step, but nothing of the bad streak is written: step 2 is still the newest checkpoint
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert capsys.readouterr().err.strip() == e.value.message


def test_cli_stops_with_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    _Injector(monkeypatch, bad_calls=range(1, 100))
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny", "--steps", "5", "--batch-size", "4",
                  "--device", "cpu", "--eval", "off", "--quiet", "--max-skipped-steps", "3",
                  "--out-dir", str(tmp_path / "run")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 consecutive steps (1..3)" in err[0] and "no checkpoint was written yet" in err[0]


# ------------------------------------------------------------------------------------------ SIGINT / SIGTERM
def _cli_env():
    tests = Path(__file__).resolve().parent
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def _start_pretrain(out, *extra):
    cmd = [sys.executable, "-m", "vlcore.cli", "pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny",
           "--steps", "500", "--batch-size", "4", "--warmup", "1", "--device", "cpu", "--eval", "off", "--quiet",
           "--threads", "1", "--log-every", "1", "--save-every", "1000", "--out-dir", str(out), *extra]
    # Its own session: SIGINT goes to the whole process group, data workers included, as Ctrl-C in a terminal.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(),
                            start_new_session=True)


def _wait_for_steps(proc, metrics, n, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"pretrain ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.mark.parametrize("sig,code,workers", [(signal.SIGINT, 130, "1"), (signal.SIGTERM, 143, "0")])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig, code, workers):
    run = tmp_path / "run"
    proc = _start_pretrain(run, "--num-workers", workers)
    try:
        _wait_for_steps(proc, run / "metrics.jsonl", 1)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    m = re.fullmatch(rf"interrupted at step (\d+) \({sig.name}\); checkpoint saved to (.+); resume with: "
                     rf"vlcore pretrain --resume (.+)", lines[0])
    assert m and Path(m[2]) == run / "checkpoints" and Path(m[3]) == run, lines[0]
    step = int(m[1])
    assert 1 <= step < 500
    ts = checkpoint.load_checkpoint(run)["train_state"]
    assert ts["step"] == step and ts["data"][0]["position"] == step and ts["scheduler"]["last_epoch"] == step
    assert max(r["step"] for r in _records(run)) == step


def test_data_workers_leave_ctrl_c_to_the_training_process():
    """Ctrl-C reaches the whole process group: a worker that died of it would fail the batches still owed."""
    import multiprocessing

    from vlcore.data.digits_scenes import DigitsScenes
    from vlcore.data.loader import Collator, DigitsSource
    from vlcore.data.tokenizer import ByteBPETokenizer

    tok = ByteBPETokenizer.train(["a 1", "a 2 and a 3"], vocab_size=300)
    source = DigitsSource(DigitsScenes("train", seed=0, image_size=32), Collator(tok, max_text_len=8), batch_size=2,
                          num_workers=1)
    before = set(multiprocessing.active_children())
    source.next_batch()
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGINT)
    time.sleep(0.5)
    batches = [source.next_batch() for _ in range(12)]  # more than the prefetched ones
    assert workers[0].is_alive() and len(batches) == 12 and source.position == 13
    source._it = None  # let the DataLoader shut its worker down


# ------------------------------------------------------------------------------------------ resume settings
def _cli(capsys, *argv):
    rc = cli.main(["pretrain", "--plugin", "tiny_vlm", "--device", "cpu", "--quiet", "--threads", "1", *argv])
    return rc, capsys.readouterr()


def test_resume_without_flags_keeps_the_runs_settings(tmp_path, capsys):
    run = tmp_path / "run"
    _cli(capsys, "--model", "test-tiny", "--steps", "4", "--batch-size", "8", "--lr", "0.003", "--warmup", "1",
         "--save-every", "2", "--keep", "5", "--log-every", "1", "--eval", "off", "--seed", "3", "--out-dir", str(run))
    final = checkpoint.load_checkpoint(run)["model_state"]
    mid = run / "checkpoints" / f"step-00000002{checkpoint.WEIGHTS_EXT}"
    rc, out = _cli(capsys, "--resume", str(mid))
    assert rc == 0 and "resume:" not in out.out, out.out
    assert "steps 2->4, global batch 8 (8 x 1" in out.out and "lr 0.003" in out.out
    again = checkpoint.load_checkpoint(run)["model_state"]
    assert all(torch.equal(final[k], again[k]) for k in final)  # the same run, continued: the same weights
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["steps"], train["batch_size"], train["lr"], train["seed"]) == (4, 8, 0.003, 3)


def test_resume_applies_and_reports_explicit_changes_even_to_the_default_value(tmp_path, capsys):
    from vlcore.train.optim import warmup_cosine

    run = tmp_path / "run"
    _cli(capsys, "--model", "test-tiny", "--steps", "4", "--batch-size", "8", "--lr", "0.003", "--warmup", "1",
         "--save-every", "2", "--log-every", "1", "--eval", "off", "--out-dir", str(run))
    mid = run / "checkpoints" / f"step-00000002{checkpoint.WEIGHTS_EXT}"
    # --batch-size 64 is the parser's default: given explicitly, it still changes the run's 8
    rc, out = _cli(capsys, "--resume", str(mid), "--steps", "5", "--batch-size", "64", "--lr", "0.001",
                   "--model", "coca-tiny", "--out-dir", str(tmp_path / "more"))
    assert rc == 0
    for line in ("resume: --steps: 4 -> 5", "resume: --batch-size: 8 -> 64", "resume: --lr: 0.003 -> 0.001",
                 "resume: --model: coca-tiny ignored; the checkpoint's model has test-tiny"):
        assert line in out.out, out.out
    assert "steps 2->5, global batch 64" in out.out
    recs = _records(tmp_path / "more")
    assert recs[0]["step"] == 3  # lr after step 3 on the new schedule: 0.001 peak, 5 steps
    assert recs[0]["lr"] == pytest.approx(0.001 * warmup_cosine(3, 1, 5, 0.05), rel=1e-12)
    train = json.loads((tmp_path / "more" / "config.json").read_text())["train"]
    assert (train["steps"], train["batch_size"], train["lr"], train["model"]) == (5, 64, 0.001, "test-tiny")
