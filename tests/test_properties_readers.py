"""Property tests: the data readers (tar shards, JSONL manifests, the images in them) on random and broken bytes.

Every read finishes within a time bound (SIGALRM), yields only well-formed samples (a finite (3, s, s) image, a
non-empty caption, boxes of 4 numbers with one phrase each) or skips, and a finite ShardStream counts every skip;
no other exception escapes, except the documented error of a pass in which no sample is readable.
Inputs: random bytes; valid tars of random members (valid, truncated, random or decompression-bomb images, JSON
or text captions, non-UTF-8 text) whole, truncated or with flipped bytes; manifests of random lines.
Wrong JSON types, non-UTF-8 manifest lines, blank .json captions and an endless stream without a readable sample
have tests of their own (strategies aimed at them).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import struct
import tarfile
import tempfile
import zlib

import pytest
import torch
from conftest import check_property

from vlcore.data.shards import ShardStream, iter_source

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install vlcore[dev])")
from hypothesis import strategies as st  # noqa: E402

SIZE = 8  # decoded image side: tiny, the decoder's cost is not what is tested
TIME_LIMIT_S = 10.0  # per example; a reader that needs longer on a few KiB is hanging
# the documented error of a pass without one readable sample (a clear error instead of an endless loop)
NO_READABLE_SAMPLE = (ValueError, RuntimeError)


def _png(width: int, height: int, *, bomb: bool = False) -> bytes:
    """A PNG of random-looking pixels; ``bomb``: a header claiming width x height pixels over tiny data."""
    if not bomb:
        from PIL import Image

        buf = io.BytesIO()
        Image.frombytes("RGB", (width, height), bytes(range(256)) * (3 * width * height // 256 + 1)).save(buf, "PNG")
        return buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


GOOD_IMAGE = _png(12, 9)
IMAGES = st.one_of(
    st.just(GOOD_IMAGE),
    st.integers(0, len(GOOD_IMAGE) - 1).map(lambda n: GOOD_IMAGE[:n]),  # truncated
    st.binary(max_size=200),  # not an image
    st.just(_png(100_000, 100_000, bomb=True)),  # far past PIL's decompression-bomb limit
)
TEXT = st.one_of(st.text(max_size=30), st.just("   "), st.just(""))
BOX = st.lists(st.floats(0, 1), min_size=4, max_size=4)
WELL_TYPED_META = st.fixed_dictionaries({}, optional={"caption": TEXT, "boxes": st.lists(BOX, max_size=3)})
# wrong JSON types: what a hand-written or half-converted manifest holds
WRONG_META = st.one_of(
    st.fixed_dictionaries({"caption": st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers()),
                                                st.booleans(), st.none(), st.dictionaries(st.text(max_size=3),
                                                                                          st.integers()))}),
    st.fixed_dictionaries({"caption": st.just("a cat"),
                           "boxes": st.one_of(st.text(min_size=1, max_size=5), st.integers(),
                                              st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=3),
                                                       min_size=1, max_size=2),
                                              st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=2))}),
    st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
)


@st.composite
def tar_members(draw, meta=WELL_TYPED_META) -> list[tuple[str, bytes]]:
    """(name, data) members grouped by key: a plausible sample (an image and a caption) or random parts."""
    members = []
    for i in range(draw(st.integers(0, 4))):
        key = f"{draw(st.sampled_from(['', 'd/', '../']))}{i:05d}"
        if draw(st.booleans()):  # a readable sample, unless its caption is blank
            members.append((f"{key}.{draw(st.sampled_from(['png', 'jpg']))}", GOOD_IMAGE))
            parts = [draw(st.sampled_from(["txt", "json"]))]
        else:
            parts = draw(st.lists(st.sampled_from(["png", "jpg", "txt", "json", "cls", "raw"]), max_size=4,
                                  unique=True))
        for ext in parts:
            if ext in ("png", "jpg"):
                data = draw(IMAGES)
            elif ext == "txt":
                data = draw(st.one_of(TEXT.map(str.encode), st.binary(max_size=20)))  # also non-UTF-8
            elif ext == "json":
                data = draw(st.one_of(meta.map(lambda m: json.dumps(m).encode()), st.binary(max_size=20)))
            else:
                data = draw(st.binary(max_size=20))
            members.append((f"{key}.{ext}", data))
    return members


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@st.composite
def tar_shards(draw, meta=WELL_TYPED_META) -> bytes:
    how = draw(st.sampled_from(["random", "whole", "whole", "truncated", "flipped"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    data = _tar_bytes(draw(tar_members(meta)))
    if how == "truncated":
        return data[: draw(st.integers(0, len(data)))]
    if how == "flipped":
        data = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[at] ^= 0xFF
        return bytes(data)
    return data


class ReaderTimeout(BaseException):
    """Not an OSError (as TimeoutError is) nor an Exception: the readers' own except clauses cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """ReaderTimeout in the main thread after ``seconds`` (a reader that loops forever fails instead of hanging)."""
    def expire(signum, frame):
        raise ReaderTimeout(f"the reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_well_formed(sample: dict) -> None:
    image = sample["image"]
    assert isinstance(image, torch.Tensor) and image.shape == (3, SIZE, SIZE) and bool(image.isfinite().all())
    assert isinstance(sample["caption"], str) and sample["caption"].strip(), f"caption {sample['caption']!r}"
    boxes = sample.get("boxes", [])
    assert all(len(b) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in b) for b in boxes), boxes
    assert len(sample.get("phrases", boxes)) == len(boxes)
    assert all(isinstance(p, str) for p in sample.get("phrases", []))


def read_everything(path: str) -> tuple[int, int]:
    """(samples, skips) of one source read to its end, within the time limit; every sample well formed."""
    samples = skips = 0
    with time_limit(TIME_LIMIT_S):
        for item in iter_source(path, SIZE):
            if isinstance(item, dict):
                assert_well_formed(item)
                samples += 1
            else:  # a skip marker (None)
                skips += 1
    return samples, skips


def stream_once(path: str, expected: tuple[int, int]) -> None:
    """A one-epoch ShardStream yields the same samples and counts every skip (or stops with the documented
    error when nothing is readable)."""
    stream = ShardStream([path], image_size=SIZE, epochs=1)
    samples = 0
    try:
        with time_limit(TIME_LIMIT_S):
            for sample in stream:
                assert_well_formed(sample)
                samples += 1
    except NO_READABLE_SAMPLE:
        assert expected[0] == 0, "only a pass without one readable sample may stop with an error"
        return
    assert (samples, stream.skipped) == expected


def _check_file(data: bytes, suffix: str, extra_files: dict[str, bytes] | None = None) -> None:
    with tempfile.TemporaryDirectory() as root:
        for name, content in (extra_files or {}).items():
            with open(os.path.join(root, name), "wb") as f:
                f.write(content)
        path = os.path.join(root, "source" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        stream_once(path, read_everything(path))


def test_tar_shards_of_random_bytes():
    check_property(tar_shards(), lambda data: _check_file(data, ".tar"), 40)


@st.composite
def wrongly_typed_tars(draw) -> list[tuple[str, bytes]]:
    """Keys with a good image and a JSON member of wrong types (and sometimes a .txt caption)."""
    members = []
    for i in range(draw(st.integers(1, 3))):
        members.append((f"{i:05d}.png", GOOD_IMAGE))
        if draw(st.booleans()):
            members.append((f"{i:05d}.txt", b"a caption"))
        members.append((f"{i:05d}.json", json.dumps(draw(WRONG_META)).encode()))
    return members


def test_tar_shards_with_wrong_json_types():
    check_property(wrongly_typed_tars(), lambda members: _check_file(_tar_bytes(members), ".tar"), 30)


IMAGE_FILES = {"good.png": GOOD_IMAGE, "cut.png": GOOD_IMAGE[:40], "noise.png": b"\x00\x01not an image",
               "bomb.png": _png(100_000, 100_000, bomb=True)}
IMAGE_REFS = st.one_of(st.just("good.png"), st.sampled_from([*IMAGE_FILES, "missing.png", "", ".", "/",
                                                             "../nowhere.png"]), st.text(max_size=8))


@st.composite
def manifest_lines(draw, meta=WELL_TYPED_META, raw_bytes: bool = False) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        well_typed = meta is WELL_TYPED_META
        record = {"image": draw(IMAGE_REFS), **draw(meta)} if well_typed else draw(meta)
        if isinstance(record, dict) and "image" not in record:  # wrong types: next to an image that decodes
            record["image"] = "good.png"
        line = json.dumps(record).encode()
        if well_typed and draw(st.booleans()):
            line = draw(st.sampled_from([b"", b"   ", b"{", b"null", b"[]", b'"text"', line[: len(line) // 2]]))
        if raw_bytes and draw(st.booleans()):
            line = draw(st.binary(max_size=40)).replace(b"\n", b"")
        lines.append(line)
    return b"\n".join(lines)


def test_manifests_of_random_lines():
    check_property(manifest_lines(), lambda data: _check_file(data, ".jsonl", IMAGE_FILES), 30)


def test_manifests_with_non_utf8_lines():
    check_property(manifest_lines(raw_bytes=True), lambda data: _check_file(data, ".jsonl", IMAGE_FILES), 20)


def test_manifests_with_wrong_json_types():
    check_property(manifest_lines(WRONG_META), lambda data: _check_file(data, ".jsonl", IMAGE_FILES), 30)


def test_endless_stream_without_a_readable_sample_stops():
    def check(members):
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "shard.tar")
            with open(path, "wb") as f:
                f.write(_tar_bytes(members))
            with time_limit(2.0), pytest.raises(NO_READABLE_SAMPLE):
                next(iter(ShardStream([path], image_size=SIZE)))  # epochs=None: repeats forever

    # no member is a PNG, so no sample decodes
    unreadable = st.lists(st.tuples(st.sampled_from(["0.png", "0.txt", "1.jpg", "1.json"]), st.binary(max_size=30)),
                          max_size=4).map(lambda ms: [(n, d) for n, d in ms if not d.startswith(b"\x89PNG")])
    check_property(unreadable, check, 3)


def test_blank_json_caption_is_a_skip():
    """Found by the thorough profile: {"caption": "   "} next to a good image."""
    def check(blank):
        members = [("00000.png", GOOD_IMAGE), ("00000.json", json.dumps({"caption": blank}).encode())]
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "shard.tar")
            with open(path, "wb") as f:
                f.write(_tar_bytes(members))
            assert read_everything(path) == (0, 1)

    check_property(st.text(" \t\n\r\u3000\u00a0", max_size=4), check, 3)
