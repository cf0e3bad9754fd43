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
    with pytest.raises(ValueError, match=r"`rel_pos_start` \+ gh\*gw must be <= the sequence length max\(Nq, Nk\) "
                                         r"= 5 .*got rel_pos_start=9, rel_pos_grid=\(2, 2\): 9 \+ 4 = 13"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(9, 2), rel_pos_grid=(2, 2), rel_pos_start=9)
    with pytest.raises(ValueError, match=r"`rel_pos_grid` must be \(gh, gw\) with gh, gw >= 1; got \(0, 2\)"):
        vlcore.attention(q, k, v, rel_pos_table=torch.randn(9, 2), rel_pos_grid=(0, 2))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_head_dim_is_named(backend):
    q = torch.randn(2, 5, 2, 0)
    with pytest.raises(ValueError, match=r"`q` must have head dim D >= 1; got shape \(2, 5, 2, 0\)"):
        vlcore.attention(q, q, q, backend=backend)


@pytest.mark.parametrize("grid,start,nq,nk,match", [
    ((2, 2), -1, 5, 5, r"`rel_pos_start` must be an int >= 0; got -1"),
    ((2, -3), 0, 5, 5, r"`rel_pos_grid` must be \(gh, gw\) with gh, gw >= 1; got \(2, -3\)"),
    ((2, 2, 1), 0, 5, 5, r"`rel_pos_grid` must be \(gh, gw\), two ints; got \(2, 2, 1\)"),
    ((2, 2.5), 0, 5, 5, r"`rel_pos_grid` must be \(gh, gw\), two ints"),
    ((3, 3), 0, 5, 5, r"max\(Nq, Nk\) = 5 .*rel_pos_start=0, rel_pos_grid=\(3, 3\): 0 \+ 9 = 9"),  # grid > sequence
    ((2, 2), 2, 5, 5, r"max\(Nq, Nk\) = 5 .*2 \+ 4 = 6"),  # start + grid one past the end
    ((2, 2), 4, 3, 7, r"max\(Nq, Nk\) = 7 .*4 \+ 4 = 8"),  # cross-attention: the longer side counts
], ids=["start<0", "grid<1", "three-dims", "float", "grid>seq", "past-end", "cross"])
def test_rel_pos_grid_must_fit_the_sequence(grid, start, nq, nk, match):
    q, k = torch.randn(2, nq, 2, 8), torch.randn(2, nk, 2, 8)
    rows = 9 if len(grid) != 2 or grid[1] != 3 else 25
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=match):
            vlcore.attention(q, k, k, rel_pos_table=torch.randn(rows, 2), rel_pos_grid=grid, rel_pos_start=start,
                             backend=backend)


def test_rel_pos_grid_may_end_at_the_sequence_end():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 7, 2, 8)
    table = torch.randn(9, 2)
    assert vlcore.attention(q, k, k, rel_pos_table=table, rel_pos_grid=(2, 2), rel_pos_start=3).shape == q.shape


def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty(2, device="meta", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"`kv_lens` is on meta but `q` is on cpu"):
        vlcore.attention(q, k, v, kv_lens=meta)
