"""CPU attention backend: torch's ``scaled_dot_product_attention`` CPU kernels, differentiated by autograd.

Semantics are those of :mod:`vlcore.reference.attention`; what this module adds is how to reach SDPA's fast
CPU kernels with them:

* no mask: SDPA's flash kernel; ``causal`` with Nq = Nk (where SDPA's top-left ``is_causal`` equals vlcore's
  bottom-right alignment) also runs maskless, the kernel skipping the blocks above the diagonal;
* PrefixLM / causal (Nq < Nk), no padding: an additive float mask, the causal part a cached constant
  (1, 1, Nq, Nk) and PrefixLM one ``where(j < prefix_lens[b], 0, causal)`` per call — the form SDPA's CPU
  kernel reads, so SDPA does not convert a boolean mask on every call;
* kv lengths (or Nq > Nk): one boolean (B, 1, Nq, Nk) mask per call, broadcast over heads;
* rel-pos bias: the table gathered once per call into an (H, Nq, Nk) bias (not per head), merged with the
  mask into one additive mask; SDPA runs its math kernel when the table needs a gradient (the flash kernel has
  no bias gradient), so the table's gradient comes from autograd through the gather.

Measured (torch 2.13, 1 thread, B 4, N 256, H 8, D 64): the CPU flash kernel costs Nq·Nk whatever the mask
(``is_causal`` no faster than no mask), and splitting the work to skip masked blocks (row chunks that see only
their keys, or a prefix block + a causal block merged by log-sum-exp) lost 7–25 %: every extra call pays a
fixed cost (the backward's per-call cost grows with Nk) and small query blocks run below the kernel's peak.
So the mask stays one tensor, built as cheaply as possible.

A query row with no visible key outputs 0 and receives zero gradient. SDPA's behaviour on such rows differs
across torch versions (NaN in older ones), so those rows are made fully visible for SDPA and their output is
multiplied by 0 afterwards — which also zeroes every gradient flowing through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcore.reference import attention as ref

DTYPES = (torch.float32, torch.float64)  # fp16/bf16 stay on the reference (fp32 compute of low-precision inputs)

_CAUSAL: dict[tuple, torch.Tensor] = {}  # (nq, nk, dtype, device) -> (1, 1, nq, nk) additive causal mask


def causal_bias(nq: int, nk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, Nq, Nk): 0 where j <= i + (Nk - Nq) (bottom-right causal), -inf elsewhere; memoised per shape."""
    key = (nq, nk, dtype, device)
    bias = None if torch.compiler.is_compiling() else _CAUSAL.get(key)
    if bias is None:
        i = torch.arange(nq, device=device).view(nq, 1)
        j = torch.arange(nk, device=device).view(1, nk)
        bias = torch.zeros(nq, nk, dtype=dtype, device=device).masked_fill_(j > i + (nk - nq), float("-inf"))
        bias = bias[None, None]
        if not torch.compiler.is_compiling():
            if len(_CAUSAL) >= 64:  # many distinct lengths: keep the memo bounded
                _CAUSAL.clear()
            _CAUSAL[key] = bias
    return bias


def _float_mask(batch: int, nq: int, nk: int, causal: bool, prefix_lens: torch.Tensor | None,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (B or 1, 1, Nq, Nk) mask of causal / PrefixLM visibility (Nq <= Nk: every row sees a key)."""
    bias = causal_bias(nq, nk, dtype, device)
    if prefix_lens is None:
        return bias
    in_prefix = torch.arange(nk, device=device).view(1, 1, 1, nk) < prefix_lens.view(batch, 1, 1, 1)
    return torch.where(in_prefix, torch.zeros((), dtype=dtype, device=device), bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
              rel_pos_table: torch.Tensor | None = None, rel_pos_grid: tuple[int, int] | None = None,
              rel_pos_start: int = 0, scale: float | None = None) -> torch.Tensor:
    """(B, Nq, H, D) attention of q (B or 1, Nq, H, D) over k, v (B, Nk, H, D); inputs validated by the op."""
    batch, nk = k.shape[:2]
    nq = q.shape[1]
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA's (B, H, N, D) as views
    if qt.shape[0] != batch:  # shared queries: autograd of the expand sums their gradient over the batch
        qt = qt.expand(batch, -1, -1, -1)
    maskless_causal = causal and nq == nk and prefix_lens is None and kv_lens is None and rel_pos_table is None
    if (causal or prefix_lens is not None) and not maskless_causal and kv_lens is None and nq <= nk:
        mask = _float_mask(batch, nq, nk, causal, prefix_lens, q.dtype, q.device)
        if rel_pos_table is not None:
            mask = mask + ref.rel_pos_bias(rel_pos_table.to(q.dtype), rel_pos_grid, rel_pos_start, nq, nk)[None]
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)
    visible = ref.visibility_mask(batch, nq, nk, q.device, causal=causal and not maskless_causal,
                                  prefix_lens=prefix_lens, kv_lens=kv_lens)
    row_ok = None
    if visible is not None and (kv_lens is not None or nq > nk):  # the only ways a row can see no key
        row_ok = visible.any(dim=-1, keepdim=True)  # (B, Nq, 1); no host sync, so torch.compile traces it
        visible = visible | ~row_ok
    mask = None if visible is None else visible[:, None]  # (B, 1, Nq, Nk): broadcast over the heads
    if rel_pos_table is not None:
        bias = ref.rel_pos_bias(rel_pos_table.to(q.dtype), rel_pos_grid, rel_pos_start, nq, nk)[None]
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=maskless_causal, scale=scale)
    out = out.transpose(1, 2)
    if row_ok is not None:
        out = out * row_ok[..., None].to(out.dtype)
    return out
