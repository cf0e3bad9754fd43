"""vlcore's attention patched into open_clip's own modules (``vlcore.integrations.open_clip.apply``).

Only ``__class__`` is swapped (parameters and state-dict keys stay open_clip's): ``ResidualAttentionBlock``
gets an ``attention`` that projects with the ``nn.MultiheadAttention``'s own weights and calls
:func:`vlcore.attention` (vision towers bidirectional; text towers built with open_clip's causal mask run
``causal=True``, never reading the mask tensor; CoCa's cross-attention too), and ``AttentionalPooler`` a
``forward`` with its queries shared by the batch. Inputs vlcore's op cannot express fall back to open_clip's
path per call: a mask other than the tower's causal one (CoCa's [CLS] / padding masks, SigLIP-style padding
masks), attention dropout while training, ``bias_k`` / ``add_zero_attn``. A timm trunk (open_clip's SigLIP
ViTs) is patched by :func:`vlcore.integrations.timm.apply` in the same call, into the same report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, ResidualAttentionBlock
from torch import nn

import vlcore
from vlcore.integrations._report import PatchReport


def _plain(mha: nn.MultiheadAttention) -> bool:
    """True when vlcore's op computes exactly what this nn.MultiheadAttention does."""
    return mha.batch_first and mha.bias_k is None and not mha.add_zero_attn and not (mha.training and mha.dropout > 0)


def _weights(mha: nn.MultiheadAttention) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the q, k and v projections (fused in_proj or separate q/k/v weights)."""
    d = mha.embed_dim
    weights = mha.in_proj_weight.split(d) if mha._qkv_same_embed_dim else \
        (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(d)
    return list(zip(weights, biases))


class VlcoreResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip's ``ResidualAttentionBlock`` with :func:`vlcore.attention`."""

    vlcore_causal = False  # set on the blocks of a tower whose only 2-D mask is its causal mask (see apply)

    def attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mha = self.attn
        causal = attn_mask is not None and self.vlcore_causal and attn_mask.dim() == 2
        if (attn_mask is not None and not causal) or not _plain(mha):
            return super().attention(q_x, k_x, v_x, attn_mask)
        b, n, d = q_x.shape
        h = mha.num_heads
        (wq, bq), (wk, bk), (wv, bv) = _weights(mha)
        if k_x is None and mha._qkv_same_embed_dim:  # self-attention: one fused matmul, strided q/k/v views
            qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, d // h)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            k_x = q_x if k_x is None else k_x
            v_x = q_x if v_x is None else v_x
            q = F.linear(q_x, wq, bq).view(b, n, h, d // h)
            k = F.linear(k_x, wk, bk).view(b, k_x.shape[1], h, d // h)
            v = F.linear(v_x, wv, bv).view(b, v_x.shape[1], h, d // h)
        out = vlcore.attention(q, k, v, causal=causal)  # open_clip's mask is top-left causal; here Nq = Nk
        return mha.out_proj(out.reshape(b, n, d))


class VlcoreAttentionalPooler(AttentionalPooler):
    """open_clip's ``AttentionalPooler`` (CoCa) with :func:`vlcore.attention`; its queries go to the op once,
    with batch size 1 (no (B, n_queries, d) copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mha = self.attn
        if not _plain(mha):
            return super().forward(x)
        b, n, _ = x.shape
        d, h = mha.embed_dim, mha.num_heads
        x = self.ln_k(x)
        (wq, bq), (wk, bk), (wv, bv) = _weights(mha)
        q = F.linear(self.ln_q(self.query), wq, bq).view(1, -1, h, d // h)
        k = F.linear(x, wk, bk).view(b, n, h, d // h)
        v = F.linear(x, wv, bv).view(b, n, h, d // h)
        out = vlcore.attention(q, k, v)
        return mha.out_proj(out.reshape(b, -1, d))


_PATCHES = {ResidualAttentionBlock: VlcoreResidualAttentionBlock, AttentionalPooler: VlcoreAttentionalPooler}


def _causal_blocks(model: nn.Module) -> set[int]:
    """ids of the blocks of towers that pass their causal mask buffer (a 2-D ``attn_mask``): open_clip's CLIP
    text (mask on the model), ``TextTransformer`` and CoCa's ``MultimodalTransformer``."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(getattr(module, "attn_mask", None), torch.Tensor) and module.attn_mask.dim() == 2:
            stack = module if hasattr(module, "resblocks") else getattr(module, "transformer", None)
            ids.update(id(block) for block in getattr(stack, "resblocks", ()))
    return ids


def apply(model: nn.Module) -> PatchReport:
    report = PatchReport()
    causal = _causal_blocks(model)
    for name, module in model.named_modules():
        patched = _PATCHES.get(type(module))
        if patched is None:
            if type(module).__name__ in ("CustomResidualAttentionBlock", "Attention") and \
                    type(module).__module__.startswith("open_clip"):
                report.skipped[name] = f"open_clip {type(module).__name__} (not patched by vlcore)"
            elif isinstance(module, tuple(_PATCHES)) and type(module) not in _PATCHES.values():
                report.skipped[name] = f"{type(module).__name__} is a subclass vlcore does not know"
            continue
        cls_name = type(module).__name__
        module.__class__ = patched
        if id(module) in causal:
            module.vlcore_causal = True
            cls_name += " (causal)"
        report.add(cls_name, name)
    for name, module in model.named_modules():  # timm trunks (TimmModel.trunk): timm's own patcher
        if type(module).__name__ == "TimmModel" and hasattr(module, "trunk"):
            from vlcore.integrations._timm_attention import apply as timm_apply

            inner = timm_apply(module.trunk)
            for cls, names in inner.replaced.items():
                report.replaced.setdefault(f"timm {cls}", []).extend(f"{name}.trunk.{n}" for n in names)
            report.skipped.update({f"{name}.trunk.{n}": why for n, why in inner.skipped.items()})
    return report
