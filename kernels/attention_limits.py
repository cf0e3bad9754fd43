"""What the Triton attention kernels accept, importable without triton (used by dispatch's refusal reasons)."""

# head dims are padded to the next power of two (>= 16) with masked loads; 128 is the register budget's limit
SUPPORTED_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)
