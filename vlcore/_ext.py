"""Loading the optional CUDA extension ``vlcore._C`` — importing vlcore never fails because it is missing.

The extension's kernels take raw device pointers, sizes, strides, a dtype code and the stream handle; the
helpers here turn tensors into those arguments.
"""

from __future__ import annotations

import functools

import torch

# Codes shared with csrc/vlcore_cuda.h (enum DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
}


@functools.cache
def load() -> tuple[object | None, str | None]:
    """(module, None) when ``vlcore._C`` imports, else (None, why not)."""
    try:
        from vlcore import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"vlcore._C is not built (pure-Python install: {e})"
    return _C, None


def extension():
    """The loaded extension, or raise with the reason it is not there."""
    mod, why = load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream
