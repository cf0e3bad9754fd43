"""Bad inputs to vlcore.attention raise errors that name the argument, the expected and the actual value."""

import pytest
import torch

import vlcore


def qkv(b=2, n=5, h=2, d=8, dtype=torch.float32):
    return [torch.randn(b, n, h, d, dtype=dtype) for _ in range(3)]


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"`q` must have 4 dims \(B, N, H, D\); got shape \(5, 2, 8\)"):
        vlcore.attention(q[0], k, v)


def test_head_mismatch_names_both_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"`q` must have shape \(2, \*, 2, 8\).*got shape \(2, 5, 2, 16\)"):
        vlcore.attention(torch.randn(2, 5, 2, 16), k, v)


def test_v_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"`v` must have shape \(2, 5, 2, \*\)"):
        vlcore.attention(q, k, v[:, :4])


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"`q` must have batch 2 \(as k\) or 1"):
        vlcore.attention(torch.randn(3, 5, 2, 8), k, v)


def test_dtype_mismatch_and_integer_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"`k` must have the dtype of `q` \(float32\); got .*float16"):
        vlcore.attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"`q` must have dtype in"):
        vlcore.attention(q.long(), k, v)


def test_last_dim_not_contiguous():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"`k` must be contiguous in its last dim"):
        vlcore.attention(q, k.transpose(1, 3).contiguous().transpose(1, 3), v)


def test_length_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"`prefix_lens` must have dtype in \(int32, int64\)"):
        vlcore.attention(q, k, v, prefix_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`kv_lens` must have shape \(2\)"):
        vlcore.attention(q, k, v, kv_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"`kv_lens` values must lie in \[0, 5\]; got min -1, max 2"):
        vlcore.attention(q, k, v, kv_lens=torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match=r"`prefix_lens` must be a torch.Tensor, got list"):
        vlcore.attention(q, k, v, prefix_lens=[1, 2])


def test_rel_pos_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="go together"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(9, 2))
    with pytest.raises(ValueError, match=r"`rel_pos_table` must have shape \(9, 2\).*rel_pos_grid=\(2, 2\)"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(10, 2), rel_pos_grid=(2, 2))
    with pytest.raises(ValueError, match=r"`rel_pos_start` must lie in \[0, 5\]; got 9"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(9, 2), rel_pos_grid=(2, 2), rel_pos_start=9)
    with pytest.raises(ValueError, match="positive ints"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(9, 2), rel_pos_grid=(0, 2))


def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty(2, device="meta", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"`kv_lens` is on meta but `q` is on cpu"):
        vlcore.attention(q, k, v, kv_lens=meta)
