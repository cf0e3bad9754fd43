r"""Reference attention: readable, exact in fp32 (fp64 for fp64 inputs), differentiable by autograd.

    out[b, i, h] = \sum_j softmax_j( scale · q[b,i,h]·k[b,j,h] + bias[h,i,j] ; visible(b,i,j) ) · v[b,j,h]

``visible`` combines (logical and):
  * causal (bottom-right aligned, as flash-attn >= 2.1):  j <= i + (Nk - Nq)
  * PrefixLM (SimVLM):  j < prefix_lens[b]  or  j <= i + (Nk - Nq)   (0 = causal, Nk = bidirectional)
  * padding:  j < kv_lens[b]
``bias`` is the 2-D relative position bias of Swin/timm: for tokens t_q, t_k both in [s, s + gh·gw), with
(y, x) = divmod(t - s, gw), bias = table[(y_q - y_k + gh - 1)(2gw - 1) + (x_q - x_k + gw - 1), h].
A query row with no visible key outputs 0 and receives zero gradient (never NaN).

This path materialises (B, H, Nq, Nk) scores: it is the ground truth of the tests and the CPU execution
path, not the fast path.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visibility_mask(batch: int, nq: int, nk: int, device: torch.device, *, causal: bool = False,
                    prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean (B, Nq, Nk) mask of visible keys, or None when everything is visible."""
    i = torch.arange(nq, device=device).view(1, nq, 1)
    j = torch.arange(nk, device=device).view(1, 1, nk)
    mask = None
    if causal or prefix_lens is not None:
        mask = (j <= i + (nk - nq)).expand(batch, nq, nk)
        if prefix_lens is not None:
            mask = mask | (j < prefix_lens.to(device).view(batch, 1, 1))
    if kv_lens is not None:
        pad = (j < kv_lens.to(device).view(batch, 1, 1)).expand(batch, nq, nk)
        mask = pad if mask is None else mask & pad
    return mask


def rel_pos_index(gh: int, gw: int, device: torch.device | None = None) -> torch.Tensor:
    """(gh·gw, gh·gw) table row for every (query, key) pair of the grid — the Swin/timm formula."""
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, G)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, G, G)
    return (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)


def rel_pos_bias(table: torch.Tensor, grid: tuple[int, int], start: int, nq: int, nk: int) -> torch.Tensor:
    """Dense (H, Nq, Nk) bias: the table gathered for the grid tokens, 0 elsewhere (the timm-style path)."""
    gh, gw = grid
    g = gh * gw
    heads = table.shape[1]
    q_hi, k_hi = min(start + g, nq), min(start + g, nk)
    if start >= q_hi or start >= k_hi:
        return table.new_zeros(heads, nq, nk)
    idx = rel_pos_index(gh, gw, table.device)[: q_hi - start, : k_hi - start]
    block = table[idx.reshape(-1)].reshape(q_hi - start, k_hi - start, heads).permute(2, 0, 1)
    return torch.nn.functional.pad(block, (start, nk - k_hi, start, nq - q_hi))


def _probs(q, k, *, causal, prefix_lens, kv_lens, rel_pos_table, rel_pos_grid, rel_pos_start, scale):
    """Attention probabilities (B, H, Nq, Nk) in the compute dtype and lse (B, H, Nq); -inf lse = no key."""
    batch, nk = k.shape[:2]
    nq = q.shape[1]
    acc = compute_dtype(q.dtype)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) * scale
    if scores.shape[0] != batch:
        scores = scores.expand(batch, -1, -1, -1)
    if rel_pos_table is not None:
        scores = scores + rel_pos_bias(rel_pos_table.to(acc), rel_pos_grid, rel_pos_start, nq, nk)
    mask = visibility_mask(batch, nq, nk, q.device, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens)
    if mask is None:
        return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1)
    mask = mask[:, None]  # (B, 1, Nq, Nk)
    # Masked softmax that stays finite for rows with no visible key (their output and gradient are 0).
    masked = scores.masked_fill(~mask, float("-inf"))
    any_visible = mask.any(dim=-1, keepdim=True)
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(any_visible, row_max, torch.zeros_like(row_max)).detach()
    p = torch.exp(masked - row_max)  # exp(-inf) = 0 at masked keys, with zero gradient
    denom = p.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(any_visible, denom, torch.ones_like(denom))
    lse = torch.where(any_visible, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    return p / safe_denom, lse.squeeze(-1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                       rel_pos_table: torch.Tensor | None = None, rel_pos_grid: tuple[int, int] | None = None,
                       rel_pos_start: int = 0, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q's dtype, lse (B, H, Nq) fp32/fp64; -inf where a row sees no key).

    q may have batch size 1 (or batch stride 0) with k/v of batch B: one query set shared by the batch.
    """
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    probs, lse = _probs(q, k, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens, rel_pos_table=rel_pos_table,
                        rel_pos_grid=rel_pos_grid, rel_pos_start=rel_pos_start, scale=scale)
    out = torch.einsum("bhij,bjhd->bihd", probs, v.to(probs.dtype))
    return out.to(q.dtype), lse


def attention(q, k, v, **kwargs) -> torch.Tensor:
    return attention_with_lse(q, k, v, **kwargs)[0]


def attention_backward(dout, q, k, v, *, causal=False, prefix_lens=None, kv_lens=None, rel_pos_table=None,
                       rel_pos_grid=None, rel_pos_start=0, scale=None):
    """Explicit gradients (dq, dk, dv, dtable or None) — the formulas a fused backward implements:

        P = softmax(S),  dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(P ⊙ dP)),
        dQ = scale·dS·K (summed over the batch for shared queries),  dK = scale·dSᵀ·Q,
        dtable[r, h] = Σ_b Σ_{(i,j): index(i,j)=r} dS[b, h, i, j].
    """
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    probs, _ = _probs(q, k, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens, rel_pos_table=rel_pos_table,
                      rel_pos_grid=rel_pos_grid, rel_pos_start=rel_pos_start, scale=scale)
    acc = probs.dtype
    do, qf, kf, vf = dout.to(acc), q.to(acc), k.to(acc), v.to(acc)
    if do.shape[0] != probs.shape[0]:
        do = do.expand(probs.shape[0], -1, -1, -1)
    dv = torch.einsum("bhij,bihd->bjhd", probs, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vf)
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    dq = torch.einsum("bhij,bjhd->bihd", ds, kf) * scale
    if q.shape[0] != dq.shape[0]:
        dq = dq.sum(0, keepdim=True)
    dk = torch.einsum("bhij,bihd->bjhd", ds, qf.expand(ds.shape[0], -1, -1, -1)) * scale
    dtable = None
    if rel_pos_table is not None:
        gh, gw = rel_pos_grid
        g, s = gh * gw, rel_pos_start
        nq, nk = ds.shape[-2:]
        q_hi, k_hi = min(s + g, nq), min(s + g, nk)
        dtable = torch.zeros(rel_pos_table.shape, dtype=acc, device=ds.device)
        if s < q_hi and s < k_hi:
            block = ds[:, :, s:q_hi, s:k_hi].sum(0)  # (H, gq, gk)
            idx = rel_pos_index(gh, gw, ds.device)[: q_hi - s, : k_hi - s].reshape(-1)
            dtable.index_add_(0, idx, block.reshape(block.shape[0], -1).t())
        dtable = dtable.to(rel_pos_table.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable
