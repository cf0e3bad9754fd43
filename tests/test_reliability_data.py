"""Readers under bad data: every malformed sample is a counted skip with its reason and key, a pass with no
usable sample or too many bad ones stops at once with a clear error, a missing path fails before any work, and
random bytes never hang or raise anything else."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
import torch

from vlcore.data import skips
from vlcore.data.loader import Collator, ShardSource
from vlcore.data.shards import ShardStream, expand_urls, read_captions
from vlcore.data.skips import DataError
from vlcore.data.tokenizer import ByteBPETokenizer

PIL = pytest.importorskip("PIL.Image")


class Hang(BaseException):
    """Not an Exception: a reader's own ``except Exception`` must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the bug was an endless loop at 100 % CPU)."""
    def expire(*_):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _png(level: int = 100, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    PIL.new("RGB", size, (level, level, level)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (what a decompression bomb looks like)."""
    data = bytearray(_png())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _add(tf, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar(path, samples: list[dict]):
    """samples: {"key", optional "png" bytes, "txt" bytes, "json" (object or raw bytes)}."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            if "png" in s:
                _add(tf, f"{s['key']}.png", s["png"])
            if "txt" in s:
                _add(tf, f"{s['key']}.txt", s["txt"])
            if "json" in s:
                raw = s["json"] if isinstance(s["json"], bytes) else json.dumps(s["json"]).encode()
                _add(tf, f"{s['key']}.json", raw)


# (key, members, expected reason or None for a good sample); every field of issue 20's list, one each
TAR_CASES = [
    ("good1", {"png": _png(10), "json": {"caption": "good one", "boxes": [[0.5, 0.5, 0.2, 0.2]]}}, None),
    ("intcap", {"png": _png(), "json": {"caption": 12345}}, skips.BAD_CAPTION_TYPE),
    ("listcap", {"png": _png(), "json": {"caption": ["a", "b"]}}, skips.BAD_CAPTION_TYPE),
    ("boxstr", {"png": _png(), "json": {"caption": "x", "boxes": "abc"}}, skips.BAD_BOXES),
    ("box2", {"png": _png(), "json": {"caption": "x", "boxes": [[0.5, 0.5]]}}, skips.BAD_BOXES),
    ("box3", {"png": _png(), "json": {"caption": "x", "boxes": [[0.5, 0.5, 0.1]]}}, skips.BAD_BOXES),
    ("boxflat", {"png": _png(), "json": {"caption": "x", "boxes": [0.5, 0.5, 0.1, 0.1]}}, skips.BAD_BOXES),
    ("boxnan", {"png": _png(), "json": b'{"caption": "x", "boxes": [[NaN, 0.5, 0.1, 0.1]]}'}, skips.BAD_BOXES),
    ("boxbool", {"png": _png(), "json": {"caption": "x", "boxes": [[True, 0.5, 0.1, 0.1]]}}, skips.BAD_BOXES),
    ("phr", {"png": _png(), "json": {"caption": "x", "boxes": [[0.5, 0.5, 0.1, 0.1]], "phrases": [1]}},
     skips.BAD_PHRASES),
    ("empty", {"png": _png(), "txt": b"   \n"}, skips.EMPTY_CAPTION),
    ("nocap", {"png": _png(), "json": {"caption": None}}, skips.NO_CAPTION),
    ("latin1", {"png": _png(), "txt": "caf\xe9".encode("latin-1")}, skips.NON_UTF8_TEXT),
    ("badjson", {"png": _png(), "txt": b"fine", "json": b"{oops"}, skips.BAD_JSON),
    ("jsonlist", {"png": _png(), "json": [1, 2]}, skips.BAD_JSON),
    ("trunc", {"png": _png()[:40], "txt": b"cut image"}, skips.UNDECODABLE_IMAGE),
    ("junk", {"png": b"\x89PNG not really", "txt": b"junk image"}, skips.UNDECODABLE_IMAGE),
    ("bomb", {"png": _bomb(20000, 20000), "txt": b"bomb"}, skips.IMAGE_TOO_LARGE),
    ("bombwarn", {"png": _bomb(10000, 9000), "txt": b"over the warning level"}, skips.IMAGE_TOO_LARGE),
    ("noimg", {"txt": b"caption without image"}, skips.NO_IMAGE),
    ("good2", {"png": _png(200), "txt": "ünïcode ✓".encode()}, None),
]


def test_every_malformed_tar_sample_is_skipped_by_reason(tmp_path):
    _tar(tmp_path / "s.tar", [{"key": k, **m} for k, m, _ in TAR_CASES])
    stream = ShardStream(str(tmp_path / "s.tar"), image_size=8, epochs=1)
    with deadline(60):
        samples = list(stream)
    assert [s["caption"] for s in samples] == ["good one", "ünïcode ✓"]
    assert samples[0]["boxes"] == [(0.5, 0.5, 0.2, 0.2)] and samples[0]["phrases"] == [""]
    expected: dict[str, int] = {}
    for _, _, reason in TAR_CASES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert stream.skip_reasons() == expected and stream.skipped == len(TAR_CASES) - 2
    # the first offending keys are named, shard and key
    assert stream.skips.examples[skips.BAD_CAPTION_TYPE] == [f"{tmp_path / 's.tar'}:intcap",
                                                              f"{tmp_path / 's.tar'}:listcap"]
    assert f"{tmp_path / 's.tar'}:bomb" in stream.skips.describe()
    # the survivors batch without error (the bug: AttributeError in the collator)
    tok = ByteBPETokenizer.train(["good one"], vocab_size=300)
    batch = Collator(tok, max_text_len=8)(samples)
    assert batch["image"].shape == (2, 3, 8, 8) and batch["box_valid"].tolist() == [[True, False, False],
                                                                                    [False, False, False]]


def test_every_malformed_manifest_line_is_skipped_by_reason(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(50))
    (tmp_path / "trunc.png").write_bytes(_png()[:30])
    (tmp_path / "folder.png").mkdir()
    lines = [
        json.dumps({"image": "ok.png", "caption": "fine"}).encode(),
        json.dumps({"image": "gone.png", "caption": "missing file"}).encode(),
        json.dumps({"image": 12, "caption": "image is a number"}).encode(),
        json.dumps({"caption": "no image"}).encode(),
        json.dumps({"image": "ok.png", "caption": 12345}).encode(),
        json.dumps({"image": "ok.png", "caption": ""}).encode(),
        json.dumps({"image": "ok.png", "caption": "x", "boxes": "abc"}).encode(),
        json.dumps({"image": "ok.png", "caption": "x", "boxes": [[0.1, 0.2, 0.3]]}).encode(),
        json.dumps({"image": "trunc.png", "caption": "truncated"}).encode(),
        json.dumps({"image": "folder.png", "caption": "a directory"}).encode(),
        b'{"image": "ok.png", "caption": "caf\xe9"}',  # latin-1 byte in the line
        b"[1, 2, 3]",
        b"{not json",
        json.dumps({"image": "ok.png", "caption": "fine again", "boxes": [[0.5, 0.5, 1, 1]],
                    "phrases": ["all"]}).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    stream = ShardStream(str(tmp_path / "m.jsonl"), image_size=8, epochs=1)
    with deadline(30):
        samples = list(stream)
    assert [s["caption"] for s in samples] == ["fine", "fine again"]
    assert stream.skip_reasons() == {
        skips.MISSING_IMAGE_FILE: 1, skips.BAD_IMAGE_FIELD: 1, skips.NO_IMAGE: 1, skips.BAD_CAPTION_TYPE: 1,
        skips.EMPTY_CAPTION: 1, skips.BAD_BOXES: 2, skips.UNDECODABLE_IMAGE: 1, skips.UNREADABLE_IMAGE_FILE: 1,
        skips.NON_UTF8_TEXT: 1, skips.BAD_JSON: 2}
    assert stream.skips.examples[skips.MISSING_IMAGE_FILE] == [f"{tmp_path / 'm.jsonl'}:2"]
    # tokenizer training reads the same captions and leaves out the bad ones (12345 was "12345" before)
    assert read_captions(str(tmp_path / "m.jsonl")) == ["fine", "missing file", "image is a number", "no image",
                                                        "x", "x", "truncated", "a directory", "fine again"]


def _non_images_tar(path, n=6):
    _tar(path, [{"key": f"{i:04d}", "png": b"text, not an image " * 4, "txt": b"a caption"} for i in range(n)])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_without_one_usable_sample_stops_at_once(tmp_path, workers):
    _non_images_tar(tmp_path / "a.tar")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"image": f"gone{i}.png", "caption": "c"}) + "\n"
                                              for i in range(5)))
    tok = ByteBPETokenizer.train(["a caption"], vocab_size=300)
    for data, reason in [("a.tar", skips.UNDECODABLE_IMAGE), ("b.jsonl", skips.MISSING_IMAGE_FILE)]:
        stream = ShardStream(str(tmp_path / data), image_size=8)  # endless: epochs=None
        source = ShardSource(stream, Collator(tok), batch_size=2, num_workers=workers)
        t0 = time.perf_counter()
        with deadline(60), pytest.raises(DataError) as e:
            source.next_batch()
        msg = str(e.value)
        assert "no usable sample in a whole pass" in msg and reason in msg and str(tmp_path / data) in msg, msg
        assert "\n" not in msg and "Traceback" not in msg  # one clean line, also from a worker process
        assert time.perf_counter() - t0 < 30


def test_max_bad_fraction_stops_with_counts_by_reason(tmp_path):
    members = [{"key": f"{i:04d}", "png": _png(i) if i % 4 else b"broken", "txt": f"c {i}".encode()}
               for i in range(40)]
    _tar(tmp_path / "q.tar", members)  # 25 % undecodable
    url = str(tmp_path / "q.tar")
    with deadline(60), pytest.raises(DataError) as e:
        list(ShardStream(url, image_size=8, epochs=1, max_bad_fraction=0.1))
    msg = str(e.value)
    assert "10 of 40 samples (25.0 %)" in msg and "--max-bad-fraction 0.1" in msg
    assert f"undecodable_image 10 (first: {url}:0000, {url}:0004, {url}:0008)" in msg
    assert len(list(ShardStream(url, image_size=8, epochs=1, max_bad_fraction=0.3))) == 30
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        ShardStream(url, max_bad_fraction=1.5)


def test_a_long_bad_start_stops_before_the_pass_ends(tmp_path, monkeypatch):
    from vlcore.data import shards

    monkeypatch.setattr(shards, "MIN_SAMPLES_FOR_FRACTION", 20)
    members = [{"key": f"{i:04d}", "png": b"broken" if i < 30 else _png(), "txt": b"c"} for i in range(400)]
    _tar(tmp_path / "r.tar", members)
    stream = ShardStream(str(tmp_path / "r.tar"), image_size=8, max_bad_fraction=0.5)
    with deadline(60), pytest.raises(DataError, match="20 of 20 samples"):
        next(iter(stream))


def test_skip_counts_after_a_resume_equal_the_uninterrupted_run(tmp_path):
    members = [{"key": f"{i:04d}", "png": b"junk" if i % 5 == 2 else _png(i), "txt": f"c {i}".encode()}
               for i in range(30)]
    _tar(tmp_path / "u.tar", members)
    tok = ByteBPETokenizer.train(["c 1"], vocab_size=300)

    def source():
        return ShardSource(ShardStream(str(tmp_path / "u.tar"), image_size=8, shuffle_buffer=4), Collator(tok),
                           batch_size=3, num_workers=0)

    straight = source()
    for _ in range(11):
        straight.next_batch()
    resumed = source()
    for _ in range(4):
        resumed.next_batch()
    again = source()
    again.load_state_dict(resumed.state_dict())
    for _ in range(7):
        again.next_batch()
    assert again.skip_reasons() == straight.skip_reasons() == {skips.UNDECODABLE_IMAGE: 9}
    assert again.skip_summary() == straight.skip_summary() and again.state_dict() == straight.state_dict()


def test_missing_paths_are_errors_before_any_work(tmp_path):
    _non_images_tar(tmp_path / "s-0.tar")
    (tmp_path / "empty").mkdir()
    cases = {
        f"{tmp_path}/nope.tar": f"no such file '{tmp_path}/nope.tar'",
        f"{tmp_path}/*.tgz": f"the pattern '{tmp_path}/*.tgz' matches no file",
        f"{tmp_path}/s-{{0..2}}.tar": f"no such file '{tmp_path}/s-1.tar' and 1 more",
        f"{tmp_path}/s-{{3..2}}.tar": "the range {3..2} is empty",
        f"{tmp_path}/empty": f"the folder '{tmp_path}/empty' holds no .tar or .jsonl file",
        f"{tmp_path}/s-0.tar,{tmp_path}/gone.jsonl": f"no such file '{tmp_path}/gone.jsonl'",
        " , ": "names no shard or manifest",
    }
    for spec, message in cases.items():
        with pytest.raises(DataError) as e:
            ShardStream(spec)
        assert message in str(e.value) and repr(spec) in str(e.value)
    assert expand_urls(f"{tmp_path}/s-{{0..0}}.tar") == expand_urls(str(tmp_path)) == [f"{tmp_path}/s-0.tar"]


def _mutations(valid: bytes, rng: np.random.Generator, n: int):
    """Random bytes, truncations, bit flips and spliced garbage of a valid file."""
    for i in range(n):
        kind = i % 4
        if kind == 0:
            yield rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
        elif kind == 1:
            yield valid[: int(rng.integers(0, len(valid)))]
        elif kind == 2:
            data = bytearray(valid)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 16))):
                data[pos] ^= 1 << int(rng.integers(8))
            yield bytes(data)
        else:
            pos = int(rng.integers(0, len(valid)))
            yield valid[:pos] + rng.integers(0, 256, 512, dtype=np.uint8).tobytes() + valid[pos:]


def test_fuzz_random_bytes_never_hang_or_raise(tmp_path):
    rng = np.random.default_rng(20)
    (tmp_path / "img.png").write_bytes(_png(70))
    _tar(tmp_path / "valid.tar", [{"key": f"{i:03d}", **m} for i, (_, m, _) in enumerate(TAR_CASES[:3])])
    valid_manifest = b"".join(json.dumps({"image": "img.png", "caption": f"c{i}", "boxes": [[0.5, 0.5, .1, .1]]})
                              .encode() + b"\n" for i in range(4))
    cases = [("t.tar", d) for d in _mutations((tmp_path / "valid.tar").read_bytes(), rng, 120)]
    cases += [("m.jsonl", d) for d in _mutations(valid_manifest, rng, 120)]
    t0, outcomes = time.perf_counter(), {"samples": 0, "skips": 0, "data_error": 0}
    with deadline(240):
        for name, data in cases:
            (tmp_path / name).write_bytes(data)
            stream = ShardStream(str(tmp_path / name), image_size=8, epochs=2)
            try:
                for s in stream:
                    assert s["image"].shape == (3, 8, 8) and torch.isfinite(s["image"]).all()
                    assert isinstance(s["caption"], str) and s["caption"].strip() == s["caption"] != ""
                    assert all(len(b) == 4 and 0 <= min(b) and max(b) <= 1 for b in s.get("boxes", []))
                    outcomes["samples"] += 1
            except DataError as e:
                assert "no usable sample in a whole pass" in str(e)
                outcomes["data_error"] += 1
            outcomes["skips"] += stream.skipped
            read_captions(str(tmp_path / name))  # the tokenizer's reader takes the same bytes
    assert len(cases) == 240 and all(outcomes.values()), outcomes
    assert time.perf_counter() - t0 < 240


def test_pretrain_counts_skips_in_every_record_and_the_summary(tmp_path, capsys):
    import tiny_vlm  # noqa: F401  (registers test-tiny)

    from vlcore import cli

    bad = {1, 6, 11}  # 3 of 16 undecodable: 19 %
    _tar(tmp_path / "d.tar", [{"key": f"{i:04d}", "png": b"broken" if i in bad else _png(8 * i, (40, 36)),
                               "txt": f"sample {i}".encode()} for i in range(16)])
    common = ["pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny", "--data", str(tmp_path / "d.tar"),
              "--image-size", "32", "--batch-size", "2", "--warmup", "1", "--device", "cpu", "--quiet",
              "--shuffle-buffer", "0"]
    # the default --max-bad-fraction 0.1 stops the run with the counts by reason, in one line, exit 2
    with deadline(120):
        rc = cli.main(common + ["--steps", "8", "--out-dir", str(tmp_path / "stopped")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "3 of 16 samples (18.8 %) were unusable, above --max-bad-fraction 0.1" in err
    assert f"undecodable_image 3 (first: {tmp_path / 'd.tar'}:0001, " in err

    with deadline(180):
        rc = cli.main(common + ["--steps", "9", "--max-bad-fraction", "0.25", "--log-every", "4",
                                "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 8, 9]
    # the skips met up to each step's batch: 0,[1],2 | 3,4 | 5,[6],7 | 8,9 || ... 15,0' | [1'],2',3' | 4',5'
    expected = {1: 1, 4: 2, 8: 4, 9: 4}
    for r in records:
        n = expected[r["step"]]
        assert r["skipped_samples"] == n and r["skipped_by_reason"] == {"undecodable_image": n}, r
    assert f"skipped 4 samples: undecodable_image 4 (first: {tmp_path / 'd.tar'}:0001, " in out
