"""Data for ``vlcore pretrain``: the embedded digits-scenes dataset, tar shards / JSONL manifests, the tokenizer."""

from vlcore.data.digits_scenes import DigitsScenes
from vlcore.data.loader import Collator, DigitsSource, ShardSource
from vlcore.data.shards import ShardStream
from vlcore.data.skips import DataError
from vlcore.data.tokenizer import ByteBPETokenizer

__all__ = ["ByteBPETokenizer", "Collator", "DataError", "DigitsScenes", "DigitsSource", "ShardSource", "ShardStream"]
