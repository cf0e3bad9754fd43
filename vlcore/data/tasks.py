"""Downstream task data on ``digits-scenes``: VQA, grounding, NLVR², visual entailment, VCR, captioning, retrieval.

Every example is a pure function of (task, split, seed, index), built from :class:`DigitsScenes` scenes of the same
split, so the held-out examples only ever show held-out scans (split by scan, like the pretraining data) and any
batch can be regenerated from its index (the data position a checkpoint stores).

* ``vqa`` — the scene's question; 10 "annotators" answer it. A count may be answered in words or in numerals
  ("two" / "2"), so several answers can be right with different VQA soft scores (Antol et al., 2015).
* ``grounding`` — a referring expression ("the 3", or "the left 3" when the scene holds two 3s) and its box.
* ``nlvr2`` — two canvases and a statement about both ("both images show a 3", "only one image shows a 3"):
  true / false, balanced (Suhr et al., 2019).
* ``ve`` — the canvas is the premise; "there is a 3" (entailed when a 3 is shown), "there is no 3" /
  "there is a 3" (contradicted), "the 3 was written by alice" (neutral: the writer cannot be seen), balanced
  over the three labels (SNLI-VE, Xie et al., 2019).
* ``vcr`` — the scene's question with four answer options, one right (Zellers et al., 2019, Q→A).
* ``captioning`` — the caption; references are the caption and its spelled-out form ("a three above a seven").
* ``retrieval`` — the caption (training uses the pretraining batch and the model's own objective).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from vlcore.data.digits_scenes import ANSWERS, NUMBER_WORDS, DigitsScenes, Scene, in_words

TASKS = ("vqa", "grounding", "nlvr2", "ve", "vcr", "captioning", "retrieval")
VE_LABELS = ("entailment", "neutral", "contradiction")
COUNT_WORDS = ("one", "two", "three")
NUM_ANNOTATORS = 10
NUM_OPTIONS = 4
WRITERS = ("alice", "bob", "carol")
_TASK_SEED = {t: 3_000_017 * (i + 1) for i, t in enumerate(TASKS)}  # each task its own scenes


@dataclass
class Example:
    """One task example. ``images`` holds one canvas (two for NLVR²); ``label`` is the class / option / answer
    index; ``answers`` the annotators' answers (VQA); ``box`` the target (cx, cy, w, h) (grounding);
    ``options`` the answer options (VCR); ``references`` the reference captions (captioning)."""

    images: list[Scene]
    text: str
    label: int = -1
    answers: list[int] = field(default_factory=list)
    box: tuple = ()
    options: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=16)
def _scenes(split: str, seed: int, image_size: int, split_seed: int) -> DigitsScenes:
    """One generator per (split, seed, size): its upscaled glyphs cost a second to make; scenes are pure functions
    of the index, so sharing it is safe."""
    return DigitsScenes(split, seed=seed, image_size=image_size, split_seed=split_seed)


class TaskData:
    """Examples of ``task`` on split ``split``: ``example(i)`` is deterministic, ``examples(indices)`` a list."""

    def __init__(self, task: str, split: str = "train", seed: int = 0, image_size: int = 64, split_seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"TaskData: task must be one of {', '.join(TASKS)}; got {task!r}")
        self.task, self.split, self.seed = task, split, int(seed)
        self.scenes = _scenes(split, seed + _TASK_SEED[task], image_size, split_seed)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _TASK_SEED[self.task], 0 if self.split == "train" else 1, index])

    def example(self, index: int) -> Example:
        return getattr(self, f"_{self.task}")(int(index), self._rng(int(index)))

    def examples(self, indices) -> list[Example]:
        return [self.example(int(i)) for i in indices]

    # ---- one builder per task ----------------------------------------------------------------------------
    def _vqa(self, i: int, rng) -> Example:
        s = self.scenes.scene(i)
        answers = [s.answer] * NUM_ANNOTATORS
        word = ANSWERS[s.answer]
        if word in COUNT_WORDS:  # some annotators write the count as a numeral: a second, partly right answer
            numeral = ANSWERS.index(str(COUNT_WORDS.index(word) + 1))
            for k in rng.choice(NUM_ANNOTATORS, size=int(rng.integers(0, 4)), replace=False):
                answers[int(k)] = numeral
        return Example([s], s.question, label=s.answer, answers=answers)

    def _grounding(self, i: int, rng) -> Example:
        for attempt in range(16):
            s = self.scenes.scene(i * 16 + attempt)
            j = int(rng.integers(0, len(s.digits)))
            same = [k for k, d in enumerate(s.digits) if d == s.digits[j]]
            horizontal = " left of " in s.caption
            if len(same) == 1:
                phrase = f"the {s.digits[j]}"
            elif j == same[0]:
                phrase = f"the {'left' if horizontal else 'top'} {s.digits[j]}"
            elif j == same[-1]:
                phrase = f"the {'right' if horizontal else 'bottom'} {s.digits[j]}"
            else:  # the middle of three equal digits: try another scene
                continue
            return Example([s], phrase, box=tuple(s.boxes[j]))
        raise RuntimeError(f"grounding example {i}: no unambiguous digit in 16 scenes")  # pragma: no cover

    def _nlvr2(self, i: int, rng) -> Example:
        left, right = self.scenes.scene(2 * i), self.scenes.scene(2 * i + 1)
        a, b = set(left.digits), set(right.digits)
        truth = bool(rng.integers(0, 2))
        both = sorted(a & b) if truth else sorted(set(range(10)) - (a & b))
        one = sorted(a ^ b) if truth else sorted(set(range(10)) - (a ^ b))
        kind = "both" if (rng.integers(0, 2) and both) or not one else "one"
        d = int(rng.choice(both if kind == "both" else one))
        text = f"both images show a {d}" if kind == "both" else f"only one image shows a {d}"
        return Example([left, right], text, label=int(truth))

    def _ve(self, i: int, rng) -> Example:
        s = self.scenes.scene(i)
        shown = sorted(set(s.digits))
        absent = sorted(set(range(10)) - set(shown))
        label = int(rng.integers(0, 3))
        if label == 0:
            text = f"there is a {int(rng.choice(shown))}"
        elif label == 1:
            text = f"the {int(rng.choice(shown))} was written by {WRITERS[int(rng.integers(0, len(WRITERS)))]}"
        elif rng.integers(0, 2):
            text = f"there is no {int(rng.choice(shown))}"
        else:
            text = f"there is a {int(rng.choice(absent))}"
        return Example([s], text, label=label)

    def _vcr(self, i: int, rng) -> Example:
        s = self.scenes.scene(i)
        right = ANSWERS[s.answer]
        pool = list(COUNT_WORDS) + ["four"] if right in COUNT_WORDS else [str(d) for d in range(10)]
        wrong = [w for w in pool if w != right]
        options = [right] + [str(w) for w in rng.choice(wrong, size=NUM_OPTIONS - 1, replace=False)]
        order = rng.permutation(NUM_OPTIONS)
        options = [options[k] for k in order]
        return Example([s], s.question, label=int(np.argmax(order == 0)), options=options)

    def _captioning(self, i: int, rng) -> Example:
        s = self.scenes.scene(i)
        return Example([s], s.caption, references=[s.caption, in_words(s.caption)])

    def _retrieval(self, i: int, rng) -> Example:
        s = self.scenes.scene(i)
        return Example([s], s.caption, references=[s.caption])


def vqa_answer_index(text: str) -> int:
    """The answer vocabulary index of a generated answer (numerals and number words), or -1."""
    t = text.strip().lower()
    if t in ANSWERS:
        return ANSWERS.index(t)
    if t in NUMBER_WORDS:
        return ANSWERS.index(str(NUMBER_WORDS.index(t)))
    return -1
