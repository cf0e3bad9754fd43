"""One image-text sample from untrusted fields: every field checked, a :class:`Skip` with the reason otherwise.

Shards and manifests come from crawls and conversions; any field can hold anything (``"caption": 12345``,
``"boxes": "abc"``, a 3-number box, bytes that are not UTF-8, an image that is truncated or a decompression
bomb). The checks here turn each into a counted skip rather than an exception deep in the collator.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch

from vlcore.data import skips
from vlcore.data.skips import Skip

# Formats a shard or manifest may hold. Naming them keeps Pillow from guessing among its ~40 decoders (some of
# which accept almost any bytes, e.g. headerless TGA), which is both attack surface and wasted time on junk.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Bytes read for one image member or file at most: a tar header or a file can claim any size, and reading it
# whole would exhaust memory before the decoder's pixel limit could refuse it.
MAX_IMAGE_BYTES = 64 << 20


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """RGB float (3, size, size) normalised to (x - 0.5) / 0.5: shorter side resized to ``size``, centre crop.

    Raises ``PIL.Image.DecompressionBombError`` past Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``; its
    warning level counts too) and ``OSError``/``ValueError`` etc. for anything it cannot decode.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im = im.convert("RGB")
    w, h = im.size
    if min(w, h) < 1:
        raise ValueError(f"image of size {w}x{h}")
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).sub(0.5).div(0.5).contiguous()


def _image(data: bytes, size: int, where: str) -> torch.Tensor | Skip:
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        return Skip(skips.IMAGE_TOO_LARGE, where)
    try:
        return decode_image(data, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Skip(skips.IMAGE_TOO_LARGE, where)
    except Exception:  # noqa: BLE001 - any decoder failure (truncated, corrupt, unsupported) is this sample's
        return Skip(skips.UNDECODABLE_IMAGE, where)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _boxes(meta: dict, where: str) -> tuple[list[tuple], list[str]] | Skip:
    boxes = meta.get("boxes")
    if boxes is None or boxes == []:
        return [], []
    if not isinstance(boxes, list):
        return Skip(skips.BAD_BOXES, where)
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) and 0 <= v <= 1 for v in b)
                and b[2] > 0 and b[3] > 0):
            return Skip(skips.BAD_BOXES, where)
    phrases = meta.get("phrases")
    if phrases is None:
        phrases = [""] * len(boxes)
    if not (isinstance(phrases, list) and len(phrases) == len(boxes) and all(isinstance(p, str) for p in phrases)):
        return Skip(skips.BAD_PHRASES, where)
    return [tuple(float(v) for v in b) for b in boxes], phrases


def caption_of(text: bytes | None, meta: dict | None, where: str) -> str | Skip:
    """The caption: a ``.txt`` member (UTF-8) wins over the JSON ``caption``; must be a non-empty string."""
    if text is not None:
        try:
            caption = text.decode("utf-8")
        except UnicodeDecodeError:
            return Skip(skips.NON_UTF8_TEXT, where)
    elif meta is not None and "caption" in meta and meta["caption"] is not None:
        caption = meta["caption"]
        if not isinstance(caption, str):
            return Skip(skips.BAD_CAPTION_TYPE, where)
    else:
        return Skip(skips.NO_CAPTION, where)
    caption = caption.strip()
    return caption if caption else Skip(skips.EMPTY_CAPTION, where)


def make_sample(key: str, image: bytes | None, text: bytes | None, meta: dict | None, size: int) -> dict | Skip:
    """The sample dict (``key``, ``image``, ``caption``, optional ``boxes``/``phrases``) or why it is skipped.

    The cheap field checks come before decoding, so a bad record costs no image decode.
    """
    if image is None:
        return Skip(skips.NO_IMAGE, key)
    caption = caption_of(text, meta, key)
    if isinstance(caption, Skip):
        return caption
    boxes = _boxes(meta or {}, key)
    if isinstance(boxes, Skip):
        return boxes
    img = _image(image, size, key)
    if isinstance(img, Skip):
        return img
    out = {"key": key, "image": img, "caption": caption}
    if boxes[0]:
        out["boxes"], out["phrases"] = boxes
    return out
