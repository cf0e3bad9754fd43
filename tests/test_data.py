"""Data pipeline: tokenizer, the embedded digits-scenes dataset, tar shards / JSONL manifests, batches."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from vlcore import tokens
from vlcore.data.digits_scenes import (
    ANSWERS,
    DigitsScenes,
    load_scans,
    retrieval_set,
    scenes_to_arrays,
    zero_shot_set,
)
from vlcore.data.loader import Collator, DigitsSource, ShardSource
from vlcore.data.shards import ShardStream, expand_urls, read_captions
from vlcore.data.tokenizer import ByteBPETokenizer

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def train_ds():
    return DigitsScenes("train", seed=3)


@pytest.fixture(scope="module")
def tok(train_ds):
    return ByteBPETokenizer.train([s.caption for s in train_ds.scenes(range(300))], vocab_size=400)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_any_text(tok):
    for text in ["a 3 left of a 7", "a 0", "Ünïcode ✓ and emoji 🙂", "", "  spaces\tand\nnewlines ", "a 12345"]:
        assert tok.decode(tok.encode(text)) == text
    assert all(tokens.NUM_SPECIAL <= i < tok.vocab_size for i in tok.encode("anything at all 🙂"))


def test_tokenizer_learns_words_and_keeps_digits_apart(tok):
    # frequent words become one token each; digits never merge with each other
    assert len(tok.encode(" left")) == 1 and len(tok.encode(" above")) == 1
    ids = tok.encode("a 37")
    assert tok.decode(ids[-1:]) == "7" and len(ids) >= 3


def test_tokenizer_training_is_deterministic_and_saves(tok, tmp_path, train_ds):
    again = ByteBPETokenizer.train([s.caption for s in train_ds.scenes(range(300))], vocab_size=400)
    assert again.merges == tok.merges
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = ByteBPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.vocab_size == tok.vocab_size
    assert loaded.encode("a 9 above a 1") == tok.encode("a 9 above a 1")
    with pytest.raises(ValueError, match="kind"):
        ByteBPETokenizer.from_dict({"kind": "sentencepiece", "merges": []})
    with pytest.raises(FileNotFoundError):
        ByteBPETokenizer.load(tmp_path / "missing.json")


def test_tokenizer_batch_layout(tok):
    ids, mask = tok.batch(["a 3 left of a 7", "a 1", "a 1 above a 2 above a 3 " * 5], max_len=10)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (3, 10)
    assert (ids[:, 0] == tokens.BOS).all()
    n1 = len(tok.encode("a 1"))
    assert ids[1, n1 + 1] == tokens.EOS and (ids[1, n1 + 2:] == tokens.PAD).all()
    assert mask[1].sum() == n1 + 2 and mask[1, : n1 + 2].all()
    assert ids[2, -1] == tokens.EOS and mask[2].all()  # cut to length, still ends with EOS
    assert tok.decode(ids[0, 1:].tolist()) == "a 3 left of a 7"


# ---------------------------------------------------------------------------------------------- digits-scenes
def test_scenes_are_deterministic_per_seed(train_ds):
    other = DigitsScenes("train", seed=3)
    a, b = train_ds.scene(17), other.scene(17)
    assert a.caption == b.caption and np.array_equal(a.image, b.image) and a.boxes == b.boxes
    c = DigitsScenes("train", seed=4).scene(17)
    assert not np.array_equal(a.image, c.image)


def test_splits_are_disjoint_by_digit_instance(train_ds):
    test = DigitsScenes("test", seed=3)
    scans, labels = load_scans()
    assert set(train_ds.scan_ids).isdisjoint(test.scan_ids)
    assert len(train_ds) + len(test) == len(labels)
    assert set(labels[test.scan_ids]) == set(range(10))  # every class held out
    # a test scene is made of test scans only: each single-digit test image equals its upscaled test scan
    for i in range(5):
        s = test.scene(i, n_digits=1, scan=i)
        x0, y0 = (round((c - w / 2) * 64) for c, w in zip(s.boxes[0][:2], s.boxes[0][2:]))
        size = round(s.boxes[0][2] * 64)
        patch = s.image[y0:y0 + size, x0:x0 + size]
        assert np.array_equal(patch, test._glyphs[size][i])
        assert s.digits[0] == labels[test.scan_ids[i]]


def test_captions_match_boxes_and_answers(train_ds):
    for s in train_ds.scenes(range(200)):
        k = len(s.digits)
        assert s.caption.count("a ") == k and s.phrases == [f"a {d}" for d in s.digits]
        if k > 1:
            axis = 0 if " left of " in s.caption else 1
            centres = [b[axis] for b in s.boxes]
            assert centres == sorted(centres) and len(set(centres)) == k
        for cx, cy, w, h in s.boxes:
            x0, y0 = int(round((cx - w / 2) * 64)), int(round((cy - h / 2) * 64))
            assert 0 <= x0 and x0 + round(w * 64) <= 64 and 0 <= y0 and y0 + round(h * 64) <= 64
            assert s.image[y0:y0 + round(h * 64), x0:x0 + round(w * 64)].max() > 0.3  # ink inside the box
        answer = ANSWERS[s.answer]
        if s.question.startswith("how many"):
            assert answer == ("one", "two", "three")[k - 1]
        else:
            assert answer == str(s.digits[0] if "first" in s.question else s.digits[-1])


def test_eval_sets():
    zs = zero_shot_set()
    images, labels = zs["image"], zs["label"]
    test = DigitsScenes("test")
    assert images.shape == (len(test), 3, 64, 64) and torch.equal(labels, torch.from_numpy(test.labels))
    assert images.min() >= -1 and images.max() <= 1
    scenes = retrieval_set(100)
    assert len({s.caption for s in scenes}) == 100
    again = retrieval_set(100)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(scenes, again))


def test_digits_source_batches_and_position(train_ds, tok):
    col = Collator(tok, max_text_len=16)
    src = DigitsSource(train_ds, col, batch_size=4, rank=1, world_size=2)
    b0, b1 = src.next_batch(), src.next_batch()
    assert b0["image"].shape == (4, 3, 64, 64) and b0["text"].shape == (4, 16)
    assert b0["boxes"].shape == (4, 3, 4) and b0["box_text"].shape == (4, 3, 6) and b0["answer"].shape == (4,)
    assert (b0["box_text_mask"].any(-1) == b0["box_valid"]).all()
    assert ((b0["box_labels"] >= 0) == b0["box_valid"]).all()
    # rank 1 of 2, batch 0 holds scenes 4..7; batch 1 scenes 12..15
    expect = scenes_to_arrays(train_ds.scenes(range(12, 16)))
    assert torch.equal(b1["image"], expect["image"])
    again = DigitsSource(train_ds, col, batch_size=4, rank=1, world_size=2)
    again.load_state_dict(DigitsSource(train_ds, col, 4, 1, 2).state_dict() | {"position": 1})
    assert torch.equal(again.next_batch()["text"], b1["text"])


# ---------------------------------------------------------------------------------------------- shards
def _jpeg(level: int, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    PIL.new("RGB", size, (level, level, level)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shard(path, first: int, n: int, broken: dict):
    """img2dataset layout; sample k's image is gray level 8*k and its caption 'sample k'."""
    with tarfile.open(path, "w") as tf:
        for k in range(first, first + n):
            key = f"{k:09d}"
            kind = broken.get(k)
            if kind != "missing":
                _add(tf, f"{key}.jpg", b"\xff\xd8 not a jpeg" if kind == "corrupt" else _jpeg(8 * k))
            if kind != "nocaption":
                _add(tf, f"{key}.txt", f"sample {k}".encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "status": "success", "caption": None if kind ==
                                                "nocaption" else f"sample {k}"}).encode())


def _level(image: torch.Tensor) -> int:
    return round(float((image.mean() * 0.5 + 0.5) * 255) / 8)


def test_shards_skip_corrupt_and_missing_without_shifting_labels(tmp_path):
    broken = {2: "corrupt", 5: "missing", 7: "nocaption", 12: "corrupt"}
    _write_shard(tmp_path / "s-00000.tar", 0, 10, broken)
    _write_shard(tmp_path / "s-00001.tar", 10, 10, broken)
    stream = ShardStream(str(tmp_path / "s-{00000..00001}.tar"), image_size=16, epochs=1)
    samples = list(stream)
    seen = [int(s["caption"].split()[1]) for s in samples]
    assert seen == [k for k in range(20) if k not in broken]
    for s in samples:  # every caption still sits with its own image
        assert _level(s["image"]) == int(s["caption"].split()[1]) and s["image"].shape == (3, 16, 16)
    assert stream.skipped == len(broken) and sum(samples[-1]["_skips"][0].values()) == len(broken)


def test_truncated_and_unreadable_shards_are_counted(tmp_path):
    _write_shard(tmp_path / "good.tar", 0, 4, {})
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 3)
    stream = ShardStream([str(tmp_path / n) for n in ("cut.tar", "junk.tar", "good.tar")], image_size=8, epochs=1)
    samples = list(stream)
    caps = [s["caption"] for s in samples]
    assert caps[-4:] == [f"sample {k}" for k in range(4)]  # the good shard is whole
    assert all(_level(s["image"]) == int(s["caption"].split()[1]) for s in samples)
    assert stream.skipped >= 2


def test_shard_source_workers_split_and_count(tmp_path):
    broken = {3: "corrupt", 14: "missing", 25: "corrupt"}
    for i in range(4):
        _write_shard(tmp_path / f"p-{i}.tar", 8 * i, 8, broken)
    tok = ByteBPETokenizer.train(read_captions(str(tmp_path / "p-{0..3}.tar")), vocab_size=300)
    stream = ShardStream(expand_urls(str(tmp_path)), image_size=8, epochs=1)
    src = ShardSource(stream, Collator(tok, max_text_len=8), batch_size=2, num_workers=2)
    keys = []
    with pytest.raises(RuntimeError, match="ended"):
        while True:
            b = src.next_batch()
            assert b["image"].shape == (2, 3, 8, 8) and b["text"].shape == (2, 8)
            for img, ids in zip(b["image"], b["text"]):
                k = int(tok.decode(ids[1:].tolist()).split()[1])
                assert _level(img) == k
                keys.append(k)
    # 29 valid samples; each of the 2 workers batches its own shards (15 and 14 samples), dropping a last odd one
    assert len(keys) == len(set(keys)) == 28 and set(keys) <= {k for k in range(32) if k not in broken}
    assert src.skipped == len(broken)


def test_manifest_skips_missing_images(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for k in range(6):
        if k != 4:
            (tmp_path / "img" / f"{k}.jpg").write_bytes(b"broken" if k == 1 else _jpeg(8 * k))
        lines.append(json.dumps({"image": f"img/{k}.jpg", "caption": f"sample {k}",
                                 "boxes": [[0.5, 0.5, 0.2, 0.2]], "phrases": [f"thing {k}"]}))
    lines.insert(3, "{not json")
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    stream = ShardStream(str(tmp_path / "m.jsonl"), image_size=8, epochs=1)
    samples = list(stream)
    assert [s["caption"] for s in samples] == [f"sample {k}" for k in (0, 2, 3, 5)]
    assert all(_level(s["image"]) == int(s["caption"].split()[1]) for s in samples)
    assert stream.skipped == 3
    tok = ByteBPETokenizer.train(["sample thing"], vocab_size=300)
    batch = Collator(tok, max_text_len=8, max_phrase_len=12)(samples)
    assert batch["boxes"].shape == (4, 3, 4) and batch["box_valid"].sum() == 4
    assert tok.decode(batch["box_text"][1, 0].tolist()[1:]) == "thing 2"
