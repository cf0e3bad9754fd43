"""Checkpoint reliability and security: nothing a user hands vlcore is unpickled; damaged checkpoints are detected
and skipped for the newest good one; an existing run is never overwritten by accident; a full disk is reported as
such with the previous checkpoint intact; resumption stays exact."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import tiny_vlm  # noqa: F401  (registers test-tiny)
import torch

from vlcore import cli
from vlcore.train import checkpoint, run_folder, state_codec
from vlcore.train.loop import TrainConfig, pretrain, rng_state, set_rng_state


def _cfg(out, **kw):
    base = dict(model="test-tiny", steps=4, batch_size=4, lr=3e-3, warmup=1, save_every=2, keep=2, log_every=1,
                eval="off", quiet=True, out_dir=str(out) if out else None, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _model_state():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).state_dict()


def _save(run, step, keep=3):
    state = {"step": step, "rng": [rng_state()]}
    return checkpoint.save_checkpoint(run, step, _model_state(), state, {"model": "m", "config": {}}, keep=keep)


def _equal(a, b) -> bool:
    """Structural equality that also checks types (a tuple must come back a tuple) and tensor dtypes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ---------------------------------------------------------------------------------------------- 1. no pickle
def _real_train_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    random.random(), np.random.rand(), torch.rand(1)  # move every generator off its seed
    return {"step": 7, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng_state()],
            "data": [{"kind": "shards", "position": 12, "skipped": 0}], "world_size": 1,
            "config": {"scene_mix": (0.5, 0.25, 0.25), "overrides": {"__x": 1}, "lr": float("nan")},
            "odd": {1: "a", (2, 3): [float("inf"), -0.0, None, True]}}


def test_training_state_round_trips_exactly_as_tensors_and_json(tmp_path):
    state = _real_train_state()
    tensors, skeleton = state_codec.encode(state)
    json.dumps(skeleton, allow_nan=False)  # strict JSON: nothing else is stored besides the tensors
    assert _equal(state_codec.decode(tensors, json.loads(json.dumps(skeleton))), state)
    checkpoint.save_checkpoint(tmp_path, 7, _model_state(), state, {"model": "m"})
    loaded = checkpoint.load_checkpoint(tmp_path)["train_state"]
    assert _equal(loaded, state)
    set_rng_state(loaded["rng"][0])  # the restored generators continue exactly where the saved ones were
    after = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state["rng"][0])
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert after[:2] == again[:2] and torch.equal(after[2], again[2])


def test_unstorable_state_is_refused_at_save_naming_where_it_is(tmp_path):
    with pytest.raises(TypeError, match=r"training state\.data\[0\]\.fn: cannot store a function"):
        state_codec.encode({"data": [{"fn": lambda: 0}]})
    with pytest.raises(ValueError, match="not a plain number type"):  # bytes are never viewed as object pointers
        state_codec.decode({"t0": torch.zeros(8, dtype=torch.uint8)}, {"__ndarray__": "t0", "dtype": "|O",
                                                                       "shape": [1]})


def test_loading_never_unpickles(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 3, _model_state(), _real_train_state(), {"model": "m"})

    def forbidden(*a, **k):
        raise AssertionError("a checkpoint load unpickled something")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    assert checkpoint.load_checkpoint(tmp_path)["train_state"]["step"] == 7


class _Evil:
    """Unpickling this writes a marker file (a stand-in for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickled_state(run, marker, step=1):
    """A run folder in the pre-manifest layout whose latest.json points at a malicious pickled state."""
    ckpts = run / "checkpoints"
    checkpoint.save_weights(ckpts / f"step-{step:08d}.safetensors", _model_state(),
                            {"model": "test-tiny", "config": {}, "tokenizer": {}, "step": str(step)})
    with open(ckpts / f"step-{step:08d}.state.pt", "wb") as f:
        pickle.dump({"step": step, "payload": _Evil(marker)}, f)
    (ckpts / "latest.json").write_text(json.dumps({"step": step, "weights": f"step-{step:08d}.safetensors",
                                                   "state": f"step-{step:08d}.state.pt"}))


def test_malicious_pickled_state_in_a_resumed_folder_runs_nothing(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    _plant_pickled_state(run, marker)
    with pytest.raises(checkpoint.CheckpointError, match="pickle.*never unpickles"):
        pretrain(_cfg(None, resume=str(run)))
    with pytest.raises(checkpoint.CheckpointError, match="never unpickles"):
        checkpoint.load_checkpoint(run / "checkpoints" / "step-00000001.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="is a pickle"):
        checkpoint.load_checkpoint(run / "checkpoints" / "step-00000001.state.pt")
    assert not marker.exists()
    # its weights alone are safetensors and still load (unverified: there is no manifest)
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="no manifest"):
        ckpt = checkpoint.load_checkpoint(run / "checkpoints" / "step-00000001.safetensors", with_state=False)
    assert ckpt["train_state"] is None and not marker.exists()


def test_pickle_planted_beside_a_good_checkpoint_is_never_opened(tmp_path):
    _save(tmp_path, 2)
    with open(tmp_path / "checkpoints" / "step-00000002.state.pt", "wb") as f:
        pickle.dump(_Evil(tmp_path / "pwned"), f)
    assert checkpoint.load_checkpoint(tmp_path)["train_state"]["step"] == 2
    assert not (tmp_path / "pwned").exists()


def _reseal(ckpts, step):
    """Rewrite step ``step``'s manifest to match its files as they are now: what a tamperer can do."""
    paths = checkpoint._paths(ckpts, step)
    doc = json.loads(paths["manifest"].read_text())
    doc["files"] = {paths[p].name: {"bytes": paths[p].stat().st_size, "sha256": checkpoint._sha256(paths[p])}
                    for p in ("weights", "state", "skeleton")}
    paths["manifest"].write_text(json.dumps(doc))


_F = f'{{"format": "{checkpoint.FORMAT}", "state": '
_CRAFTED = [
    pytest.param("skeleton", b"[" * 100_000, id="nesting-deeper-than-the-stack"),
    pytest.param("skeleton", b"\xff\xfe not text", id="not-utf8"),
    pytest.param("skeleton", (_F + '{"__tensor__": "nope"}}').encode(), id="unknown-tensor"),
    pytest.param("skeleton", (_F + '{"__ndarray__": "t0", "dtype": "|O", "shape": [1]}}').encode(), id="object-dtype"),
    pytest.param("skeleton", (_F + '{"__ndarray__": "t0", "dtype": "<f8", "shape": [999]}}').encode(), id="bad-shape"),
    pytest.param("skeleton", (_F + '{"__items__": [[[1], 2]]}}').encode(), id="unhashable-key"),
    pytest.param("skeleton", (_F + '{"__float__": "os.system"}}').encode(), id="bad-float"),
    pytest.param("skeleton", (_F + '{"__tuple__": 5}}').encode(), id="bad-tuple"),
    pytest.param("state", b"\xff" * 8 + b"{}", id="header-past-the-end"),
    pytest.param("weights", b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": "b"}      ', id="bad-header"),
    pytest.param("weights", bytes(range(64)), id="noise"),
]


@pytest.mark.parametrize("part, content", _CRAFTED)
def test_crafted_files_with_a_matching_manifest_give_one_clear_error(tmp_path, part, content):
    """Hashes are not signatures: a file crafted to match its manifest may reach the parsers, which must read
    nothing but tensors and JSON and fail with a CheckpointError naming the file."""
    _save(tmp_path, 1)
    ckpts = tmp_path / "checkpoints"
    target = checkpoint._paths(ckpts, 1)[part]
    target.write_bytes(content)
    _reseal(ckpts, 1)
    with pytest.raises(checkpoint.CheckpointError, match=target.name.replace(".", r"\.")):
        checkpoint.load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- 2. checksums
def _flip_byte(path, where=-1):
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def _two_checkpoints(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage, file", [
    ("bit flip", "step-00000002.safetensors"),
    ("truncate", "step-00000002.safetensors"),
    ("truncate", "step-00000002.state.safetensors"),
    ("bit flip", "step-00000002.state.json"),
    ("delete", "step-00000002.state.json"),
])
def test_damaged_newest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, damage, file):
    ckpts = _two_checkpoints(tmp_path)
    path = ckpts / file
    if damage == "bit flip":
        _flip_byte(path, len(path.read_bytes()) // 2)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    else:
        path.unlink()
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match=file.replace(".", r"\.")) as rec:
        ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["step"] == 1 and ckpt["train_state"]["step"] == 1 and "step 1" in str(rec[0].message)
    with pytest.raises(checkpoint.CheckpointError, match=file.replace(".", r"\.")):  # named explicitly: no swap
        checkpoint.load_checkpoint(ckpts / "step-00000002.safetensors")


def test_weights_only_load_ignores_a_damaged_training_state(tmp_path):
    ckpts = _two_checkpoints(tmp_path)
    _flip_byte(ckpts / "step-00000002.state.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval/caption read the weights only: they are fine, no warning
        assert checkpoint.load_checkpoint(tmp_path, with_state=False)["step"] == 2


@pytest.mark.parametrize("latest", ["{not json", '{"step": "two"}', '{"step": 9}', ""])
def test_broken_latest_json_falls_back_to_the_newest_good_checkpoint(tmp_path, latest):
    ckpts = _two_checkpoints(tmp_path)
    (ckpts / "latest.json").write_text(latest)
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="latest.json"):
        assert checkpoint.load_checkpoint(tmp_path)["step"] == 2
    (ckpts / "latest.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_checkpoint(tmp_path)["step"] == 2  # no pointer at all: the newest complete one


def test_no_good_checkpoint_is_an_error_listing_every_problem(tmp_path):
    ckpts = _two_checkpoints(tmp_path)
    _flip_byte(ckpts / "step-00000001.safetensors")
    (ckpts / "step-00000002.json").write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint.*step-00000002\.json.*"
                                                         r"step-00000001\.safetensors is damaged"):
        checkpoint.load_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        checkpoint.load_checkpoint(tmp_path / "empty")


def test_pruning_keeps_the_checkpoint_resumed_from(tmp_path):
    _save(tmp_path, 1, keep=1)
    checkpoint.load_checkpoint(tmp_path)  # resumed from step 1 in this process
    _save(tmp_path, 2, keep=1)
    _save(tmp_path, 3, keep=1)
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [3, 1]
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert not any(n.startswith("step-00000002") for n in names)


def test_pruning_does_not_count_a_damaged_checkpoint_as_kept(tmp_path):
    _save(tmp_path, 1, keep=2)
    _save(tmp_path, 2, keep=2)
    _flip_byte(tmp_path / "checkpoints" / "step-00000002.state.safetensors")  # damaged on disk later
    _save(tmp_path, 3, keep=2)
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [3, 2, 1]  # step 1 is the second good one
    _flip_byte(tmp_path / "checkpoints" / "step-00000003.safetensors")
    with pytest.warns(checkpoint.CheckpointFallbackWarning) as rec:
        assert checkpoint.load_checkpoint(tmp_path)["step"] == 1
    assert [str(w.message).split(" is damaged")[0].rsplit("/", 1)[1] for w in rec] == [
        "step-00000003.safetensors", "step-00000002.state.safetensors"]
    _save(tmp_path, 4, keep=2)
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [4, 3, 2, 1]
    _save(tmp_path, 5, keep=2)
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [5, 4, 1]  # 1: resumed from above


def test_stale_temporaries_are_cleaned_when_a_run_starts(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = [ckpts / ".step-00000002.safetensors.k3j2.tmp", tmp_path / ".config.json.x1.tmp"]
    keep = [ckpts / "notes.txt", tmp_path / "data.tmp"]
    for p in stale + keep:
        p.write_text("x")
    removed = run_folder.prepare(tmp_path, resume=None, overwrite=False)
    assert sorted(removed) == sorted(stale) and all(p.exists() for p in keep)


def test_resume_after_a_bit_flip_falls_back_and_resumes_exactly(tmp_path):
    """The issue's case: a bit-flipped newest checkpoint was accepted on --resume (loss 12.7 -> 2592)."""
    run = tmp_path / "run"
    full = pretrain(_cfg(run, steps=6, keep=2))
    final = {k: v.clone() for k, v in full["model"].state_dict().items()}
    _flip_byte(run / "checkpoints" / "step-00000006.safetensors", 200)
    (run / "checkpoints" / ".step-00000006.json.abcd.tmp").write_text("{")  # a killed write
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match=r"step-00000006\.safetensors is damaged"):
        resumed = pretrain(_cfg(None, steps=6, keep=2, resume=str(run)))
    assert resumed["losses"] == full["losses"][4:]  # from step 4, bit for bit
    assert checkpoint.complete_steps(run / "checkpoints") == [6, 4]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    again = checkpoint.load_checkpoint(run)["model_state"]
    assert all(torch.equal(final[k], again[k]) for k in final)


# ---------------------------------------------------------------------------------------------- 3. run folder
def _fake_run(folder):
    (folder / "checkpoints").mkdir(parents=True)
    for name, text in (("metrics.jsonl", '{"step": 1}\n'), ("config.json", "{}"), ("checkpoints/latest.json", "{}")):
        (folder / name).write_text(text)
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("marker", ["metrics.jsonl", "config.json", "checkpoints/x"])
def test_an_existing_run_folder_is_refused_without_resume_or_overwrite(tmp_path, capsys, marker):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / marker).write_text("{}")
    rc = cli.main(["pretrain", "--model", "test-tiny", "--steps", "1", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--out-dir {tmp_path / 'run'} already holds a run" in err and "--resume" in err and "--overwrite" in err


def test_existing_run_is_untouched_and_resuming_another_run_into_it_is_refused(tmp_path, capsys):
    before = _fake_run(tmp_path / "run")
    _save(tmp_path / "other", 1)
    rc = cli.main(["pretrain", "--model", "test-tiny", "--steps", "3", "--resume", str(tmp_path / "other"),
                   "--out-dir", str(tmp_path / "run")])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert run_folder.refusal(tmp_path / "other", tmp_path / "other" / "checkpoints" / "latest.json", False) is None


def test_overwrite_replaces_only_vlcores_files_of_the_old_run(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run)
    _save(run, 50)  # a checkpoint of the old run that the new run's fallback must never find
    (run / "notes.txt").write_text("mine")
    (run / "eval-20260101-120000.json").write_text("{}")  # vlcore eval's output for the old run
    rc = cli.main(["pretrain", "--model", "test-tiny", "--steps", "2", "--batch-size", "4", "--save-every", "1",
                   "--out-dir", str(run), "--overwrite", "--eval", "off", "--quiet", "--device", "cpu"])
    assert rc == 0
    assert checkpoint.complete_steps(run / "checkpoints") == [2, 1]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine" and not (run / "eval-20260101-120000.json").exists()


def test_resume_auto_restarts_a_job_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)  # metrics, config, a latest.json, but no finished save
    (run / "checkpoints" / "step-00000002.safetensors").write_bytes(b"half")  # killed mid-write
    res = pretrain(_cfg(run, steps=2, resume="auto"))
    assert len(res["losses"]) == 2 and checkpoint.complete_steps(run / "checkpoints") == [2]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_auto_continues_a_run_that_lost_its_latest_json(tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(run, steps=2))
    (run / "checkpoints" / "latest.json").unlink()  # the manifests still say which checkpoints are complete
    res = pretrain(_cfg(run, steps=4, resume="auto"))
    assert len(res["losses"]) == 2  # steps 3 and 4: continued, not restarted
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_auto_refuses_a_folder_of_pickled_checkpoints_and_resume_never_restores_overwrite(tmp_path):
    from vlcore.train import resume

    run = tmp_path / "run"
    _plant_pickled_state(run, tmp_path / "pwned")
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(run_folder.RunFolderExists):
        pretrain(_cfg(run, resume="auto"))
    assert (run / "checkpoints" / "step-00000001.state.pt").exists() and not (tmp_path / "pwned").exists()
    merged, _, _ = resume.merge_settings(_cfg(run), {"overwrite": True, "weight_decay": 0.5})
    assert merged.weight_decay == 0.5 and merged.overwrite is False  # a per-launch decision, never taken from the run


# ---------------------------------------------------------------------------------------------- 4. disk full
_DISK_FULL = [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
              'device" })'),
]


@pytest.mark.parametrize("error", _DISK_FULL, ids=["torch", "oserror", "safetensors"])
@pytest.mark.parametrize("nth", [1, 2])
def test_disk_full_is_reported_as_such_and_the_previous_checkpoint_survives(tmp_path, monkeypatch, error, nth):
    _save(tmp_path, 1)
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == nth:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise error
        return real(tensors, path, metadata=metadata)

    real = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError) as e:
        _save(tmp_path, 2)
    name = "step-00000002.safetensors" if nth == 1 else "step-00000002.state.safetensors"
    assert e.value.errno == errno.ENOSPC and str(e.value) == f"no space left on device writing " \
                                                             f"{tmp_path / 'checkpoints' / name}"
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_checkpoint(tmp_path)["step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_disk_full_writing_the_manifest_keeps_the_previous_pointer(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = checkpoint.Path.write_text

    def full_disk(self, text, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.Path, "write_text", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"no space left on device writing .*step-00000002"):
        _save(tmp_path, 2)
    monkeypatch.setattr(checkpoint.Path, "write_text", real)
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 1


def test_pretrain_on_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    def full_disk(tensors, path, metadata=None):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    rc = cli.main(["pretrain", "--model", "test-tiny", "--steps", "1", "--batch-size", "2", "--out-dir",
                   str(tmp_path / "run"), "--eval", "off", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("vlcore pretrain: no space left on device writing ")
