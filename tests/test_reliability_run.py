"""No lost runs: a step with a non-finite loss or gradient is skipped (nothing of it applied) and counted, and K
consecutive ones stop the run with one line while the last good checkpoint stays."""

from __future__ import annotations

import json

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
