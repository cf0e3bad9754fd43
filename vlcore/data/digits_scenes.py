"""``digits-scenes``: the embedded default dataset, generated on the fly from scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits (UCI optdigits) inside the package, so nothing is
downloaded. A scene is a 64x64 canvas with one to three upscaled scans placed at random, in a row ("a 3 left of
a 7") or a column ("a 3 above a 7 above a 5"); every digit also gets a box (cx, cy, w, h in [0, 1]) and a phrase
("a 3"), and every scene a question with an answer ("how many digits ?" -> "two", "what is the first digit ?"
-> "3").

Held-out splits are by digit *instance*: the scans are split once (by ``split_seed``) into train and test, and a
test scene only ever uses test scans. Scene ``i`` of a split is a pure function of (seed, split, i), so any batch
can be regenerated without replaying the ones before it (that is the data position a checkpoint stores).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ANSWERS = tuple(str(d) for d in range(10)) + ("one", "two", "three")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = ("how many digits ?", "what is the first digit ?", "what is the last digit ?")
_SPLITS = {"train": 0, "test": 1}
_SIZES = tuple(range(14, 23))  # digit edge in pixels on a 64x64 canvas (scaled for other canvas sizes)


@dataclass
class Scene:
    image: np.ndarray  # float32 (H, W) in [0, 1]
    caption: str
    digits: list[int]
    boxes: list[tuple[float, float, float, float]]  # (cx, cy, w, h) normalised
    phrases: list[str]
    question: str
    answer: int  # index into ANSWERS


@functools.lru_cache(maxsize=1)
def load_scans():
    """(images float32 (N, 8, 8) in [0, 1], labels int64 (N,)) from scikit-learn's bundled digits.

    Reads the CSV that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn (whose import
    costs seconds); falls back to ``load_digits`` if the file moved.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits-scenes dataset needs scikit-learn (pip install scikit-learn): it ships "
                          "the handwritten digit scans the scenes are made of")
    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:  # pragma: no cover - layout of a future scikit-learn
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    return images.astype(np.float32) / 16.0, target.astype(np.int64)


class DigitsScenes:
    """Scenes of one split. ``scene(i)`` is deterministic; ``batch(indices)`` stacks them as arrays.

    ``digit_counts``/``count_weights``: how many digits a scene holds and how often (training mixes single-digit
    images in, which is what zero-shot classification on single digits evaluates).
    """

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 64, split_seed: int = 0,
                 test_fraction: float = 0.2, digit_counts=(1, 2, 3), count_weights=(0.4, 0.3, 0.3)):
        if split not in _SPLITS:
            raise ValueError(f"DigitsScenes: split must be one of {sorted(_SPLITS)}; got {split!r}")
        if image_size < 32:
            raise ValueError(f"DigitsScenes: image_size must be >= 32 to hold three digits; got {image_size}")
        if len(digit_counts) != len(count_weights) or not set(digit_counts) <= {1, 2, 3}:
            raise ValueError(f"DigitsScenes: digit_counts must be a subset of (1, 2, 3) with one weight each; got "
                             f"{digit_counts} / {count_weights}")
        self.split, self.seed, self.image_size = split, int(seed), int(image_size)
        self.digit_counts = tuple(int(c) for c in digit_counts)
        w = np.asarray(count_weights, dtype=np.float64)
        self.count_p = w / w.sum()
        scans, labels = load_scans()
        order = np.random.default_rng(split_seed).permutation(len(labels))
        n_test = int(round(len(labels) * test_fraction))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        self.scan_ids = np.sort(chosen)  # indices into load_digits(): the instances this split may use
        self.labels = labels[self.scan_ids]
        scale = self.image_size / 64.0
        self.sizes = sorted({max(6, int(round(s * scale))) for s in _SIZES})
        src = torch.from_numpy(scans[self.scan_ids])[:, None]
        # Upscaled copies of every scan at every size, made once (bilinear, as a camera would blur them).
        self._glyphs = {s: torch.nn.functional.interpolate(src, size=(s, s), mode="bilinear",
                                                           align_corners=False)[:, 0].clamp_(0, 1).numpy()
                        for s in self.sizes}

    def __len__(self) -> int:
        """The number of scans in the split (scenes themselves are unbounded: any index >= 0 is valid)."""
        return len(self.scan_ids)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])

    def scene(self, index: int, n_digits: int | None = None, scan: int | None = None) -> Scene:
        """Scene ``index``; ``n_digits`` forces the count, ``scan`` forces the (first) scan (split-local index)."""
        rng = self._rng(index)
        k = int(n_digits) if n_digits is not None else int(rng.choice(self.digit_counts, p=self.count_p))
        picks = rng.integers(0, len(self.scan_ids), size=k)
        if scan is not None:
            picks[0] = scan
        H = self.image_size
        gap = max(1, H // 32)
        fits = [s for s in self.sizes if s * k + gap * (k - 1) <= H]
        sizes = [int(rng.choice(fits)) for _ in range(k)]
        horizontal = bool(rng.integers(0, 2))
        canvas = np.zeros((H, H), np.float32)
        # Along the main axis: digits in order with random gaps; across it: a shared centre with a small jitter,
        # so "left of" / "above" is always unambiguous.
        slack = H - sum(sizes) - gap * (k - 1)
        cuts = np.sort(rng.integers(0, slack + 1, size=k + 1)) if k > 1 else np.array([rng.integers(0, slack + 1)])
        pos = []
        along = int(cuts[0])
        jitter = max(1, H // 16)
        across_c = int(rng.integers(max(sizes) // 2 + jitter, H - max(sizes) // 2 - jitter + 1)) if k > 1 else None
        for j, s in enumerate(sizes):
            if k == 1:
                a, c = int(rng.integers(0, H - s + 1)), int(rng.integers(0, H - s + 1))
            else:
                a = along
                c = int(np.clip(across_c - s // 2 + rng.integers(-jitter, jitter + 1), 0, H - s))
                along += s + (gap + int(cuts[j + 1] - cuts[j]) if j + 1 < k else 0)
            x, y = (a, c) if horizontal else (c, a)
            pos.append((x, y))
            glyph = self._glyphs[s][picks[j]]
            np.maximum(canvas[y:y + s, x:x + s], glyph, out=canvas[y:y + s, x:x + s])
        digits = [int(self.labels[p]) for p in picks]
        boxes = [((x + s / 2) / H, (y + s / 2) / H, s / H, s / H) for (x, y), s in zip(pos, sizes)]
        phrases = [f"a {d}" for d in digits]
        relation = " left of " if horizontal else " above "
        caption = relation.join(phrases)
        q = int(rng.integers(0, len(QUESTIONS)))
        answer = ANSWERS.index(("one", "two", "three")[k - 1]) if q == 0 else digits[0 if q == 1 else -1]
        return Scene(canvas, caption, digits, boxes, phrases, QUESTIONS[q], answer)

    def scenes(self, indices) -> list[Scene]:
        return [self.scene(int(i)) for i in indices]


def scenes_to_arrays(scenes: list[Scene], max_boxes: int = 3) -> dict:
    """Images normalised to (x - 0.5) / 0.5 as float (B, 3, H, W) plus box arrays; texts stay strings."""
    images = np.stack([s.image for s in scenes])
    image = torch.from_numpy(images).sub_(0.5).div_(0.5)[:, None].expand(-1, 3, -1, -1).contiguous()
    B = len(scenes)
    boxes = torch.zeros(B, max_boxes, 4)
    valid = torch.zeros(B, max_boxes, dtype=torch.bool)
    labels = torch.full((B, max_boxes), -100, dtype=torch.long)
    phrases = [[""] * max_boxes for _ in range(B)]
    for i, s in enumerate(scenes):
        n = min(len(s.boxes), max_boxes)
        boxes[i, :n] = torch.tensor(s.boxes[:n])
        valid[i, :n] = True
        labels[i, :n] = torch.tensor(s.digits[:n])
        phrases[i][:n] = s.phrases[:n]
    return {"image": image, "caption": [s.caption for s in scenes], "boxes": boxes, "box_valid": valid,
            "box_labels": labels, "phrases": phrases, "question": [s.question for s in scenes],
            "answer": torch.tensor([s.answer for s in scenes], dtype=torch.long)}


def all_captions(max_digits: int = 3) -> list[str]:
    """Every caption and phrase the generator can write, plus the questions and answers (tokenizer training)."""
    out = [f"a {d}" for d in range(10)]
    rel = [" left of ", " above "]
    if max_digits >= 2:
        out += [f"a {a}{r}a {b}" for a in range(10) for b in range(10) for r in rel]
    return out + list(QUESTIONS) + list(ANSWERS)


def in_words(caption: str) -> str:
    """The caption with its numerals spelled out ("a 3 above a 7" -> "a three above a seven"): the other side of
    the translation pairs that text-text objectives (MURAL) train on."""
    return " ".join(NUMBER_WORDS[int(w)] if w.isdigit() and len(w) == 1 else w for w in caption.split(" "))


def zero_shot_set(seed: int = 0, image_size: int = 64, split_seed: int = 0) -> dict:
    """Held-out single-digit images: every test scan once, at a random size and place.

    :func:`scenes_to_arrays` of them plus ``label`` (B,).
    """
    ds = DigitsScenes("test", seed=seed + 1_000_003, image_size=image_size, split_seed=split_seed)
    scenes = [ds.scene(i, n_digits=1, scan=i) for i in range(len(ds))]
    arr = scenes_to_arrays(scenes)
    arr["label"] = torch.tensor([s.digits[0] for s in scenes])
    return arr


def retrieval_set(n: int = 100, seed: int = 0, image_size: int = 64, split_seed: int = 0) -> list[Scene]:
    """``n`` held-out scenes with pairwise distinct captions (so each caption has exactly one right image)."""
    ds = DigitsScenes("test", seed=seed + 2_000_003, image_size=image_size, split_seed=split_seed)
    out, seen, i = [], set(), 0
    while len(out) < n:
        s = ds.scene(i)
        i += 1
        if s.caption not in seen:
            seen.add(s.caption)
            out.append(s)
    return out
