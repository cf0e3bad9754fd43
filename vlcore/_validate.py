"""Input checks shared by the ops: errors name the op, the argument, what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def tensor(op: str, name: str, value, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
           layout: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dims{' ' + layout if layout else ''}; got {describe(value)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: `{name}` must have dtype in ({names}); got {describe(value)}")
    return value


def shape(op: str, name: str, value: torch.Tensor, expected: Sequence[int | None], layout: str = "") -> None:
    """``expected`` may hold None for a free dimension."""
    ok = value.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, value.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        lay = f" {layout}" if layout else ""
        raise ValueError(f"{op}: `{name}` must have shape {want}{lay}; got {describe(value)}")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                             f"move them to one device ({name}: {describe(t)})")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: `{name}` must have the dtype of `{ref_name}` "
                            f"({str(ref.dtype).replace('torch.', '')}); got {describe(t)}")


def last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: `{name}` must be contiguous in its last dim (stride 1); got strides "
                         f"{tuple(t.stride())} with {describe(t)}. Use .contiguous() or a layout whose last dim is dense.")


def lengths(op: str, name: str, value, batch: int, upper: int, device: torch.device,
            ref_name: str = "q") -> torch.Tensor | None:
    """A per-sample length tensor [B] of ints in [0, upper] (checked on the host only for CPU tensors)."""
    if value is None:
        return None
    t = tensor(op, name, value, ndim=1, dtypes=INDEX_DTYPES, layout="(B,)")
    shape(op, name, t, (batch,), "(B,)")
    if t.device != device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {device}")
    # Range check without a device sync on GPU: a CUDA check would stall the stream every call.
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > upper:
            raise ValueError(f"{op}: `{name}` values must lie in [0, {upper}]; got min {lo}, max {hi}")
    return t
