"""What the Triton attention kernels accept, importable without triton (used by dispatch's refusal reasons)."""

# Every multiple of 8 up to 256 (as FlashAttention-2): the kernels pad the head dim to the next power of two
# (>= 16) with masked loads; head dims above 128 get tile configs with fewer rows/keys (see kernels/attention.py).
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
SUPPORTED_HEAD_DIMS = tuple(range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))


def head_dim_refusal(dim: int) -> str | None:
    """Why the Triton kernels refuse head dim ``dim`` (None when they accept it)."""
    if dim in SUPPORTED_HEAD_DIMS:
        return None
    return f"head dim {dim} not supported (supported: multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM})"
