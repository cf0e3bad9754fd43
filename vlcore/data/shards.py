"""Real image-text data: WebDataset-style tar shards (as img2dataset writes them) and JSONL manifests.

Tar shards: members ``<key>.<ext>`` grouped by key, in order: an image (jpg/jpeg/png/webp/bmp), the caption in
``<key>.txt`` and/or ``<key>.json`` (``caption``; optional ``boxes`` [[cx, cy, w, h], ...] in [0, 1] and
``phrases``). Manifest: one JSON object a line, ``{"image": path (relative to the manifest), "caption": ...,
"boxes": ..., "phrases": ...}``.

A sample whose image is missing, unreadable or undecodable, or that has no caption, is skipped and counted; its
caption can never attach to another image, because each sample is assembled from the members of one key only.
Streams are split across ranks and DataLoader workers (by shard when there are enough shards, else by sample),
repeat forever with a per-epoch shuffle, and are deterministic for a seed and a worker count, so a resumed run
can fast-forward to its position.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_urls(spec: str) -> list[str]:
    """``a/shard-{00000..00003}.tar`` brace ranges, ``::``/comma separated lists, directories and globs."""
    out: list[str] = []
    for part in re.split(r"::|,", spec):
        part = part.strip()
        if not part:
            continue
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += [part[: m.start()] + str(i).zfill(width) + part[m.end():] for i in range(lo, hi + 1)]
        elif os.path.isdir(part):
            out += sorted(str(p) for p in Path(part).iterdir() if p.suffix in (".tar", ".jsonl"))
        elif any(c in part for c in "*?["):
            import glob

            out += sorted(glob.glob(part))
        else:
            out.append(part)
    if not out:
        raise ValueError(f"no shards or manifests found in {spec!r}")
    return out


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """RGB float (3, size, size) normalised to (x - 0.5) / 0.5: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).sub(0.5).div(0.5).contiguous()


def _sample(key: str, image: bytes | None, text: str | None, meta: dict | None, size: int) -> dict | None:
    caption = text.strip() if text is not None else (meta or {}).get("caption")
    if image is None or not caption:
        return None
    try:
        img = decode_image(image, size)
    except Exception:  # any decoder error (truncated, not an image, unsupported) means a skipped sample
        return None
    out = {"key": key, "image": img, "caption": str(caption)}
    if meta and meta.get("boxes"):
        out["boxes"] = [tuple(float(v) for v in b) for b in meta["boxes"]]
        out["phrases"] = [str(p) for p in meta.get("phrases", [""] * len(meta["boxes"]))]
    return out


def iter_tar(path: str, size: int) -> Iterator[dict | None]:
    """Samples of one tar shard in order; ``None`` for each skipped sample (and for an unreadable shard)."""
    try:
        tf = tarfile.open(path, "r|*")
    except (OSError, tarfile.TarError):
        yield None
        return
    key, parts = None, {}

    def flush():
        if key is None:
            return None
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        text = parts["txt"].decode("utf-8", "replace") if "txt" in parts else None
        meta = None
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except ValueError:
                meta = None
        return _sample(key, image, text, meta, size)

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
            f = tf.extractfile(member)
            parts[ext] = f.read() if f is not None else b""
        if key is not None:
            yield flush()
    except (OSError, tarfile.TarError, EOFError):
        yield None  # a truncated shard: what came before it stands, the rest counts as one skip
    finally:
        tf.close()


def iter_manifest(path: str, size: int) -> Iterator[dict | None]:
    root = Path(path).parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image_path = root / rec["image"]
                data = image_path.read_bytes()
            except (ValueError, KeyError, TypeError, OSError):
                yield None
                continue
            yield _sample(f"{path}:{lineno}", data, rec.get("caption"), rec, size)


def iter_source(path: str, size: int) -> Iterator[dict | None]:
    return iter_manifest(path, size) if path.endswith(".jsonl") else iter_tar(path, size)


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of samples from tar shards and/or JSONL manifests, split over ranks and workers.

    Each sample also carries ``_skipped`` (the samples this worker skipped so far) and ``_worker``.
    ``epochs=None`` repeats forever; ``shuffle_buffer`` > 0 shuffles samples within a window (seeded).
    """

    def __init__(self, urls: str | list[str], image_size: int = 64, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 0, epochs: int | None = None):
        super().__init__()
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        self.image_size, self.seed = image_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.epochs = shuffle_buffer, epochs
        self.skipped = 0

    def _slot(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw, wid

    def _raw(self) -> Iterator[dict | None]:
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
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        _, _, wid = self._slot()
        rng = np.random.default_rng([self.seed, 7919, self.rank, wid])
        buf: list[dict] = []
        for s in self._raw():
            if s is None:
                self.skipped += 1
                continue
            s["_skipped"], s["_worker"] = self.skipped, wid
            if self.shuffle_buffer <= 1:
                yield s
                continue
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))


def read_captions(urls: str | list[str], limit: int = 20_000) -> list[str]:
    """Captions of the first ``limit`` samples (text members only, no image decoding): tokenizer training."""
    out: list[str] = []
    for url in expand_urls(urls) if isinstance(urls, str) else urls:
        if url.endswith(".jsonl"):
            with open(url, encoding="utf-8") as f:
                for line in f:
                    try:
                        out.append(str(json.loads(line)["caption"]))
                    except (ValueError, KeyError, TypeError):
                        pass
                    if len(out) >= limit:
                        return out
            continue
        try:
            with tarfile.open(url, "r|*") as tf:
                for m in tf:
                    if m.isfile() and m.name.endswith((".txt", ".json")):
                        data = tf.extractfile(m).read().decode("utf-8", "replace")
                        if m.name.endswith(".json"):
                            try:
                                data = str(json.loads(data).get("caption", ""))
                            except (ValueError, AttributeError):
                                continue
                        if data.strip():
                            out.append(data.strip())
                        if len(out) >= limit:
                            return out
        except (OSError, tarfile.TarError, EOFError):
            continue
    return out
