"""Why samples were skipped: the reasons, a per-reader tally with the first offending keys, and the data error.

A reader never raises on one bad sample: it yields a :class:`Skip` naming the reason and where (``shard:key``,
``manifest:line``), and the stream tallies it. Only conditions that make training meaningless raise
:class:`DataError`: no path to read, a pass in which no sample could be used, or more bad samples than the
allowed fraction.
"""

from __future__ import annotations

from typing import NamedTuple

# One name per kind of malformed sample (the keys of ``skip_reasons()`` and of ``skipped_by_reason`` in the
# metrics), so a user can tell a dataset-wide problem (every image missing) from a few bad records.
UNREADABLE_SHARD = "unreadable_shard"  # the tar cannot be opened at all (not a tar, permission, vanished)
TRUNCATED_SHARD = "truncated_shard"  # the tar ends mid-member: what came before it stands
BAD_JSON = "bad_json"  # a manifest line or a .json member that is not a JSON object
NON_UTF8_TEXT = "non_utf8_text"  # caption text or manifest line that is not UTF-8
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION_TYPE = "bad_caption_type"  # e.g. "caption": 12345
BAD_BOXES = "bad_boxes"  # boxes not a list of [cx, cy, w, h] numbers in [0, 1] with w, h > 0
BAD_PHRASES = "bad_phrases"  # phrases not a list of strings, one per box
NO_IMAGE = "no_image"  # no image member / no "image" field
BAD_IMAGE_FIELD = "bad_image_field"  # "image" is not a path string
MISSING_IMAGE_FILE = "missing_image_file"
UNREADABLE_IMAGE_FILE = "unreadable_image_file"  # a directory, no permission, ...
IMAGE_TOO_LARGE = "image_too_large"  # over Pillow's decompression-bomb limit, or a member/file over the byte cap
MEMBER_TOO_LARGE = "member_too_large"  # a caption/JSON member over the byte cap
UNDECODABLE_IMAGE = "undecodable_image"  # truncated, corrupt, or not an image format we decode

EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """The data cannot train anything: no such path, no readable sample, or too many bad samples."""


class Skip(NamedTuple):
    reason: str
    where: str  # "shard.tar:key" or "manifest.jsonl:line"


class SkipTally:
    """Counts by reason plus the first few places of each (what a summary names)."""

    def __init__(self, counts: dict[str, int] | None = None, examples: dict[str, list[str]] | None = None):
        self.counts: dict[str, int] = dict(counts or {})
        self.examples: dict[str, list[str]] = {k: list(v) for k, v in (examples or {}).items()}

    def add(self, skip: Skip) -> None:
        self.counts[skip.reason] = self.counts.get(skip.reason, 0) + 1
        first = self.examples.setdefault(skip.reason, [])
        if len(first) < EXAMPLES_PER_REASON:
            first.append(skip.where)

    def merge(self, other: SkipTally) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            first = self.examples.setdefault(reason, [])
            first += other.examples.get(reason, [])[: EXAMPLES_PER_REASON - len(first)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Plain copies that travel from DataLoader workers with a batch."""
        return dict(self.counts), {k: list(v) for k, v in self.examples.items()}

    def describe(self) -> str:
        """``undecodable_image 7 (first: a.tar:000002, ...), missing_image_file 1 (first: m.jsonl:4)``."""
        parts = [f"{reason} {n} (first: {', '.join(self.examples.get(reason, []))})"
                 for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return ", ".join(parts) if parts else "none"
