"""Autoregressive decoding shared by the captioners (CoCa, SimVLM): greedy, beam search and top-p sampling
over a :class:`DecodingState` that keeps the KV cache (or, with ``cache=None``, recomputes everything)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlcore import tokens as T
from vlcore.nn.attention import KVCache

RunFn = Callable[[torch.Tensor, int, dict, object], torch.Tensor]


def _caches(obj):
    if isinstance(obj, KVCache):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _caches(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _caches(v)


class DecodingState:
    """Tokens fed so far, per-row context tensors and the KV caches of one decoding run.

    ``run(tokens (N, n), start, context, cache) -> logits (N, n, V)`` runs the decoder on tokens at positions
    start..start+n-1. With a cache only the new tokens are fed; with ``cache=None`` the whole history is.
    """

    def __init__(self, run: RunFn, context: dict[str, torch.Tensor], cache=None):
        self.run, self.context, self.cache = run, context, cache
        self.tokens: torch.Tensor | None = None

    def step(self, new: torch.Tensor) -> torch.Tensor:
        """Feed (N, n) new tokens, return the next-token logits (N, V) in fp32."""
        start = 0 if self.tokens is None else self.tokens.shape[1]
        self.tokens = new if self.tokens is None else torch.cat([self.tokens, new], dim=1)
        if self.cache is not None:
            logits = self.run(new, start, self.context, self.cache)
        else:
            logits = self.run(self.tokens, 0, self.context, None)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)
        self.context = {k: v.index_select(0, index) for k, v in self.context.items()}
        for cache in _caches(self.cache):
            cache.reorder(index)


def _finish(out: list[torch.Tensor], batch: int, device) -> torch.Tensor:
    return torch.stack(out, dim=1) if out else torch.empty(batch, 0, dtype=torch.long, device=device)


@torch.no_grad()
def decode(state: DecodingState, start: torch.Tensor, max_new_tokens: int, strategy: str = "greedy", *,
           beam_size: int = 4, top_p: float = 0.9, temperature: float = 1.0, length_penalty: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``start`` (B, P). Returns long (B, T'): the new tokens, ending
    at EOS (PAD after it) or at the limit; T' is the longest generated length."""
    if strategy == "beam":
        return _beam(state, start, max_new_tokens, beam_size, length_penalty)
    if strategy not in ("greedy", "top_p"):
        raise ValueError(f"generate: strategy must be 'greedy', 'beam' or 'top_p'; got {strategy!r}")
    batch, device = start.shape[0], start.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out, feed = [], start
    for _ in range(max_new_tokens):
        logits = state.step(feed)
        if strategy == "greedy":
            nxt = logits.argmax(-1)
        else:
            nxt = _sample_top_p(logits / max(temperature, 1e-6), top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, T.PAD), nxt)
        out.append(nxt)
        done = done | (nxt == T.EOS)
        if bool(done.all()):
            break
        feed = nxt[:, None]
    return _finish(out, batch, device)


def _sample_top_p(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``."""
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the top token is always kept
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


def _beam(state: DecodingState, start: torch.Tensor, max_new_tokens: int, k: int, length_penalty: float):
    """Beam search; a finished beam continues with PAD at no cost; the best beam by score / length**penalty."""
    batch, device = start.shape[0], start.device
    if max_new_tokens <= 0:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    logp = torch.log_softmax(state.step(start), dim=-1)  # (B, V)
    vocab = logp.shape[-1]
    k = min(k, vocab)
    scores, tok = logp.topk(k, dim=-1)  # (B, K)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    state.reorder(rows)
    seqs = tok.reshape(-1, 1)
    scores = scores.reshape(-1)
    done = seqs[:, -1] == T.EOS
    lengths = torch.ones(batch * k, device=device)
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        logp = torch.log_softmax(state.step(seqs[:, -1:]), dim=-1)
        pad_only = torch.full_like(logp, float("-inf"))
        pad_only[:, T.PAD] = 0.0
        logp = torch.where(done[:, None], pad_only, logp)
        cand = (scores[:, None] + logp).view(batch, k * vocab)
        scores, flat = cand.topk(k, dim=-1)
        beam = flat // vocab + torch.arange(batch, device=device)[:, None] * k
        beam, token = beam.reshape(-1), (flat % vocab).reshape(-1)
        scores = scores.reshape(-1)
        state.reorder(beam)
        lengths = lengths[beam] + (~done[beam]).float()
        seqs = torch.cat([seqs[beam], token[:, None]], dim=1)
        done = done[beam] | (token == T.EOS)
    normed = (scores / lengths.pow(length_penalty)).view(batch, k)
    best = seqs[normed.argmax(-1) + torch.arange(batch, device=device) * k]
    used = (best != T.PAD).any(0).nonzero()  # drop trailing columns that are PAD for every row
    return best[:, : int(used.max()) + 1] if used.numel() else best[:, :1]
