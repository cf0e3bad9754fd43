"""CPU attention backend: torch's ``scaled_dot_product_attention`` CPU kernels, differentiated by autograd.

Semantics are those of :mod:`vlcore.reference.attention`; what this module adds is how to reach SDPA's fast
CPU kernels with them:

* no mask: SDPA's flash kernel; ``causal`` with Nq = Nk (where SDPA's top-left ``is_causal`` equals vlcore's
  bottom-right alignment) also runs maskless, the kernel skipping the blocks above the diagonal;
* causal (Nq != Nk) / PrefixLM / kv lengths: one boolean (B, 1, Nq, Nk) mask per call, broadcast over heads;
* rel-pos bias: the table gathered once per call into an (H, Nq, Nk) bias (not per head), merged with the
  mask into one additive mask; SDPA runs its math kernel when the table needs a gradient (the flash kernel has
  no bias gradient), so the table's gradient comes from autograd through the gather.

A query row with no visible key outputs 0 and receives zero gradient. SDPA's behaviour on such rows differs
across torch versions (NaN in older ones), so those rows are made fully visible for SDPA and their output is
multiplied by 0 afterwards — which also zeroes every gradient flowing through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcore.reference import attention as ref

DTYPES = (torch.float32, torch.float64)  # fp16/bf16 stay on the reference (fp32 compute of low-precision inputs)


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
