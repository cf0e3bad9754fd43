"""Task examples as batches (the model-contract layout plus each task's targets), and the training source.

Keys: ``image`` (B, 3, H, W) with its digit ``boxes`` / ``box_valid`` (region models read them), ``text`` /
``text_mask`` (question, phrase, statement, hypothesis or caption) and per task: ``answers`` (B, 10) and
``qa_text`` / ``qa_text_mask`` / ``qa_prefix_lens`` (BOS question answer EOS for generative VQA) — vqa;
``target_box`` (B, 4) — grounding; ``image_right`` (+ its boxes) — nlvr2; ``options`` / ``options_mask``
(B, K, T) — vcr; ``label`` (B,) — classification tasks. Captioning and retrieval batches are the pretraining batch
(:meth:`Collator.from_arrays`), so a model's own objective can train on them.
"""

from __future__ import annotations

import torch

from vlcore import tokens as T
from vlcore.data.digits_scenes import ANSWERS, scenes_to_arrays
from vlcore.data.loader import Collator
from vlcore.data.tasks import TaskData
from vlcore.data.tokenizer import ByteBPETokenizer

OPTION_LEN = 6  # BOS option EOS: the options are one word


def _images(scenes, prefix: str = "") -> dict:
    arr = scenes_to_arrays(scenes)
    return {f"image{prefix}": arr["image"], f"boxes{prefix}": arr["boxes"], f"box_valid{prefix}": arr["box_valid"]}


def qa_sequences(tokenizer: ByteBPETokenizer, questions, answers, max_len: int):
    """(ids, mask, prefix_lens): BOS question answer EOS, PAD after; prefix = BOS + question (SimVLM's VQA as
    generation: the answer is the suffix the decoder writes). Concatenated token lists, so the question's tokens
    are the same as in the prompt given to ``generate``."""
    ids = torch.full((len(questions), max_len), T.PAD, dtype=torch.long)
    prefix = torch.zeros(len(questions), dtype=torch.long)
    for row, (q, a) in enumerate(zip(questions, answers)):
        a_ids = tokenizer.encode(" " + a)[: max_len - 3]
        q_ids = tokenizer.encode(q)[: max_len - 2 - len(a_ids)]
        seq = [T.BOS, *q_ids, *a_ids, T.EOS]
        ids[row, : len(seq)] = torch.tensor(seq)
        prefix[row] = 1 + len(q_ids)
    return ids, ids != T.PAD, prefix


def collate(task: str, examples, tokenizer: ByteBPETokenizer, max_text_len: int, collator: Collator | None = None):
    """The batch dict of ``examples`` of ``task`` (see the module docstring for the keys)."""
    if task in ("captioning", "retrieval"):
        collator = collator or Collator(tokenizer, max_text_len=max_text_len)
        return collator.from_arrays(scenes_to_arrays([e.images[0] for e in examples], collator.max_boxes))
    batch = _images([e.images[0] for e in examples])
    # VCR: question + option (its BOS dropped) must fit the model's text positions
    width = max_text_len - (OPTION_LEN - 1) if task == "vcr" else max_text_len
    batch["text"], batch["text_mask"] = tokenizer.batch([e.text for e in examples], width)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    if task == "vqa":
        batch["answers"] = torch.tensor([e.answers for e in examples], dtype=torch.long)
        top = [ANSWERS[max(set(e.answers), key=e.answers.count)] for e in examples]
        batch["qa_text"], batch["qa_text_mask"], batch["qa_prefix_lens"] = qa_sequences(
            tokenizer, [e.text for e in examples], top, max_text_len)
    elif task == "grounding":
        batch["target_box"] = torch.tensor([e.box for e in examples], dtype=torch.float32)
    elif task == "nlvr2":
        batch.update(_images([e.images[1] for e in examples], "_right"))
    elif task == "vcr":
        k = len(examples[0].options)
        ids, mask = tokenizer.batch([o for e in examples for o in e.options], OPTION_LEN)
        batch["options"], batch["options_mask"] = ids.view(len(examples), k, -1), mask.view(len(examples), k, -1)
    return batch


class TaskSource:
    """Training batches of one task: batch ``n`` of rank ``r`` holds examples ``(n * world + r) * B + i``; the
    same ``next_batch`` / ``state_dict`` / ``load_state_dict`` interface as the pretraining sources."""

    def __init__(self, data: TaskData, tokenizer: ByteBPETokenizer, max_text_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.data, self.tokenizer, self.max_text_len = data, tokenizer, max_text_len
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.collator = Collator(tokenizer, max_text_len=max_text_len)
        self.position = 0
        self.skipped = 0  # generated data: nothing is ever skipped

    def skip_reasons(self) -> dict[str, int]:
        return {}

    def skip_summary(self) -> str:
        return ""

    def make_batch(self, n: int) -> dict:
        start = (n * self.world_size + self.rank) * self.batch_size
        examples = self.data.examples(range(start, start + self.batch_size))
        return collate(self.data.task, examples, self.tokenizer, self.max_text_len, self.collator)

    def next_batch(self) -> dict:
        batch = self.make_batch(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": f"task:{self.data.task}", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
