"""``vlcore.attention``: validation, backend dispatch, ``torch.library`` registration and autograd.

Semantics: docs/design.md §1 and :mod:`vlcore.reference.attention`. Backends implement

    forward(q, k, v, causal, prefix_lens, kv_lens, table, grid, start, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, table, grid, start, scale)
        -> (dq, dk, dv, dtable or None)

with q of batch 1 meaning one query set shared by the batch (its gradient is reduced over the batch).
Outputs and gradients are contiguous tensors (the fake implementations promise that layout).
The reference backend runs straight under autograd (cheapest on CPU); the compiled backends run through the
registered op ``vlcore::attention``, which ``torch.compile(fullgraph=True)`` traces through its fake.
"""

from __future__ import annotations

import operator

import torch

from vlcore import _validate as V
from vlcore import dispatch
from vlcore.cpu import attention as cpu_attention
from vlcore.reference import attention as ref

OP = "attention"
_NAME = "vlcore.attention"


class _ReferenceBackend:
    @staticmethod
    def forward(q, k, v, causal, prefix_lens, kv_lens, table, grid, start, scale):
        out, lse = ref.attention_with_lse(q, k, v, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens,
                                          rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=start, scale=scale)
        return out.contiguous(), lse.contiguous()

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, table, grid, start, scale):
        grads = ref.attention_backward(dout, q, k, v, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens,
                                       rel_pos_table=table, rel_pos_grid=grid, rel_pos_start=start, scale=scale)
        return tuple(None if g is None else g.contiguous() for g in grads)


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.REFERENCE, devices=("cpu", "cuda"), dtypes=V.FLOAT_DTYPES, priority=0,
    load=_ReferenceBackend, description="PyTorch, materialises (B, H, Nq, Nk) scores",
))


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.CPU, devices=("cpu",), dtypes=cpu_attention.DTYPES, priority=5, load=lambda: cpu_attention,
    description="torch SDPA CPU kernels (flash where maskless), mask/bias built once per call, autograd",
))


def _load_triton():
    from vlcore.kernels import attention as kernels

    return kernels


def _triton_supports(problem: dispatch.Problem) -> list[str]:
    from vlcore.kernels.attention_limits import head_dim_refusal

    refusal = head_dim_refusal(problem["head_dim"])
    return [refusal] if refusal else []


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.TRITON, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=10, load=_load_triton, requires=dispatch.triton_missing, supports=_triton_supports,
    interpreter_cpu=True, description="Triton flash attention: masks as parameters, tile skipping, fused rel-pos bias",
))


# ---- registered op -------------------------------------------------------------------------------------

@torch.library.custom_op("vlcore::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, prefix_lens: torch.Tensor | None,
                  kv_lens: torch.Tensor | None, rel_pos_table: torch.Tensor | None, rel_pos_grid: list[int] | None,
                  rel_pos_start: int, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid = tuple(rel_pos_grid) if rel_pos_grid is not None else None
    out, lse = dispatch.get(OP, backend).impl().forward(q, k, v, causal, prefix_lens, kv_lens, rel_pos_table, grid,
                                                          rel_pos_start, scale)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, causal, prefix_lens, kv_lens, rel_pos_table, rel_pos_grid, rel_pos_start, scale, backend):
    batch, _, heads, dim = k.shape
    out = q.new_empty(batch, q.shape[1], heads, v.shape[-1])
    lse = q.new_empty(batch, heads, q.shape[1], dtype=ref.compute_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("vlcore::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, causal: bool, prefix_lens: torch.Tensor | None,
                           kv_lens: torch.Tensor | None, rel_pos_table: torch.Tensor | None,
                           rel_pos_grid: list[int] | None, rel_pos_start: int, scale: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grid = tuple(rel_pos_grid) if rel_pos_grid is not None else None
    dq, dk, dv, dtable = dispatch.get(OP, backend).impl().backward(
        dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, rel_pos_table, grid, rel_pos_start, scale)
    if dtable is None:  # custom ops return tensors: an empty one stands for "no table"
        dtable = q.new_empty(0)
    return dq, dk, dv, dtable


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, causal, prefix_lens, kv_lens, rel_pos_table, rel_pos_grid, rel_pos_start, scale,
      backend):
    # backends return contiguous gradients (whatever the input strides)
    dtable = rel_pos_table.new_empty(rel_pos_table.shape) if rel_pos_table is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, causal, prefix_lens, kv_lens, table, grid, start, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, prefix_lens, kv_lens, table)
    ctx.args = (causal, grid, start, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, prefix_lens, kv_lens, table = ctx.saved_tensors
    causal, grid, start, scale, backend = ctx.args
    dq, dk, dv, dtable = _attention_backward_op(dout.contiguous(), q, k, v, out, lse, causal, prefix_lens, kv_lens,
                                                table, grid, start, scale, backend)
    return dq, dk, dv, None, None, None, (dtable if table is not None else None), None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function -----------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              prefix_lens: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
              rel_pos_table: torch.Tensor | None = None, rel_pos_grid: tuple[int, int] | None = None,
              rel_pos_start: int = 0, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Fused multi-head attention with PrefixLM/causal/padding masks and a 2-D relative position table.

    Args:
        q: (B, Nq, H, D) queries; batch size 1 or batch stride 0 = one query set shared by the batch.
        k, v: (B, Nk, H, D) keys and values. Any strides with a contiguous last dim.
        causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned).
        prefix_lens: int tensor [B]; query i sees key j iff j < prefix_lens[b] or j <= i + (Nk - Nq).
        kv_lens: int tensor [B]; keys j >= kv_lens[b] are padding. Rows with no visible key output 0.
        rel_pos_table: ((2gh-1)(2gw-1), H) learnable table (Swin/timm layout) for the grid of tokens
            [rel_pos_start, rel_pos_start + gh*gw) given by ``rel_pos_grid=(gh, gw)``.
        scale: score multiplier, default 1/sqrt(D).
        backend: ``reference`` | ``cpu`` | ``triton`` | ``cuda`` (default: automatic, see :mod:`vlcore.dispatch`).

    Returns:
        (B, Nq, H, D) in q's dtype.
    """
    q, k, v = _check(q, k, v, prefix_lens, kv_lens, rel_pos_table, rel_pos_grid, rel_pos_start)
    batch, nk, heads, dim = k.shape
    scale = float(dim ** -0.5 if scale is None else scale)
    grid = None if rel_pos_grid is None else (int(rel_pos_grid[0]), int(rel_pos_grid[1]))
    problem = dispatch.Problem(k.device, q.dtype, {
        "head_dim": dim, "nq": q.shape[1], "nk": nk, "shared_q": q.shape[0] != batch, "causal": causal,
        "prefix": prefix_lens is not None, "padding": kv_lens is not None, "rel_pos": rel_pos_table is not None,
    })
    chosen = dispatch.choose(OP, problem, backend)
    if chosen.name in (dispatch.REFERENCE, dispatch.CPU):  # differentiated by autograd, not by the registered op
        plain = ref if chosen.name == dispatch.REFERENCE else cpu_attention
        return plain.attention(q, k, v, causal=causal, prefix_lens=prefix_lens, kv_lens=kv_lens,
                               rel_pos_table=rel_pos_table, rel_pos_grid=grid, rel_pos_start=rel_pos_start, scale=scale)
    out, _ = _attention_op(q, k, v, causal, prefix_lens, kv_lens, rel_pos_table, None if grid is None else list(grid),
                           int(rel_pos_start), scale, chosen.name)
    return out


def _check(q, k, v, prefix_lens, kv_lens, table, grid, start):
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.tensor(_NAME, name, t, ndim=4, dtypes=V.FLOAT_DTYPES, layout="(B, N, H, D)")
    batch, nk, heads, dim = k.shape
    V.shape(_NAME, "v", v, (batch, nk, heads, None), "(B, Nk, H, Dv) matching k")
    if q.shape[0] not in (1, batch) and q.stride(0) != 0:
        raise ValueError(f"{_NAME}: `q` must have batch {batch} (as k) or 1 (queries shared by the batch); "
                         f"got {V.describe(q)}")
    V.shape(_NAME, "q", q, (q.shape[0], None, heads, dim), "(B or 1, Nq, H, D) with H and D of k")
    if dim < 1:  # the default scale is 1/sqrt(D)
        raise ValueError(f"{_NAME}: `q` must have head dim D >= 1; got {V.describe(q)}")
    if v.shape[-1] != dim:
        raise ValueError(f"{_NAME}: `v` must have head dim {dim} (as q and k); got {V.describe(v)}")
    V.same_dtype(_NAME, "q", q, k=k, v=v)
    V.lengths(_NAME, "prefix_lens", prefix_lens, batch, nk, k.device)
    V.lengths(_NAME, "kv_lens", kv_lens, batch, nk, k.device)
    V.same_device(_NAME, "q", q, k=k, v=v, prefix_lens=prefix_lens, kv_lens=kv_lens, rel_pos_table=table)
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.last_dim_contiguous(_NAME, name, t)
    if q.shape[0] == batch and batch > 1 and q.stride(0) == 0:
        q = q[:1]  # an expanded query set: run it as the shared-query case (gradient reduced over the batch)
    if (table is None) != (grid is None):
        raise ValueError(f"{_NAME}: `rel_pos_table` and `rel_pos_grid` go together; got "
                         f"rel_pos_table={'None' if table is None else V.describe(table)}, rel_pos_grid={grid}")
    if table is not None:
        _check_rel_pos(table, grid, start, heads, max(q.shape[1], nk))
    return q, k, v


def _check_rel_pos(table, grid, start, heads, seq):
    """The grid of tokens [start, start + gh·gw) must lie inside the sequence it indexes (``seq`` = max(Nq, Nk))
    and the table must hold one row per relative offset."""
    try:
        gh, gw = (operator.index(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{_NAME}: `rel_pos_grid` must be (gh, gw), two ints; got {grid!r}") from None
    if min(gh, gw) < 1:
        raise ValueError(f"{_NAME}: `rel_pos_grid` must be (gh, gw) with gh, gw >= 1; got {grid}")
    V.tensor(_NAME, "rel_pos_table", table, ndim=2, dtypes=V.FLOAT_DTYPES, layout="((2gh-1)(2gw-1), H)")
    V.shape(_NAME, "rel_pos_table", table, ((2 * gh - 1) * (2 * gw - 1), heads),
            f"((2gh-1)(2gw-1), H) for rel_pos_grid=({gh}, {gw}) and H={heads}")
    try:
        start = operator.index(start)
    except TypeError:
        raise ValueError(f"{_NAME}: `rel_pos_start` must be an int >= 0; got {start!r}") from None
    if start < 0:
        raise ValueError(f"{_NAME}: `rel_pos_start` must be an int >= 0; got {start!r}")
    if start + gh * gw > seq:
        raise ValueError(f"{_NAME}: `rel_pos_start` + gh*gw must be <= the sequence length max(Nq, Nk) = {seq} "
                         f"(the grid's tokens must exist); got rel_pos_start={start}, rel_pos_grid=({gh}, {gw}): "
                         f"{start} + {gh * gw} = {start + gh * gw}")
