"""``vlcore.contrastive_loss``: validation, distribution over ranks, backend dispatch, ``torch.library`` + autograd.

Semantics: docs/design.md §3 and :mod:`vlcore.reference.contrastive`. The loss is assembled from one op over
*local rows × gathered columns* (see the reference's docstring); backends implement

    forward(x, y, scale, bias, offset, kind) -> (rows (b,) fp32/fp64, lse ((b,) for infonce, (0,) for siglip))
    backward(drow, x, y, scale, bias, lse, offset, kind) -> (dx, dy (all B columns), dscale (0-dim), dbias or None)

The reference backend runs straight under autograd (cheapest on CPU); the compiled backends run through the
registered op ``vlcore::contrastive_rows``, which ``torch.compile(fullgraph=True)`` traces through its fake.
Single-process InfoNCE uses ``vlcore::contrastive_infonce_pair`` (both directions; a backend may implement
``pair_backward(d_img, d_txt, img, txt, scale, lse_img, lse_txt) -> (d_img, d_txt, dscale)`` to serve both
from one logits tile).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlcore import _ext, dispatch
from vlcore import _validate as V
from vlcore import distributed as vdist
from vlcore.cpu import contrastive as cpu_contrastive
from vlcore.kernels._launch import launch_context
from vlcore.reference import contrastive as ref

OP = "contrastive_loss"
_NAME = "vlcore.contrastive_loss"


class _ReferenceBackend:
    @staticmethod
    def forward(x, y, scale, bias, offset, kind):
        return ref.row_losses(x, y, scale, bias, offset=offset, kind=kind)

    @staticmethod
    def backward(drow, x, y, scale, bias, lse, offset, kind):
        return ref.row_losses_backward(drow, x, y, scale, bias, offset=offset, kind=kind)


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.REFERENCE, devices=("cpu", "cuda"), dtypes=V.FLOAT_DTYPES, priority=0,
    load=_ReferenceBackend, description="PyTorch, materialises the (b, B) logits",
))


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.CPU, devices=("cpu",), dtypes=V.FLOAT_DTYPES, priority=5,
    load=lambda: cpu_contrastive.CpuContrastive,
    description="column chunks with an online log-sum-exp (memory linear in the batch), chunked exact backward",
))


class _TritonBackend:
    @staticmethod
    def forward(x, y, scale, bias, offset, kind):
        from vlcore.kernels import contrastive as kernels

        return kernels.contrastive_fwd(x, y, scale, bias, offset, kind)

    @staticmethod
    def backward(drow, x, y, scale, bias, lse, offset, kind):
        from vlcore.kernels import contrastive as kernels

        return kernels.contrastive_bwd(drow, x, y, scale, bias, lse, offset, kind)

    @staticmethod
    def pair_backward(d_img, d_txt, img, txt, scale, lse_img, lse_txt):
        from vlcore.kernels import contrastive as kernels

        return kernels.infonce_pair_bwd(d_img, d_txt, img, txt, scale, lse_img, lse_txt)


dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.TRITON, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=20, load=_TritonBackend, requires=dispatch.triton_missing, interpreter_cpu=True,
    description="Triton tiles (local rows x gathered columns), online log-sum-exp, no b x B buffer",
))


class _CudaBackend:
    """csrc/contrastive.cu through vlcore._C: raw pointers, strides, dtype code and the current stream.

    A portable fallback for machines where Triton is unavailable, not the fast path: 32 x 32 shared-memory tiles
    with fp32 FMAs (no tensor cores), not benchmarked on a GPU yet; ranked below triton."""

    @staticmethod
    def _scalars(scale, bias):
        s32 = scale.detach().reshape(()).float().contiguous()  # fp32 device scalars, read by the kernels
        if bias is None:  # InfoNCE never reads it; SigLIP without a bias means bias 0
            return s32, torch.zeros_like(s32)
        return s32, bias.detach().reshape(()).float().contiguous()

    @staticmethod
    def forward(x, y, scale, bias, offset, kind):
        siglip = kind == "siglip"
        rows = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        lse = torch.empty(0 if siglip else x.shape[0], dtype=torch.float32, device=x.device)
        s32, b32 = _CudaBackend._scalars(scale, bias)
        with launch_context("contrastive.fwd[cuda]", x):  # the kernels launch on the current device
            _ext.extension().contrastive_fwd(
                x.data_ptr(), y.data_ptr(), s32.data_ptr(), b32.data_ptr(), rows.data_ptr(),
                (rows if siglip else lse).data_ptr(), x.shape[0], y.shape[0], x.shape[1], int(offset), x.stride(0),
                x.stride(1), y.stride(0), y.stride(1), _ext.dtype_code(x), siglip, _ext.stream_handle(x.device))
        return rows, lse

    @staticmethod
    def backward(drow, x, y, scale, bias, lse, offset, kind):
        siglip = kind == "siglip"
        drow = drow.float().contiguous()
        dx, dy = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
            y, memory_format=torch.contiguous_format)
        row_blocks = -(-x.shape[0] // _CUDA_ROW_TILE)
        partial = torch.empty(2 * row_blocks, dtype=torch.float32, device=x.device)
        s32, b32 = _CudaBackend._scalars(scale, bias)
        with launch_context("contrastive.bwd[cuda]", x):
            _ext.extension().contrastive_bwd(
                drow.data_ptr(), x.data_ptr(), y.data_ptr(), s32.data_ptr(), b32.data_ptr(),
                (drow if siglip else lse).data_ptr(), dx.data_ptr(), dy.data_ptr(), partial.data_ptr(), x.shape[0],
                y.shape[0], x.shape[1], int(offset), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                dx.stride(0), dy.stride(0), _ext.dtype_code(x), siglip, _ext.stream_handle(x.device))
        sums = partial.view(2, row_blocks).sum(dim=1)  # fixed-order reduction of the per-block partials
        return dx, dy, sums[0], (sums[1] if siglip and bias is not None else None)


_CUDA_ROW_TILE = 32  # kTile in csrc/contrastive.cu

# Priority below triton until a GPU benchmark (benchmarks/bench_contrastive.py) says otherwise: the CUDA kernels
# use fp32 FMA tiles (no tensor cores), so the Triton kernels are expected to be faster on fp16/bf16 inputs.
dispatch.register(dispatch.Backend(
    op=OP, name=dispatch.CUDA, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=10, load=_CudaBackend, requires=lambda: dispatch.cuda_ext_missing("contrastive_fwd"),
    description="csrc/contrastive.cu, portable fallback: 32x32 shared-memory tiles, fp32 FMA math, no b x B buffer",
))


# ---- registered op -------------------------------------------------------------------------------------

@torch.library.custom_op("vlcore::contrastive_rows", mutates_args=())
def _rows_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, offset: int,
             kind: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, lse = dispatch.get(OP, backend).impl().forward(x, y, scale, bias, offset, kind)
    return rows, lse


@_rows_op.register_fake
def _(x, y, scale, bias, offset, kind, backend):
    acc = ref.compute_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0] if kind == "infonce" else 0, dtype=acc)


@torch.library.custom_op("vlcore::contrastive_rows_backward", mutates_args=())
def _rows_backward_op(drow: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, lse: torch.Tensor, offset: int, kind: str,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy, dscale, dbias = dispatch.get(OP, backend).impl().backward(drow, x, y, scale, bias, lse, offset, kind)
    # fresh tensors (backends may return views of one partial-sum buffer; op outputs must not alias)
    dscale = dscale.to(scale.dtype).reshape(scale.shape).clone()
    # custom ops return tensors: an empty one stands for "no bias"
    dbias = scale.new_empty(0) if bias is None else dbias.to(bias.dtype).reshape(bias.shape).clone()
    return dx, dy, dscale, dbias


@_rows_backward_op.register_fake
def _(drow, x, y, scale, bias, lse, offset, kind, backend):
    dbias = scale.new_empty(0) if bias is None else torch.empty_like(bias)
    # the backends return dense (contiguous) gradients whatever the inputs' strides
    return x.new_empty(x.shape), y.new_empty(y.shape), torch.empty_like(scale), dbias


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, offset, kind, backend = inputs
    _, lse = output
    ctx.save_for_backward(x, y, scale, bias, lse)
    ctx.args = (offset, kind, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, drow, _dlse):
    x, y, scale, bias, lse = ctx.saved_tensors
    offset, kind, backend = ctx.args
    dx, dy, dscale, dbias = _rows_backward_op(drow.contiguous(), x, y, scale, bias, lse, offset, kind, backend)
    return dx, dy, dscale, (dbias if bias is not None else None), None, None, None


_rows_op.register_autograd(_backward, setup_context=_setup_context)


# ---- single-process InfoNCE: both directions as one registered op -------------------------------------
# Without ranks, the text->image logits are the transpose of the image->text ones, so a backend's
# ``pair_backward`` can serve both directions from one logits tile (half the backward work). Backends without
# it run the row op's backward once per direction.

@torch.library.custom_op("vlcore::contrastive_infonce_pair", mutates_args=())
def _pair_op(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = dispatch.get(OP, backend).impl()
    r_img, lse_img = impl.forward(image, text, scale, None, 0, "infonce")
    r_txt, lse_txt = impl.forward(text, image, scale, None, 0, "infonce")
    return r_img, lse_img, r_txt, lse_txt


@_pair_op.register_fake
def _(image, text, scale, backend):
    acc = ref.compute_dtype(image.dtype)
    return tuple(image.new_empty(image.shape[0], dtype=acc) for _ in range(4))


@torch.library.custom_op("vlcore::contrastive_infonce_pair_backward", mutates_args=())
def _pair_backward_op(d_img: torch.Tensor, d_txt: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                      scale: torch.Tensor, lse_img: torch.Tensor, lse_txt: torch.Tensor,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = dispatch.get(OP, backend).impl()
    if hasattr(impl, "pair_backward"):
        g_img, g_txt, dscale = impl.pair_backward(d_img, d_txt, image, text, scale, lse_img, lse_txt)
    else:
        dx1, dy1, ds1, _ = impl.backward(d_img, image, text, scale, None, lse_img, 0, "infonce")
        dx2, dy2, ds2, _ = impl.backward(d_txt, text, image, scale, None, lse_txt, 0, "infonce")
        g_img, g_txt, dscale = dx1 + dy2, dy1 + dx2, ds1 + ds2
    return g_img, g_txt, dscale.to(scale.dtype).reshape(scale.shape).clone()


@_pair_backward_op.register_fake
def _(d_img, d_txt, image, text, scale, lse_img, lse_txt, backend):
    return image.new_empty(image.shape), text.new_empty(text.shape), torch.empty_like(scale)


def _pair_setup_context(ctx, inputs, output):
    image, text, scale, backend = inputs
    _, lse_img, _, lse_txt = output
    ctx.save_for_backward(image, text, scale, lse_img, lse_txt)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse_img, lse_txt)


def _pair_backward(ctx, d_img, _dl1, d_txt, _dl2):
    image, text, scale, lse_img, lse_txt = ctx.saved_tensors
    d_img = torch.zeros_like(lse_img) if d_img is None else d_img.contiguous()
    d_txt = torch.zeros_like(lse_txt) if d_txt is None else d_txt.contiguous()
    g_img, g_txt, dscale = _pair_backward_op(d_img, d_txt, image, text, scale, lse_img, lse_txt, ctx.backend)
    return g_img, g_txt, dscale, None


_pair_op.register_autograd(_pair_backward, setup_context=_pair_setup_context)


class _GlobalLoss(torch.autograd.Function):
    """Value: Σ_r share_r over the group (the global loss, the same on every rank).
    Gradient: W × upstream to the local share, so that DDP's averaging over W ranks yields dL/dθ."""

    @staticmethod
    def forward(ctx, share, group, world):
        total = share.detach().clone()
        dist.all_reduce(total, group=group)
        ctx.world = world
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


# ---- public function -----------------------------------------------------------------------------------

def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, *, kind: str = "infonce",
                     logit_bias=None, group=None, backend: str | None = None) -> torch.Tensor:
    """Contrastive loss of CLIP/ALIGN (``kind="infonce"``) or SigLIP (``kind="siglip"``) over the global batch.

    Args:
        image_emb, text_emb: (b, D) local batch (row i of each is a positive pair), same dtype (fp16, bf16, fp32,
            fp64) and device; already normalised if the model normalises. Last dim contiguous.
        logit_scale: the logit multiplier s (exp of the learnable log-temperature, as open_clip passes it): a
            float or a tensor with one element; a tensor receives a gradient.
        kind: ``"infonce"``: mean of the image→text and text→image cross-entropies over the B global rows with
            the diagonal as positives. ``"siglip"``: −(1/B)·Σ_ij log σ(z_ij·(s·x_i·y_j + logit_bias)), z = +1 on
            the diagonal and −1 elsewhere.
        logit_bias: SigLIP's learnable bias (required for siglip, rejected for infonce where it cancels): a float
            or a one-element tensor.
        group: a ``torch.distributed`` process group (default: the default group when initialised, else none).
        backend: ``reference`` | ``cpu`` | ``triton`` | ``cuda`` (default: automatic, see :mod:`vlcore.dispatch`).

    Returns:
        0-dim loss in float32 (float64 for float64 inputs).

    Distributed semantics (W ranks of ``group``, local batches b_r that may differ, B = Σ_r b_r): the features
    are all-gathered once; each rank computes its own rows of both directions, its share L_r of the global loss
    L (L = Σ_r L_r is the single-process loss on the concatenated batch, rank order). The returned **value** is
    L on every rank. Its **gradient** is that of W·L_r: the backward of the gather sums every rank's gradient
    of a rank's features onto that rank (a reduce-scatter), so rank r's embeddings receive W·∂L/∂x_r, and
    logit_scale/logit_bias receive W·∂L_r/∂s. DDP averages parameter gradients over the W ranks, which gives
    exactly ∂L/∂θ — the single-process global-batch gradient — for every parameter, unequal b_r included.
    (Without DDP's averaging, e.g. a plain all_reduce sum of gradients, divide by W.) A rank may hold b_r = 0.

    Bad inputs raise ``TypeError``/``ValueError`` naming the argument; ranks that disagree on D or dtype all
    raise ``ValueError`` (no hang). A NaN in the embeddings, scale or bias gives a NaN loss (never a finite
    value); values are not inspected on the host (no device sync), so Inf inputs are not rejected.
    Never materialises b×B logits on the compiled backends.
    """
    rank, world, is_dist = vdist.world_info(group)
    distributed = is_dist and world > 1
    scale, bias = _check(image_emb, text_emb, logit_scale, kind, logit_bias, allow_empty=distributed)
    local, dim = image_emb.shape
    problem = dispatch.Problem(image_emb.device, image_emb.dtype, {"dim": dim, "kind": kind})
    chosen = dispatch.choose(OP, problem, backend)
    if distributed:
        both, sizes = vdist.all_gather_with_sizes(torch.cat([image_emb, text_emb], dim=1), group)
        image_all, text_all = both[:, :dim], both[:, dim:]
        offset, total = sum(sizes[:rank]), sum(sizes)
        if total == 0:
            raise ValueError(f"{_NAME}: the global batch is empty (every rank passed 0 rows)")
    else:
        image_all, text_all, offset, total = image_emb, text_emb, 0, local
    if kind == "infonce" and not distributed and chosen.name != dispatch.REFERENCE:
        r_img, _, r_txt, _ = _pair_op(image_emb, text_emb, scale, chosen.name)
        share = (r_img.sum() + r_txt.sum()) / (2 * total)
    elif kind == "infonce":
        share = (_rows(image_emb, text_all, scale, None, offset, kind, chosen).sum()
                 + _rows(text_emb, image_all, scale, None, offset, kind, chosen).sum()) / (2 * total)
    else:
        share = _rows(image_emb, text_all, scale, bias, offset, kind, chosen).sum() / total
    if distributed:
        return _GlobalLoss.apply(share, group, world)
    return share


def _rows(x, y, scale, bias, offset, kind, chosen):
    if chosen.name == dispatch.REFERENCE or x.shape[0] == 0:  # an empty local batch needs no kernel
        return ref.row_losses(x, y, scale, bias, offset=offset, kind=kind)[0]
    return _rows_op(x, y, scale, bias, int(offset), kind, chosen.name)[0]


def _scalar(name: str, value, ref_t: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on ref_t's device (a view of a one-element tensor, so it keeps its gradient)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{_NAME}: `{name}` must be a float or a one-element tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=ref.compute_dtype(ref_t.dtype), device=ref_t.device)
    if value.numel() != 1:
        raise ValueError(f"{_NAME}: `{name}` must have exactly one element (a scalar); got {V.describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{_NAME}: `{name}` must be a floating-point tensor; got {V.describe(value)}")
    V.same_device(_NAME, "image_emb", ref_t, **{name: value})
    return value.reshape(())


def _check(image, text, logit_scale, kind, logit_bias, *, allow_empty: bool):
    for name, t in (("image_emb", image), ("text_emb", text)):
        V.tensor(_NAME, name, t, ndim=2, dtypes=V.FLOAT_DTYPES, layout="(b, D)")
        # each tensor is checked on its own, so the message names the one that is wrong
        if t.shape[1] == 0:
            raise ValueError(f"{_NAME}: `{name}` must have shape (b, D) with D >= 1; got D = 0 ({V.describe(t)})")
        if t.shape[0] == 0 and not allow_empty:
            raise ValueError(f"{_NAME}: `{name}` must have shape (b, D) with b >= 1 rows outside a distributed "
                             f"group; got an empty batch, b = 0 ({V.describe(t)})")
    if kind not in ref.KINDS:
        raise ValueError(f"{_NAME}: `kind` must be one of {ref.KINDS}; got {kind!r}")
    V.shape(_NAME, "text_emb", text, tuple(image.shape), "(b, D) matching image_emb")
    V.same_dtype(_NAME, "image_emb", image, text_emb=text)
    V.same_device(_NAME, "image_emb", image, text_emb=text)
    for name, t in (("image_emb", image), ("text_emb", text)):
        V.last_dim_contiguous(_NAME, name, t)
    scale = _scalar("logit_scale", logit_scale, image)
    if kind == "siglip" and logit_bias is None:
        raise ValueError(f"{_NAME}: kind='siglip' needs `logit_bias` (SigLIP initialises it to -10)")
    if kind == "infonce" and logit_bias is not None:
        raise ValueError(f"{_NAME}: `logit_bias` is only used by kind='siglip' (it cancels in InfoNCE); got one "
                         "with kind='infonce'")
    bias = None if logit_bias is None else _scalar("logit_bias", logit_bias, image)
    return scale, bias
