"""Checkpoints: round trip (tied weights, metadata), atomic replacement, retention, exact resumption."""

from __future__ import annotations

import json

import pytest
import tiny_vlm  # noqa: F401  (registers test-tiny)
import torch

from vlcore.train import checkpoint
from vlcore.train.loop import TrainConfig, model_from_checkpoint, pretrain


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 5)
        self.head = torch.nn.Linear(5, 11, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor, two names
        self.register_buffer("count", torch.arange(3))


def _meta():
    return {"model": "tied", "config": {"a": 1}, "tokenizer": {"kind": "byte-bpe", "merges": []}}


def test_weights_round_trip_with_tied_weights_and_metadata(tmp_path):
    m = Tied()
    path = checkpoint.save_checkpoint(tmp_path, 7, m.state_dict(), {"step": 7, "x": [1, 2]}, _meta())
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["weights_path"] == path and ckpt["train_state"] == {"step": 7, "x": [1, 2]}
    meta = ckpt["metadata"]
    assert meta["model"] == "tied" and meta["config"] == {"a": 1} and meta["step"] == "7"
    assert meta["tokenizer"]["kind"] == "byte-bpe"
    fresh = Tied()
    fresh.load_state_dict(ckpt["model_state"])
    for (n, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert fresh.head.weight is fresh.emb.weight
    assert path.suffix == ".safetensors"
    assert json.loads(ckpt["metadata"]["aliases"]) == {"head.weight": "emb.weight"}


def _failing(monkeypatch, nth: int):
    """Make the ``nth`` safetensors write of a save (1: weights, 2: training state) write part of its file and
    then die, as a crash in the middle of a write would."""
    real, calls = checkpoint.save_file, []

    def write(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        calls.append(path)
        if len(calls) == nth:
            with open(path, "r+b") as f:
                f.truncate(max(1, f.seek(0, 2) // 2))
            raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(checkpoint, "save_file", write)


@pytest.mark.parametrize("which", ["weights", "state"])
def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, which):
    m = Tied()
    checkpoint.save_checkpoint(tmp_path, 1, m.state_dict(), {"step": 1}, _meta())
    with torch.no_grad():
        m.emb.weight.add_(1.0)
    _failing(monkeypatch, 1 if which == "weights" else 2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 2, m.state_dict(), {"step": 2}, _meta())
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["train_state"]["step"] == 1 and ckpt["metadata"]["step"] == "1"
    assert not torch.equal(ckpt["model_state"]["emb.weight"], m.emb.weight)  # the old weights, intact
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "temporary files left behind"


def test_keeps_only_the_newest_checkpoints(tmp_path):
    m = Tied()
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, m.state_dict(), {"step": step}, _meta(), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    files = [f"step-0000000{s}{ext}" for s in (3, 4) for ext in (".safetensors", ".state.safetensors",
                                                                 ".state.json", ".json")]
    assert names == sorted(["latest.json"] + files)
    weights, state = checkpoint.resolve(tmp_path / "checkpoints" / "step-00000003.safetensors")
    assert state.name == "step-00000003.state.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nowhere")


def _cfg(out, **kw):
    base = dict(model="test-tiny", steps=6, batch_size=8, lr=3e-3, warmup=2, save_every=3, keep=3, log_every=1,
                eval="off", quiet=True, out_dir=str(out), device="cpu", seed=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_continues_exactly(tmp_path, accum):
    full = pretrain(_cfg(tmp_path / "full", grad_accum=accum))
    assert len(full["losses"]) == 6
    ext = checkpoint.WEIGHTS_EXT
    mid = tmp_path / "full" / "checkpoints" / f"step-00000003{ext}"
    resumed = pretrain(_cfg(tmp_path / "resumed", grad_accum=accum, resume=str(mid)))
    assert resumed["losses"] == full["losses"][3:]  # bit for bit: dropout RNG, data position, optimizer, lr
    a = checkpoint.load_checkpoint(tmp_path / "full")["model_state"]
    b = checkpoint.load_checkpoint(tmp_path / "resumed")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint records model name, config and tokenizer: a model can be rebuilt from it alone
    model, tok, meta = model_from_checkpoint(tmp_path / "resumed")
    assert meta["model"] == "test-tiny" and model.cfg.vocab_size == tok.vocab_size == meta["config"]["vocab_size"]


def test_resume_into_the_same_run_folder_appends_metrics(tmp_path):
    pretrain(_cfg(tmp_path / "run", steps=6, save_every=3))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    with pytest.raises(ValueError, match="nothing left"):
        pretrain(_cfg(None, resume=str(tmp_path / "run"), out_dir=None))
    res = pretrain(_cfg(None, steps=8, resume=str(tmp_path / "run"), out_dir=None))
    assert res["run_dir"] == str(tmp_path / "run") and len(res["losses"]) == 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
