"""Pre-norm Transformer layers and stacks: MLP, encoder layer, decoder layer (causal, optional cross-attention,
KV cache), and stacks with optional activation checkpointing.

All attention goes through :class:`vlcore.nn.attention.MultiheadAttention` (hence :func:`vlcore.attention`);
masks travel as per-sample lengths (``prefix_lens``, ``kv_lens`` for the layer's own tokens,
``context_lens`` for the cross-attended context), never as mask tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from vlcore.nn.attention import KVCache, MultiheadAttention

LN_EPS = 1e-6


class QuickGELU(nn.Module):
    """x·σ(1.702·x): the GELU approximation OpenAI's CLIP was trained with (Radford et al., 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation(name: str) -> nn.Module:
    """The MLP activation: ``"gelu"`` (exact, the default), ``"gelu_tanh"`` (SigLIP's tanh approximation),
    ``"quick_gelu"`` (OpenAI CLIP's x·σ(1.702x)); the last two exist to run those checkpoints unchanged."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"activation: `act` must be one of {ACTIVATIONS}; got {name!r}")


class MLP(nn.Module):
    """Linear -> GELU (``act``: see :func:`activation`) -> Linear."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """x = x + SelfAttn(LN(x)); [x = x + CrossAttn(LN(x), context)]; x = x + MLP(LN(x)).

    ``causal=True`` makes the self-attention causal (decoder). ``mlp_ratio=0`` drops the MLP.
    ``self_mlp=True`` adds a second MLP right after the self-attention and ``context_norm=True`` a LayerNorm
    on the cross-attended context (open_clip's CoCa decoder layer: self-attention block + cross-attention
    block, each with its own MLP). ``post_norm=True`` puts each LayerNorm after its residual sum instead (x = LN(x + SelfAttn(x)) ...), the
    original BERT layer, so BERT checkpoints run unchanged; ``eps`` is the LayerNorms' epsilon (BERT: 1e-12);
    ``act`` the MLPs' activation (:func:`activation`).
    """

    causal_default = False

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, cross: bool = False,
                 context_dim: int | None = None, rel_pos_grid: tuple[int, int] | None = None,
                 causal: bool | None = None, backend: str | None = None, post_norm: bool = False,
                 eps: float = LN_EPS, self_mlp: bool = False, context_norm: bool = False, act: str = "gelu"):
        super().__init__()
        self.causal = self.causal_default if causal is None else causal
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiheadAttention(dim, heads, rel_pos_grid=rel_pos_grid, backend=backend)
        self.cross = cross
        hidden = int(dim * mlp_ratio)
        self.self_mlp = MLP(dim, hidden, act=act) if self_mlp else None
        self.norm_self_mlp = nn.LayerNorm(dim, eps=eps) if self_mlp else None
        self.norm_context = nn.LayerNorm(context_dim or dim, eps=eps) if cross and context_norm else None
        if cross:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = MultiheadAttention(dim, heads, cross=True, context_dim=context_dim, backend=backend)
        if hidden:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = MLP(dim, hidden, act=act)
        else:
            self.mlp = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                context_lens: torch.Tensor | None = None, rel_pos_start: int = 0, use_rel_pos: bool = True,
                cache: dict[str, KVCache] | None = None) -> torch.Tensor:
        if self.post_norm:
            return self._forward_post_norm(x, context, kv_lens=kv_lens, context_lens=context_lens)
        x = x + self.attn(self.norm1(x), causal=self.causal and prefix_lens is None, prefix_lens=prefix_lens,
                          kv_lens=kv_lens, rel_pos_start=rel_pos_start, use_rel_pos=use_rel_pos,
                          cache=None if cache is None else cache["self"])
        if self.self_mlp is not None:
            x = x + self.self_mlp(self.norm_self_mlp(x))
        if self.cross:
            if self.norm_context is not None and context is not None and (cache is None or cache["cross"].empty):
                context = self.norm_context(context)
            x = x + self.cross_attn(self.norm_cross(x), context, kv_lens=context_lens,
                                    cache=None if cache is None else cache["cross"])
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def _forward_post_norm(self, x: torch.Tensor, context: torch.Tensor | None, *, kv_lens: torch.Tensor | None,
                           context_lens: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, causal=self.causal, kv_lens=kv_lens))
        if self.cross:
            x = self.norm_cross(x + self.cross_attn(x, context, kv_lens=context_lens))
        if self.mlp is not None:
            x = self.norm2(x + self.mlp(x))
        return x


class EncoderLayer(TransformerLayer):
    """Bidirectional self-attention (+ optional cross-attention) + MLP."""


class DecoderLayer(TransformerLayer):
    """Causal self-attention (+ optional cross-attention) + MLP; supports a KV cache."""

    causal_default = True


class TransformerStack(nn.Module):
    """A sequence of layers, an optional final LayerNorm, optional activation checkpointing per layer.

    forward(x, context=None, *, cache=None (list from ``new_cache``), **masks) -> (B, N, dim)
    """

    def __init__(self, layers: list[TransformerLayer], dim: int, *, final_norm: bool = True,
                 checkpoint: bool = False, eps: float = LN_EPS):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim, eps=eps) if final_norm else nn.Identity()
        self.checkpoint = checkpoint

    def new_cache(self, max_len: int | None = None) -> list[dict[str, KVCache]]:
        return [{"self": KVCache(max_len), "cross": KVCache()} for _ in self.layers]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                cache: list[dict[str, KVCache]] | None = None, **masks) -> torch.Tensor:
        use_ckpt = self.checkpoint and cache is None and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if use_ckpt:
                x = _checkpoint(layer, x, context, use_reentrant=False, **masks)
            else:
                x = layer(x, context, cache=None if cache is None else cache[i], **masks)
        return self.norm(x)


def encoder(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, *, cross: bool = False,
            context_dim: int | None = None, rel_pos_grid: tuple[int, int] | None = None, final_norm: bool = True,
            checkpoint: bool = False, backend: str | None = None, post_norm: bool = False,
            eps: float = LN_EPS, act: str = "gelu", causal: bool = False) -> TransformerStack:
    """A stack of :class:`EncoderLayer` (one relative-position table per layer when ``rel_pos_grid`` is set);
    ``causal=True``: CLIP's text tower, an encoder whose self-attention is causal."""
    layers = [EncoderLayer(dim, heads, mlp_ratio, cross=cross, context_dim=context_dim, rel_pos_grid=rel_pos_grid,
                           backend=backend, post_norm=post_norm, eps=eps, act=act, causal=causal)
              for _ in range(depth)]
    return TransformerStack(layers, dim, final_norm=final_norm, checkpoint=checkpoint, eps=eps)


def decoder(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, *, cross: bool = False,
            context_dim: int | None = None, rel_pos_grid: tuple[int, int] | None = None, final_norm: bool = True,
            checkpoint: bool = False, backend: str | None = None, eps: float = LN_EPS,
            **layer_switches) -> TransformerStack:
    """A stack of causal :class:`DecoderLayer` (with cross-attention when ``cross``; passing ``prefix_lens``
    turns the causal mask into a PrefixLM mask). ``layer_switches``: self_mlp, context_norm."""
    layers = [DecoderLayer(dim, heads, mlp_ratio, cross=cross, context_dim=context_dim, rel_pos_grid=rel_pos_grid,
                           backend=backend, eps=eps, **layer_switches) for _ in range(depth)]
    return TransformerStack(layers, dim, final_norm=final_norm, eps=eps, checkpoint=checkpoint)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Transformer initialisation: N(0, std) for linear/embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
