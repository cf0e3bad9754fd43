"""Real image-text data: WebDataset-style tar shards (as img2dataset writes them) and JSONL manifests.

Tar shards: members ``<key>.<ext>`` grouped by key, in order: an image (jpg/jpeg/png/webp/bmp), the caption in
``<key>.txt`` and/or ``<key>.json`` (``caption``; optional ``boxes`` [[cx, cy, w, h], ...] in [0, 1] and
``phrases``). Manifest: one JSON object a line, ``{"image": path (relative to the manifest), "caption": ...,
"boxes": ..., "phrases": ...}``.

Nothing in a shard or manifest can stop a run by itself: a sample that is malformed in any field (see
:mod:`vlcore.data.samples`) is skipped and counted by reason (:mod:`vlcore.data.skips`), and a caption can never
attach to another image, because each sample is assembled from the members of one key only. What does stop a
run, with a :class:`DataError`: a path that does not exist, a pass with no usable sample, or more bad samples
than ``max_bad_fraction``. Reading a shard or manifest only reads: tar members are never extracted to disk, and
a manifest makes vlcore read the image files it names (relative to the manifest, or absolute), nothing else.

Streams are split across ranks and DataLoader workers (by shard when there are enough shards, else by sample),
repeat forever with a per-epoch shuffle, and are deterministic for a seed and a worker count, so a resumed run
can fast-forward to its position.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vlcore.data import skips
from vlcore.data.samples import MAX_IMAGE_BYTES, caption_of, make_sample
from vlcore.data.skips import DataError, Skip, SkipTally

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
SOURCE_SUFFIXES = (".tar", ".jsonl")
# Bad samples seen before ``max_bad_fraction`` is judged (earlier, a few bad ones in a row are just noise).
MIN_SAMPLES_FOR_FRACTION = 200


def expand_urls(spec: str) -> list[str]:
    """``a/shard-{00000..00003}.tar`` brace ranges, ``::``/comma separated lists, directories and globs.

    Every path must exist and every glob or directory must name at least one shard or manifest: a typo is a
    :class:`DataError` here, before any work, rather than a stream that never yields.
    """
    out: list[str] = []
    for part in re.split(r"::|,", spec):
        part = part.strip()
        if not part:
            continue
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            if hi < lo:
                raise DataError(f"{spec!r}: the range {m.group(0)} is empty ({hi} < {lo})")
            found = [part[: m.start()] + str(i).zfill(width) + part[m.end():] for i in range(lo, hi + 1)]
        elif os.path.isdir(part):
            found = sorted(str(p) for p in Path(part).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{spec!r}: the folder {part!r} holds no .tar or .jsonl file")
        elif any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise DataError(f"{spec!r}: the pattern {part!r} matches no file")
        else:
            found = [part]
        missing = [f for f in found if not os.path.isfile(f)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{spec!r}: no such file {missing[0]!r}{more}")
        out += found
    if not out:
        raise DataError(f"{spec!r} names no shard or manifest")
    return out


_TOO_LARGE = object()  # stands for a member over the byte cap, which is never read
_USED_EXTS = (*IMAGE_EXTS, "txt", "json")


def iter_tar(path: str, size: int) -> Iterator[dict | Skip]:
    """Samples of one tar shard in order; a :class:`Skip` for each unusable sample (or unreadable shard)."""
    try:
        tf = tarfile.open(path, "r|*")
    except (OSError, tarfile.TarError, EOFError):
        yield Skip(skips.UNREADABLE_SHARD, path)
        return
    key, parts = None, {}

    def flush():
        where = f"{path}:{key}"
        if parts.get("txt") is _TOO_LARGE or parts.get("json") is _TOO_LARGE:
            return Skip(skips.MEMBER_TOO_LARGE, where)
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except ValueError:  # includes bytes that are not UTF-8
                return Skip(skips.BAD_JSON, where)
            if not isinstance(meta, dict):
                return Skip(skips.BAD_JSON, where)
        else:
            meta = None
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is _TOO_LARGE:
            return Skip(skips.IMAGE_TOO_LARGE, where)
        return make_sample(where, image, parts.get("txt"), meta, size)

    try:
        for member in tf:
            if not member.isfile():
                continue
            name = member.name
            base = os.path.basename(name)
            if "." not in base:
                continue
            k = os.path.join(os.path.dirname(name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if k != key:
                if key is not None:
                    yield flush()
                key, parts = k, {}
            if ext not in _USED_EXTS:
                continue  # other members (features, metadata) are skipped over unread
            if member.size > MAX_IMAGE_BYTES:
                parts[ext] = _TOO_LARGE  # not read: the stream skips over it
                continue
            f = tf.extractfile(member)
            parts[ext] = f.read() if f is not None else b""
        if key is not None:
            yield flush()
    except (OSError, tarfile.TarError, EOFError):
        # a truncated or corrupt shard: what came before stands, the rest counts as one skip
        yield Skip(skips.TRUNCATED_SHARD, f"{path}:{key}" if key is not None else path)
    finally:
        tf.close()


def iter_manifest(path: str, size: int) -> Iterator[dict | Skip]:
    """Samples of one JSONL manifest; a :class:`Skip` for each unusable line."""
    root = Path(path).parent
    try:
        f = open(path, "rb")  # bytes: one line that is not UTF-8 must not end the whole manifest
    except OSError:
        yield Skip(skips.UNREADABLE_SHARD, path)
        return
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Skip(skips.NON_UTF8_TEXT, where)
                continue
            if not line.strip():
                continue
            yield _manifest_sample(line, root, where, size)


def _manifest_sample(line: str, root: Path, where: str, size: int) -> dict | Skip:
    try:
        rec = json.loads(line)
    except ValueError:
        return Skip(skips.BAD_JSON, where)
    if not isinstance(rec, dict):
        return Skip(skips.BAD_JSON, where)
    if rec.get("image") is None:
        return Skip(skips.NO_IMAGE, where)
    if not isinstance(rec["image"], str) or not rec["image"] or "\0" in rec["image"]:
        return Skip(skips.BAD_IMAGE_FIELD, where)
    image_path = root / rec["image"]
    try:
        if image_path.stat().st_size > MAX_IMAGE_BYTES:
            return Skip(skips.IMAGE_TOO_LARGE, where)
        data = image_path.read_bytes()
    except FileNotFoundError:
        return Skip(skips.MISSING_IMAGE_FILE, where)
    except (OSError, ValueError):
        return Skip(skips.UNREADABLE_IMAGE_FILE, where)
    return make_sample(where, data, None, rec, size)


def iter_source(path: str, size: int) -> Iterator[dict | Skip]:
    return iter_manifest(path, size) if path.endswith(".jsonl") else iter_tar(path, size)


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of samples from tar shards and/or JSONL manifests, split over ranks and workers.

    Each sample also carries ``_skips`` (this worker's skip tally so far, as plain dicts) and ``_worker``.
    ``epochs=None`` repeats forever; ``shuffle_buffer`` > 0 shuffles samples within a window (seeded).
    A pass over this worker's share in which no sample is usable raises :class:`DataError` (instead of looping
    forever), as does a bad fraction above ``max_bad_fraction`` (None: any fraction is accepted), judged per
    worker once it has seen ``MIN_SAMPLES_FOR_FRACTION`` samples or at the end of its first pass.
    """

    def __init__(self, urls: str | list[str], image_size: int = 64, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 0, epochs: int | None = None,
                 max_bad_fraction: float | None = None):
        super().__init__()
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"ShardStream: max_bad_fraction must be in [0, 1]; got {max_bad_fraction}")
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        self.image_size, self.seed = image_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.epochs = shuffle_buffer, epochs
        self.max_bad_fraction = max_bad_fraction
        self.skips = SkipTally()

    @property
    def skipped(self) -> int:
        return self.skips.total

    def skip_reasons(self) -> dict[str, int]:
        return dict(self.skips.counts)

    def _slot(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw, wid

    def _raw(self) -> Iterator[dict | Skip | None]:
        """This slot's samples and skips, with ``None`` at the end of every pass."""
        slot, slots, _ = self._slot()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(self.urls)
            if self.shuffle_buffer:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            by_shard = len(order) >= slots
            mine = order[slot::slots] if by_shard else order
            n = 0
            for url in mine:
                for s in iter_source(url, self.image_size):
                    if not by_shard:  # few shards: every slot reads all of them and keeps its share
                        n += 1
                        if (n - 1) % slots != slot:
                            continue
                    yield s
            yield None
            epoch += 1

    def _where(self) -> str:
        _, slots, wid = self._slot()
        share = f" (rank {self.rank}, data worker {wid}: 1/{slots} of the data)" if slots > 1 else ""
        return f"{len(self.urls)} shard/manifest file(s) starting {self.urls[0]!r}{share}"

    def _check(self, good: int, pass_good: int | None) -> None:
        """Raise when a finished pass had no usable sample or the bad fraction is over the limit."""
        bad = self.skips.total
        if pass_good == 0:
            what = (f"all {bad} samples were skipped: {self.skips.describe()}" if bad else
                    "it holds no sample (fewer samples than ranks x data workers?)")
            raise DataError(f"no usable sample in a whole pass over {self._where()}: {what}")
        seen = good + bad
        judged = pass_good is not None or seen >= MIN_SAMPLES_FOR_FRACTION
        if self.max_bad_fraction is not None and judged and seen and bad / seen > self.max_bad_fraction:
            raise DataError(f"{bad} of {seen} samples ({100 * bad / seen:.1f} %) were unusable, above "
                            f"--max-bad-fraction {self.max_bad_fraction:g}, in {self._where()}: "
                            f"{self.skips.describe()}")

    def __iter__(self) -> Iterator[dict]:
        _, _, wid = self._slot()
        rng = np.random.default_rng([self.seed, 7919, self.rank, wid])
        buf: list[dict] = []
        good = pass_good = 0
        first_pass = True

        def tagged(s: dict) -> dict:
            s["_skips"], s["_worker"] = self.skips.snapshot(), wid
            return s

        for s in self._raw():
            if s is None:  # end of a pass
                self._check(good, pass_good if first_pass or pass_good == 0 else None)
                first_pass, pass_good = False, 0
                continue
            if isinstance(s, Skip):
                self.skips.add(s)
                self._check(good, None)
                continue
            good += 1
            pass_good += 1
            if self.shuffle_buffer <= 1:
                yield tagged(s)
                continue
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield tagged(buf.pop(int(rng.integers(len(buf)))))
        while buf:
            yield tagged(buf.pop(int(rng.integers(len(buf)))))


def read_captions(urls: str | list[str], limit: int = 20_000) -> list[str]:
    """Captions of the first ``limit`` usable records (text only, no image decoding): tokenizer training.

    The same caption rules as training (a UTF-8, non-empty string), so a bad record is left out here too.
    """
    out: list[str] = []
    for url in expand_urls(urls) if isinstance(urls, str) else urls:
        for caption in _captions(url):
            out.append(caption)
            if len(out) >= limit:
                return out
    return out


def _captions(url: str) -> Iterator[str]:
    if url.endswith(".jsonl"):
        try:
            with open(url, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        caption = caption_of(None, rec, url)
                        if isinstance(caption, str):
                            yield caption
        except OSError:
            return
        return
    try:
        with tarfile.open(url, "r|*") as tf:
            for m in tf:
                if not (m.isfile() and m.name.endswith((".txt", ".json")) and m.size <= MAX_IMAGE_BYTES):
                    continue
                data = tf.extractfile(m).read()
                if m.name.endswith(".json"):
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        continue
                    caption = caption_of(None, meta, url) if isinstance(meta, dict) else None
                else:
                    caption = caption_of(data, None, url)
                if isinstance(caption, str):
                    yield caption
    except (OSError, tarfile.TarError, EOFError):
        return
