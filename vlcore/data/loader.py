"""Batches in the layout of the model contract, for the embedded dataset and for shards, with a data position.

Both sources expose ``next_batch()`` and ``state_dict()`` / ``load_state_dict()`` (the data position a checkpoint
stores). The digits source regenerates any batch from its position directly; the shard source replays its
deterministic stream up to the position.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

import torch

from vlcore.data.digits_scenes import DigitsScenes, in_words, scenes_to_arrays
from vlcore.data.shards import ShardStream
from vlcore.data.skips import DataError, SkipTally
from vlcore.data.tokenizer import ByteBPETokenizer


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which finishes its step and saves a checkpoint
    (a worker that died of the SIGINT sent to the whole terminal group would fail the batch it owes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Collator:
    """Tokenises captions, box phrases and questions; pads boxes to ``max_boxes``."""

    def __init__(self, tokenizer: ByteBPETokenizer, max_text_len: int = 16, max_phrase_len: int = 6,
                 max_question_len: int = 12, max_boxes: int = 3):
        self.tokenizer = tokenizer
        self.max_text_len, self.max_phrase_len = max_text_len, max_phrase_len
        self.max_question_len, self.max_boxes = max_question_len, max_boxes

    def from_arrays(self, arr: dict) -> dict:
        """Batch dict from :func:`scenes_to_arrays` output (digits-scenes)."""
        B, R = arr["boxes"].shape[:2]
        text, text_mask = self.tokenizer.batch(arr["caption"], self.max_text_len)
        flat = [p for row in arr["phrases"] for p in row]
        box_text, box_text_mask = self.tokenizer.batch(flat, self.max_phrase_len)
        box_text, box_text_mask = box_text.view(B, R, -1), box_text_mask.view(B, R, -1)
        box_text_mask &= arr["box_valid"][..., None]
        box_text[~box_text_mask] = 0
        question, question_mask = self.tokenizer.batch(arr["question"], self.max_question_len)
        # translation pairs for text-text objectives: numerals spelled out <-> the caption
        src_text, src_mask = self.tokenizer.batch([in_words(c) for c in arr["caption"]], self.max_text_len)
        return {"src_text": src_text, "src_text_mask": src_mask, "tgt_text": text, "tgt_text_mask": text_mask,
                "image": arr["image"], "text": text, "text_mask": text_mask, "boxes": arr["boxes"],
                "box_valid": arr["box_valid"], "box_labels": arr["box_labels"], "box_text": box_text,
                "box_text_mask": box_text_mask, "question": question, "question_mask": question_mask,
                "answer": arr["answer"]}

    def __call__(self, samples: Sequence[dict]) -> dict:
        """Batch dict from shard samples (``image``, ``caption``, optional ``boxes``/``phrases``)."""
        B, R = len(samples), self.max_boxes
        boxes = torch.zeros(B, R, 4)
        valid = torch.zeros(B, R, dtype=torch.bool)
        phrases = [[""] * R for _ in range(B)]
        for i, s in enumerate(samples):
            n = min(len(s.get("boxes", ())), R)
            if n:
                boxes[i, :n] = torch.tensor(s["boxes"][:n], dtype=torch.float32)
                valid[i, :n] = True
                phrases[i][:n] = s["phrases"][:n]
        text, text_mask = self.tokenizer.batch([s["caption"] for s in samples], self.max_text_len)
        batch = {"image": torch.stack([s["image"] for s in samples]), "text": text, "text_mask": text_mask}
        if valid.any():
            box_text, box_mask = self.tokenizer.batch([p for row in phrases for p in row], self.max_phrase_len)
            box_mask = box_mask.view(B, R, -1) & valid[..., None]
            batch.update(boxes=boxes, box_valid=valid, box_labels=torch.full((B, R), -100, dtype=torch.long),
                         box_text=box_text.view(B, R, -1).masked_fill(~box_mask, 0), box_text_mask=box_mask)
        if "_skips" in samples[-1]:  # the latest tally of the worker that made this batch
            batch["_skips"] = (samples[-1]["_worker"], samples[-1]["_skips"])
        return batch


class _DigitsBatches(torch.utils.data.IterableDataset):
    """Batches ``start``, ``start + 1``, ... of one rank; worker ``w`` of ``W`` makes those with n % W == w, which
    the DataLoader hands out round-robin, so the order is the same with any number of workers."""

    def __init__(self, source: DigitsSource, start: int):
        super().__init__()
        self.source, self.start = source, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self.start + wid
        while True:
            yield self.source.make_batch(n)
            n += nw


class DigitsSource:
    """Training batches of digits-scenes: batch ``n`` of rank ``r`` holds scenes ``(n * world + r) * B + i``.

    With ``num_workers`` > 0 the scenes are drawn in background processes (the CPU the model does not use).
    """

    def __init__(self, dataset: DigitsScenes, collator: Collator, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.position = 0  # batches this rank has consumed
        self.skipped = 0  # generated data: nothing is ever skipped
        self._it = None

    def skip_reasons(self) -> dict[str, int]:
        return {}

    def skip_summary(self) -> str:
        return ""  # nothing to report for generated data

    def make_batch(self, n: int) -> dict:
        start = (n * self.world_size + self.rank) * self.batch_size
        scenes = self.dataset.scenes(range(start, start + self.batch_size))
        return self.collator.from_arrays(scenes_to_arrays(scenes, self.collator.max_boxes))

    def next_batch(self) -> dict:
        if self.num_workers <= 0:
            batch = self.make_batch(self.position)
        else:
            if self._it is None:
                # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
                # would shift dropout masks between an uninterrupted and a resumed run.
                loader = torch.utils.data.DataLoader(_DigitsBatches(self, self.position), batch_size=None,
                                                     num_workers=self.num_workers, prefetch_factor=4,
                                                     worker_init_fn=_ignore_interrupts,
                                                     generator=torch.Generator().manual_seed(self.position))
                self._it = iter(loader)
            batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "digits-scenes", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self._it = None


class ShardSource:
    """Training batches from :class:`ShardStream` through a DataLoader with worker processes."""

    def __init__(self, stream: ShardStream, collator: Collator, batch_size: int, num_workers: int = 2):
        self.stream, self.collator, self.batch_size, self.num_workers = stream, collator, batch_size, num_workers
        self.position = 0
        self._tally_by_worker: dict[int, tuple[dict, dict]] = {}
        self._it = None

    def _iterator(self):
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, collate_fn=self.collator,
                                             num_workers=self.num_workers, drop_last=True,
                                             persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                                             worker_init_fn=_ignore_interrupts,
                                             generator=torch.Generator().manual_seed(self.stream.seed))
        return iter(loader)

    def _tally(self) -> SkipTally:
        """All workers' skips, as of the batches delivered so far (a worker's tally rides with its batches)."""
        total = SkipTally()
        for counts, examples in self._tally_by_worker.values():
            total.merge(SkipTally(counts, examples))
        return total

    @property
    def skipped(self) -> int:
        return self._tally().total

    def skip_reasons(self) -> dict[str, int]:
        return dict(sorted(self._tally().counts.items()))

    def skip_summary(self) -> str:
        """``skipped 3 samples: undecodable_image 2 (first: ...), ...`` or ``no sample skipped``."""
        tally = self._tally()
        return f"skipped {tally.total} samples: {tally.describe()}" if tally.total else "no sample skipped"

    def next_batch(self) -> dict:
        if self._it is None:
            self._it = self._iterator()
            for _ in range(self.position):  # deterministic stream: replay up to the saved position
                self._take()
        self.position += 1
        return self._take()

    def _take(self) -> dict:
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(f"the shard stream ended: no valid samples in {self.stream.urls} "
                               f"({self.skip_summary()})") from None
        except DataError as e:
            # From a worker process the message holds the worker's traceback; the user needs its last line.
            raise DataError(str(e).rpartition("DataError: ")[2].strip()) from None
        tag = batch.pop("_skips", None)
        if tag is not None:
            self._tally_by_worker[int(tag[0])] = tag[1]
        return batch

    def state_dict(self) -> dict:
        return {"kind": "shards", "position": self.position, "skipped": self.skipped,
                "skipped_by_reason": self.skip_reasons()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self._it = None
