"""A small byte-level BPE tokenizer (pure Python), trained on a run's captions and saved with its checkpoint.

Ids: the special tokens of :mod:`vlcore.tokens` (0..6), then the 256 bytes (7..262), then one id per learned
merge in the order it was learned. Any text encodes (byte fallback, never an unknown token). Text is first split
into words GPT-2 style (a word keeps its leading space; every digit is its own word, so "a 37" never merges the
two digits), then each word's bytes are merged by rank, as Sennrich et al. (2016) / GPT-2 do.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from vlcore import tokens

_WORD = re.compile(r" ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+")
_BYTE0 = tokens.NUM_SPECIAL


class ByteBPETokenizer:
    """``encode``/``decode`` text; ``batch`` pads to tensors in the layout of the batch contract."""

    kind = "byte-bpe"

    def __init__(self, merges: Sequence[tuple[int, int]] = ()):
        self.merges = [tuple(int(i) for i in m) for m in merges]
        self._rank = {pair: r for r, pair in enumerate(self.merges)}
        self._bytes: list[bytes] = [b""] * _BYTE0 + [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            if not (0 <= a < len(self._bytes) and 0 <= b < len(self._bytes)) or a < _BYTE0 or b < _BYTE0:
                raise ValueError(f"ByteBPETokenizer: merge ({a}, {b}) refers to an id that is not defined yet")
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> ByteBPETokenizer:
        """Learn merges from ``texts`` until ``vocab_size`` ids exist or no pair occurs ``min_frequency`` times."""
        if vocab_size < _BYTE0 + 256:
            raise ValueError(f"ByteBPETokenizer.train: vocab_size must be >= {_BYTE0 + 256}; got {vocab_size}")
        word_counts = Counter(w for t in texts for w in _WORD.findall(t))
        words = [[_BYTE0 + b for b in w.encode("utf-8")] for w in word_counts]
        freqs = list(word_counts.values())
        merges: list[tuple[int, int]] = []
        next_id = _BYTE0 + 256
        while next_id < vocab_size:
            pairs: Counter = Counter()
            for w, f in zip(words, freqs):
                for p in zip(w, w[1:]):
                    pairs[p] += f
            if not pairs:
                break
            # Most frequent pair; ties go to the smallest pair so training is deterministic.
            best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
            if count < min_frequency:
                break
            merges.append(best)
            words = [_merge_pair(w, best, next_id) for w in words]
            next_id += 1
        return cls(merges)

    # ---------------------------------------------------------------- encode / decode
    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = [_BYTE0 + b for b in word.encode("utf-8")]
        while len(ids) > 1:
            ranked = [(self._rank.get(p, len(self._rank)), i) for i, p in enumerate(zip(ids, ids[1:]))]
            rank, i = min(ranked)
            if rank == len(self._rank):
                break
            ids = _merge_pair(ids, self.merges[rank], _BYTE0 + 256 + rank)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return [i for w in _WORD.findall(text) for i in self._encode_word(w)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are dropped, decoding stops at the first EOS."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == tokens.EOS:
                break
            if _BYTE0 <= i < len(self._bytes):
                out += self._bytes[i]
        return out.decode("utf-8", errors="replace")

    def batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids long (B, max_len), mask bool (B, max_len)): BOS, tokens, EOS, then PAD; mask True at BOS..EOS.

        Texts longer than ``max_len`` - 2 tokens are cut and still end with EOS.
        """
        if max_len < 2:
            raise ValueError(f"ByteBPETokenizer.batch: max_len must be >= 2 (BOS and EOS); got {max_len}")
        ids = torch.full((len(texts), max_len), tokens.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [tokens.BOS, *self.encode(text)[: max_len - 2], tokens.EOS]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != tokens.PAD

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": 1, "special_tokens": list(tokens.SPECIAL_TOKENS),
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, data: dict) -> ByteBPETokenizer:
        if data.get("kind") != cls.kind:
            raise ValueError(f"ByteBPETokenizer: expected a tokenizer of kind {cls.kind!r}, got {data.get('kind')!r}")
        if list(data.get("special_tokens", tokens.SPECIAL_TOKENS)) != list(tokens.SPECIAL_TOKENS):
            raise ValueError("ByteBPETokenizer: the file's special tokens differ from vlcore.tokens "
                             f"({data.get('special_tokens')} vs {list(tokens.SPECIAL_TOKENS)})")
        return cls([tuple(m) for m in data["merges"]])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ByteBPETokenizer:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ByteBPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls.from_json(path.read_text())


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
