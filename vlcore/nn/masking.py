"""Whole-word masking (BERT-wwm, used by ViLT): choose *words* with probability ``prob`` and mask every
sub-word token of a chosen word (each token then [MASK] 80 %, random 10 %, kept 10 %, as in BERT's data code).

Word boundaries come as ``word_ids`` (B, T) (tokens of one word share an id), or from a per-vocabulary table
``word_start`` (V,) bool ("this token begins a word"): :func:`word_ids_from_starts`. For the byte-level BPE
tokenizer of vlcore a token begins a word when its bytes start with a space (GPT-2 style words), or when it
follows a special token: :func:`word_start_table`.
"""

from __future__ import annotations

import torch

from vlcore import tokens as T
from vlcore.nn.objectives import mask_tokens


def word_start_table(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(V,) bool: True for ids whose text starts a word (leading space), for specials, and for ids past the
    tokenizer's vocabulary. ``tokenizer`` needs ``decode`` and ``vocab_size``."""
    size = vocab_size or tokenizer.vocab_size
    table = torch.ones(size, dtype=torch.bool)
    for i in range(T.NUM_SPECIAL, min(size, tokenizer.vocab_size)):
        piece = tokenizer.decode([i])
        table[i] = piece[:1].isspace() or not piece[:1].isalnum()
    return table


def word_ids_from_starts(text: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
    """(B, T) word index of every token: a new word at each word-start token and after each special token."""
    starts = word_start.to(text.device)[text] | (text < T.NUM_SPECIAL)
    prev_special = torch.nn.functional.pad(text[:, :-1] < T.NUM_SPECIAL, (1, 0), value=True)
    return (starts | prev_special).long().cumsum(1)


def mask_whole_words(text: torch.Tensor, text_mask: torch.Tensor, word_ids: torch.Tensor, vocab_size: int,
                     prob: float = 0.15, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked text, labels) like :func:`vlcore.nn.objectives.mask_tokens`, but all tokens of a chosen word
    are chosen together. Every row with an ordinary token gets at least one chosen word."""
    if word_ids.shape != text.shape:
        raise ValueError(f"mask_whole_words: `word_ids` must have the shape of `text` {tuple(text.shape)}; "
                         f"got {tuple(word_ids.shape)}")
    return mask_tokens(text, text_mask, vocab_size, prob, generator, word_ids=word_ids)
