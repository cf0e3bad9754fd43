"""Captioning: a small causal decoder over any model's image tokens (:class:`CaptionHead`), or the model's own
``generate`` (:func:`generate_captions`). Decoding (greedy / beam / top-p with a KV cache) is
``vlcore.nn.generation``'s."""

from __future__ import annotations

import torch
from torch import nn

from vlcore import tokens as T
from vlcore.nn.generation import DecodingState, decode
from vlcore.nn.objectives import IGNORE, token_cross_entropy
from vlcore.nn.text import TextEmbeddings, lengths
from vlcore.nn.transformer import LN_EPS, decoder, init_weights


class CaptionHead(nn.Module):
    """Decoder with cross-attention to projected image tokens (B, N, context_dim).

    loss(context, text, text_mask) -> teacher-forced next-token cross-entropy over BOS..EOS;
    generate(context, max_new_tokens, strategy, **options) -> new tokens (B, T') ending at EOS.
    """

    def __init__(self, context_dim: int, vocab_size: int, dim: int = 256, depth: int = 2, heads: int = 4,
                 max_len: int = 32):
        super().__init__()
        self.max_len = max_len
        self.context_proj = nn.Sequential(nn.LayerNorm(context_dim, eps=LN_EPS), nn.Linear(context_dim, dim))
        self.embed = TextEmbeddings(vocab_size, dim, max_len, segments=0, norm=False)
        self.decoder = decoder(dim, depth, heads, cross=True)
        init_weights(self)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, memory: torch.Tensor,
               kv_lens: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        x = self.decoder(self.embed(tokens, positions=positions), memory, kv_lens=kv_lens, cache=cache)
        return nn.functional.linear(x, self.embed.tokens.weight)

    def loss(self, context: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        memory = self.context_proj(context)
        mask = text_mask.bool()
        target = text[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
        pos = torch.arange(text.shape[1] - 1, device=text.device)
        logits = self.logits(text[:, :-1], pos, memory, kv_lens=(lengths(mask) - 1).clamp(min=1))
        return token_cross_entropy(logits, target)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, max_new_tokens: int = 20, strategy: str = "greedy",
                 **options) -> torch.Tensor:
        memory = self.context_proj(context)
        start = torch.full((context.shape[0], 1), T.BOS, dtype=torch.long, device=context.device)
        max_new_tokens = min(max_new_tokens, self.max_len - 1)

        def run(tokens, offset, ctx, cache):
            pos = offset + torch.arange(tokens.shape[1], device=tokens.device)
            return self.logits(tokens, pos, ctx["memory"], cache=cache)

        state = DecodingState(run, {"memory": memory}, self.decoder.new_cache(max_new_tokens + 1))
        return decode(state, start, max_new_tokens, strategy, **options)


@torch.no_grad()
def generate_captions(model, images: torch.Tensor, tokenizer, head: CaptionHead | None = None,
                      max_new_tokens: int = 20, **options) -> list[str]:
    """Captions as strings: the model's ``generate`` or, with ``head``, the head over ``model.image_tokens``."""
    if head is not None:
        ids = head.generate(model.image_tokens(images), max_new_tokens, **options)
    elif hasattr(model, "generate"):
        ids = model.generate(images, max_new_tokens=max_new_tokens, **options)
    else:
        raise TypeError(f"generate_captions: {type(model).__name__} has no `generate`; pass a CaptionHead trained "
                        "on its `image_tokens`")
    return [tokenizer.decode(row.tolist()) for row in ids]
