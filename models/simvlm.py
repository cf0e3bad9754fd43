"""SimVLM (Wang et al., ICLR 2022): PrefixLM on a ResNet-stem + Transformer encoder-decoder.

* Image: the first three ResNet stages (stride 16) -> linear projection -> Ti image tokens with their own 1-D
  position embedding; every encoder layer adds a learned 2-D relative-position bias among the image tokens
  (``vlcore.attention``'s rel_pos_table on the image grid, one table per layer).
* Text: shared token embedding (tied with the output layer) and a text 1-D position embedding.
* PrefixLM: for each example a text prefix length p is drawn uniformly in [1, L-1] (L = BOS..EOS length; the
  BOS is always in the prefix), so the prefix length Tp = Ti + p >= Ti. The encoder reads image + text[:p]
  bidirectionally (padding by ``kv_lens``); the causal decoder reads text[p-1 : L-1] and predicts text[p : L]:
  the loss covers the suffix text only (mean over suffix tokens of the batch).
* Text-only batches (``lm_text`` / ``lm_text_mask``) train the same model with the same PrefixLM loss and no
  image tokens (Tp = p).
* ``decoder_only=True``: the paper's alternative — one stack of encoder_depth + decoder_depth causal layers over
  [image, text] with ``vlcore.attention``'s PrefixLM mask (``prefix_lens`` = Ti + p, padding by ``kv_lens``, the
  2-D relative bias on the image grid: all three combined in one call); same loss, same decoding API.

Sizes (ViT-B/L/H-shaped encoder and decoder): base 768 wide, 12 + 12 layers; large 1024, 24 + 24; huge 1280,
32 + 32. The paper gives the widths; depths and the 32k vocabulary are this implementation's choice.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlcore.nn.generation import DecodingState, decode
from vlcore.nn.objectives import IGNORE, token_cross_entropy
from vlcore.nn.resnet import ResNet
from vlcore.nn.text import TextEmbeddings
from vlcore.nn.transformer import decoder, encoder, init_weights

from . import register
from ._common import generation_prompt, need, text_lengths


@dataclasses.dataclass
class SimVLMConfig:
    vocab_size: int = 32000
    image_size: int = 224
    max_text_len: int = 64
    dim: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    resnet_layers: tuple[int, ...] = (3, 4, 6)  # the first three stages of ResNet-50: stride 16
    resnet_width: int = 64
    resnet_norm: str = "group"
    text_only_weight: float = 1.0  # weight of the PrefixLM loss on a text-only batch (``lm_text``)
    decoder_only: bool = False  # one PrefixLM-masked stack instead of the encoder-decoder
    checkpoint: bool = False


def sample_prefix_lens(lens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Text prefix length p uniform in [1, L-1] per example (BOS always in the prefix, >= 1 target left)."""
    lens = lens.long()
    u = torch.rand(lens.shape, device=lens.device, generator=generator)
    return 1 + (u * (lens - 1)).long().clamp(max=(lens - 2).clamp(min=0))


class SimVLM(nn.Module):
    def __init__(self, config: SimVLMConfig):
        super().__init__()
        c = self.config = config
        self.stem = ResNet(tuple(c.resnet_layers), c.image_size, base_width=c.resnet_width, norm=c.resnet_norm,
                           checkpoint=c.checkpoint)
        self.grid = self.stem.grid
        self.num_image_tokens = self.grid[0] * self.grid[1]
        self.image_proj = nn.Linear(self.stem.out_channels, c.dim)
        self.image_pos = nn.Parameter(torch.zeros(1, self.num_image_tokens, c.dim))
        self.text_embed = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len, segments=0, norm=False)
        if c.decoder_only:
            self.stack = decoder(c.dim, c.encoder_depth + c.decoder_depth, c.heads, c.mlp_ratio,
                                 rel_pos_grid=self.grid, checkpoint=c.checkpoint)
        else:
            self.encoder = encoder(c.dim, c.encoder_depth, c.heads, c.mlp_ratio, rel_pos_grid=self.grid,
                                   checkpoint=c.checkpoint)
            self.decoder = decoder(c.dim, c.decoder_depth, c.heads, c.mlp_ratio, cross=True,
                                   checkpoint=c.checkpoint)
        init_weights(self)  # linear, embedding, LayerNorm (the stem's convolutions keep their He init)
        nn.init.trunc_normal_(self.image_pos, std=0.02)

    # ---- pieces -----------------------------------------------------------------------------------------

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.stem(image).flatten(2).transpose(1, 2)  # (B, Ti, C)
        return self.image_proj(feats) + self.image_pos

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.text_embed.tokens.weight)  # tied output layer

    def encode(self, image: torch.Tensor | None, text: torch.Tensor, prefix_lens: torch.Tensor,
               batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder over image tokens (optional) + text[:, :p_b]; returns (memory (B, M, D), memory_lens (B,))."""
        pmax = int(prefix_lens.max())
        keep = torch.arange(pmax, device=text.device) < prefix_lens[:, None]
        prefix = self.text_embed(torch.where(keep, text[:, :pmax], torch.zeros_like(text[:, :pmax])))
        if image is None:
            x, n_img = prefix, 0
        else:
            x, n_img = torch.cat([self.image_tokens(image), prefix], dim=1), self.num_image_tokens
        lens = (prefix_lens + n_img).to(torch.int32)
        memory = self.encoder(x, kv_lens=lens, rel_pos_start=0, use_rel_pos=image is not None)
        return memory, lens

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, memory: torch.Tensor,
                      memory_lens: torch.Tensor, cache=None) -> torch.Tensor:
        x = self.text_embed(tokens, positions=positions)
        return self.logits(self.decoder(x, memory, context_lens=memory_lens, cache=cache))

    def prefix_lm(self, image: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor,
                  prefix_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PrefixLM logits and targets: (logits (B, S, V), targets (B, S) with IGNORE outside the suffix).

        ``prefix_lens`` (B,): text prefix length p in [1, L-1] (BOS included); drawn uniformly when None.
        """
        lens = text_lengths("SimVLM", text, text_mask).to(text.device)
        if text.shape[1] > self.config.max_text_len:
            raise ValueError(f"SimVLM: text length {text.shape[1]} exceeds max_text_len {self.config.max_text_len}")
        if prefix_lens is None:
            prefix_lens = sample_prefix_lens(lens)
        prefix_lens = prefix_lens.to(device=text.device, dtype=torch.long)
        if text.device.type == "cpu" and bool(((prefix_lens < 1) | (prefix_lens >= lens)).any()):
            raise ValueError(f"SimVLM: prefix_lens must lie in [1, L-1]; got {prefix_lens.tolist()} for L={lens.tolist()}")
        suffix = lens - prefix_lens  # >= 1
        steps = torch.arange(int(suffix.max()), device=text.device)
        pos = prefix_lens[:, None] - 1 + steps  # predict text[p : L] from text[p-1 : L-1]
        last = text.shape[1] - 1
        targets = text.gather(1, (pos + 1).clamp(max=last))
        targets = torch.where(steps < suffix[:, None], targets, torch.full_like(targets, IGNORE))
        if self.config.decoder_only:
            n_img = 0 if image is None else self.num_image_tokens
            x = self.text_embed(text)
            if image is not None:
                x = torch.cat([self.image_tokens(image), x], dim=1)
            hidden = self.stack(x, prefix_lens=(n_img + prefix_lens).to(torch.int32),
                                kv_lens=(n_img + lens).to(torch.int32), rel_pos_start=0, use_rel_pos=image is not None)
            at = (n_img + pos).clamp(max=hidden.shape[1] - 1)
            return self.logits(hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))), targets
        memory, memory_lens = self.encode(image, text, prefix_lens)
        dec_in = text.gather(1, pos.clamp(max=last))  # the decoder reads text[p-1 : L-1] at its text positions
        logits = self.decode_logits(dec_in, pos.clamp(max=self.config.max_text_len - 1), memory, memory_lens)
        return logits, targets

    # ---- the contract -----------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits, targets = self.prefix_lm(need(batch, "image", "SimVLM"), need(batch, "text", "SimVLM"),
                                         need(batch, "text_mask", "SimVLM"))
        out = {"prefix_lm": token_cross_entropy(logits, targets)}
        loss = out["prefix_lm"]
        if "lm_text" in batch:
            lm_logits, lm_targets = self.prefix_lm(None, batch["lm_text"], need(batch, "lm_text_mask", "SimVLM"))
            out["prefix_lm_text"] = token_cross_entropy(lm_logits, lm_targets)
            loss = loss + self.config.text_only_weight * out["prefix_lm_text"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Sum log-likelihood of each text (all tokens after BOS, EOS included) given its image: (B,)."""
        lens = text_lengths("SimVLM", text, text_mask)
        logits, targets = self.prefix_lm(image, text, text_mask, torch.ones_like(lens, dtype=torch.long))
        logp = torch.log_softmax(logits.float(), dim=-1)
        valid = targets != IGNORE
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (picked * valid).sum(1)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: torch.Tensor | None = None, max_new_tokens: int = 20,
                 strategy: str = "greedy", *, use_cache: bool = True, **options) -> torch.Tensor:
        """Continue ``prompt`` (B, P) (or nothing) after the image. The encoder reads image + BOS + prompt once;
        the decoder starts from the last prefix token. Returns the new tokens (B, T'), ending at EOS (PAD after)
        or at the limit (at most max_text_len - prefix length). ``options``: beam_size, top_p, temperature,
        length_penalty, generator."""
        start = generation_prompt("SimVLM", prompt, image.shape[0], image.device)
        p = start.shape[1]
        max_new_tokens = min(max_new_tokens, self.config.max_text_len - p)
        if self.config.decoder_only:
            return self._generate_decoder_only(image, start, max_new_tokens, strategy, use_cache, options)
        memory, memory_lens = self.encode(image, start, torch.full((image.shape[0],), p, device=image.device))

        def run(tokens, offset, ctx, cache):
            pos = (p - 1 + offset + torch.arange(tokens.shape[1], device=tokens.device)).clamp(
                max=self.config.max_text_len - 1)
            return self.decode_logits(tokens, pos, ctx["memory"], ctx["memory_lens"], cache)

        cache = self.decoder.new_cache(max_new_tokens + 1) if use_cache else None
        state = DecodingState(run, {"memory": memory, "memory_lens": memory_lens}, cache)
        return decode(state, start[:, -1:], max_new_tokens, strategy, **options)

    def _generate_decoder_only(self, image, start, max_new_tokens, strategy, use_cache, options):
        n_img, p = self.num_image_tokens, start.shape[1]

        def run(tokens, offset, ctx, cache):
            x = self.text_embed(tokens, positions=offset + torch.arange(tokens.shape[1], device=tokens.device))
            if offset == 0:  # image + BOS + prompt: the bidirectional prefix (with the cache: filled once)
                x = torch.cat([ctx["image"], x], dim=1)
                lens = torch.full((x.shape[0],), n_img + p, dtype=torch.int32, device=x.device)
                hidden = self.stack(x, prefix_lens=lens, rel_pos_start=0, cache=cache)
            else:  # new text tokens: causal over everything cached (no image query: no 2-D bias)
                hidden = self.stack(x, use_rel_pos=False, cache=cache)
            return self.logits(hidden)

        cache = self.stack.new_cache(n_img + p + max_new_tokens) if use_cache else None
        state = DecodingState(run, {"image": self.image_tokens(image)}, cache)
        return decode(state, start, max_new_tokens, strategy, **options)


def build(config: SimVLMConfig) -> SimVLM:
    return SimVLM(config)


register("simvlm-tiny", SimVLMConfig(vocab_size=1000, image_size=64, max_text_len=32, dim=64, encoder_depth=2,
                                     decoder_depth=2, heads=2, resnet_layers=(1, 1, 1), resnet_width=16), build)
register("simvlm-base", SimVLMConfig(), build)
register("simvlm-large", SimVLMConfig(dim=1024, encoder_depth=24, decoder_depth=24, heads=16), build)
register("simvlm-huge", SimVLMConfig(dim=1280, encoder_depth=32, decoder_depth=32, heads=16), build)
