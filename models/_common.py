"""Small helpers shared by the model files: batch-key access with clear errors, text checks, config checks."""

from __future__ import annotations

import torch

from vlcore import tokens as T
from vlcore.nn.text import check_text, lengths


def need(batch: dict, key: str, model: str) -> torch.Tensor:
    """``batch[key]`` or a KeyError that names the model and the missing key."""
    if key not in batch:
        raise KeyError(f"{model}: the batch needs key {key!r} (got keys {sorted(batch)})")
    return batch[key]


def text_lengths(model: str, text: torch.Tensor, mask: torch.Tensor, name: str = "text",
                 min_len: int = 2) -> torch.Tensor:
    """Lengths (B,) of BOS ... EOS texts; every text must hold at least ``min_len`` tokens (BOS and EOS)."""
    check_text(model, text, mask, name)
    mask = mask.bool()
    lens = lengths(mask)
    if lens.numel() and text.device.type == "cpu":  # host-side checks only where they cost no device sync
        if int(lens.min()) < min_len:
            raise ValueError(f"{model}: every `{name}` must have at least {min_len} tokens (BOS ... EOS) in "
                             f"`{name}_mask`; got lengths {lens.tolist()}")
        if not torch.equal(mask, torch.arange(mask.shape[1]) < lens[:, None]):
            bad = int((mask != (torch.arange(mask.shape[1]) < lens[:, None])).any(1).nonzero()[0])
            raise ValueError(f"{model}: `{name}_mask` must be True on a prefix of each row (BOS ... EOS, then "
                             f"padding); row {bad} is {mask[bad].int().tolist()}")
    return lens


def generation_prompt(model: str, prompt: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """BOS followed by ``prompt`` (B, P) (a leading BOS in ``prompt`` is kept, not doubled)."""
    bos = torch.full((batch, 1), T.BOS, dtype=torch.long, device=device)
    if prompt is None:
        return bos
    check_text(model, prompt, None, "prompt")
    if prompt.shape[0] != batch:
        raise ValueError(f"{model}: `prompt` must have batch {batch} (as the image); got {tuple(prompt.shape)}")
    if (prompt == T.PAD).any():
        raise ValueError(f"{model}: `prompt` must not contain PAD: all rows need the same prompt length")
    prompt = prompt.to(device)
    if prompt.shape[1] and bool((prompt[:, 0] == T.BOS).all()):
        return prompt
    return torch.cat([bos, prompt], dim=1)

