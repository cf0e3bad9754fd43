"""Property tests: every op rejects a randomly broken input with ValueError/TypeError whose message names the
argument (as `name`), before any kernel runs: wrong rank, shape, dtype, device (meta), type, strides, negative or
too large lengths, bad tables, grids and starts, bad scalars and options.

Each test draws a valid problem of random size, breaks one argument in one random way and checks the error.
Cases with their own strategy (a grid past the sequence, D = 0, empty embeddings) are separate tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_property

import vlcore

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install vlcore[dev])")
from hypothesis import strategies as st  # noqa: E402

ERRORS = (ValueError, TypeError)
NOT_TENSORS = st.sampled_from([None, 3.0, "q", [1.0, 2.0], (1, 2)])
BAD_DTYPES = st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
PER_BREAK = 5  # random problems per kind of break (in the ci profile)


def assert_rejected(call, names: tuple[str, ...]) -> None:
    """``call()`` raises ValueError/TypeError whose message names one of ``names`` as `name`."""
    with pytest.raises(ERRORS) as info:
        call()
    message = str(info.value)
    assert any(f"`{n}`" in message for n in names), f"the message names none of {names}: {message}"


def _wrong_rank(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return torch.zeros((2,) * ndim, dtype=t.dtype)


def _dense_last_dim_broken(t: torch.Tensor) -> torch.Tensor:
    """The same shape with a last-dim stride > 1 (needs t.shape[-2] > 1 and t.shape[-1] > 1)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# ---- attention ------------------------------------------------------------------------------------------

def _attention_inputs(b, nq, nk, h, d):
    return {"q": torch.randn(b, nq, h, d), "k": torch.randn(b, nk, h, d), "v": torch.randn(b, nk, h, d)}


ATTENTION_BREAKS = ["not_tensor", "rank", "dtype", "meta", "shape", "other_float", "q_batch", "strides",
                    "lens_dtype", "lens_shape", "lens_negative", "lens_too_long", "lens_meta", "table_alone",
                    "grid_alone", "grid_not_positive", "table_shape", "start_out_of_range"]


@st.composite
def attention_breaks(draw, how: str):
    b, nq, nk = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    h, d = draw(st.integers(2, 3)), draw(st.integers(2, 8))
    args = _attention_inputs(b, nq, nk, h, d)
    kwargs: dict = {}
    name = draw(st.sampled_from(["q", "k", "v"]))
    lens = draw(st.sampled_from(["prefix_lens", "kv_lens"]))
    if how == "not_tensor":
        args[name] = draw(NOT_TENSORS)
    elif how == "rank":
        args[name] = _wrong_rank(args[name], draw(st.sampled_from([0, 1, 2, 3, 5])))
    elif how == "dtype":
        args[name] = args[name].to(draw(BAD_DTYPES))
    elif how == "meta":
        name = draw(st.sampled_from(["k", "v"]))
        args[name] = args[name].to("meta")
    elif how == "shape":  # one of N, H or D off by one or more
        name = draw(st.sampled_from(["q", "v"]))
        shape = list(args[name].shape)
        axis = draw(st.sampled_from([1, 2, 3] if name == "v" else [2, 3]))
        shape[axis] += draw(st.integers(1, 3))
        args[name] = torch.randn(shape)
    elif how == "other_float":
        name = draw(st.sampled_from(["k", "v"]))
        args[name] = args[name].to(draw(st.sampled_from([torch.float64, torch.float16])))
    elif how == "q_batch":
        name = "q"
        args["q"] = torch.randn(b + draw(st.integers(1, 3)), nq, h, d)  # neither B nor 1
    elif how == "strides":
        args[name] = _dense_last_dim_broken(args[name])
    else:
        name = {"table_alone": "rel_pos_table", "grid_alone": "rel_pos_table", "grid_not_positive": "rel_pos_grid",
                "table_shape": "rel_pos_table", "start_out_of_range": "rel_pos_start"}.get(how, lens)
        gh, gw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        table = torch.randn((2 * gh - 1) * (2 * gw - 1), h)
        if how == "lens_dtype":
            kwargs[lens] = torch.ones(b, dtype=draw(st.sampled_from([torch.float32, torch.bool, torch.int16])))
        elif how == "lens_shape":
            kwargs[lens] = torch.ones(draw(st.sampled_from([(b + 1,), (b, 1), ()])), dtype=torch.int64)
        elif how == "lens_negative":
            kwargs[lens] = torch.full((b,), -draw(st.integers(1, 5)), dtype=torch.int64)
        elif how == "lens_too_long":
            kwargs[lens] = torch.full((b,), nk + draw(st.integers(1, 5)), dtype=torch.int64)
        elif how == "lens_meta":
            kwargs[lens] = torch.ones(b, dtype=torch.int64, device="meta")
        elif how == "table_alone":
            kwargs["rel_pos_table"] = table
        elif how == "grid_alone":
            kwargs["rel_pos_grid"] = (gh, gw)
        elif how == "grid_not_positive":
            kwargs.update(rel_pos_table=table, rel_pos_grid=(draw(st.integers(-2, 0)), gw))
        elif how == "table_shape":
            kwargs.update(rel_pos_table=torch.randn(table.shape[0] + draw(st.integers(1, 3)), h), rel_pos_grid=(gh, gw))
        elif how == "start_out_of_range":
            start = draw(st.sampled_from([-draw(st.integers(1, 5)), max(nq, nk) + draw(st.integers(1, 5))]))
            kwargs.update(rel_pos_table=table, rel_pos_grid=(gh, gw), rel_pos_start=start)
    backend = draw(st.sampled_from([None, "reference", "triton"]))
    return args, kwargs, (name,), backend


@pytest.mark.parametrize("how", ATTENTION_BREAKS)
def test_attention_rejects_broken_inputs(how):
    def check(case):
        args, kwargs, names, backend = case
        assert_rejected(lambda: vlcore.attention(args["q"], args["k"], args["v"], backend=backend, **kwargs), names)

    check_property(attention_breaks(how), check, PER_BREAK)


def test_attention_rejects_a_grid_past_the_sequence():
    @st.composite
    def cases(draw):
        nq, nk = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        gh, gw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        # past both sequences (a grid that fits the keys but not all queries is allowed: KV-cache decoding)
        start = draw(st.integers(max(0, max(nq, nk) - gh * gw + 1), max(nq, nk) + 2))
        return _attention_inputs(1, nq, nk, 2, 4), (gh, gw), start

    def check(case):
        args, (gh, gw), start = case
        table = torch.randn((2 * gh - 1) * (2 * gw - 1), 2)
        assert_rejected(lambda: vlcore.attention(**args, rel_pos_table=table, rel_pos_grid=(gh, gw),
                                                 rel_pos_start=start), ("rel_pos_grid", "rel_pos_start"))

    check_property(cases(), check, 10)


def test_attention_rejects_head_dim_zero():
    def check(case):
        b, nq, nk, h = case
        assert_rejected(lambda: vlcore.attention(**_attention_inputs(b, nq, nk, h, 0)), ("q", "k", "v"))

    check_property(st.tuples(*[st.integers(1, 3)] * 4), check, 5)


# ---- contrastive loss -----------------------------------------------------------------------------------

CONTRASTIVE_BREAKS = ["not_tensor", "rank", "dtype", "text_shape", "text_float", "text_meta", "strides", "kind",
                      "scale_type", "scale_numel", "scale_int", "scale_meta", "siglip_without_bias",
                      "infonce_with_bias", "bias_type"]


@st.composite
def contrastive_breaks(draw, how: str):
    b, d = draw(st.integers(2, 6)), draw(st.integers(2, 8))
    args = {"image_emb": torch.randn(b, d), "text_emb": torch.randn(b, d), "logit_scale": torch.tensor(10.0)}
    kwargs: dict = {"kind": draw(st.sampled_from(["infonce", "siglip"]))}
    if kwargs["kind"] == "siglip":
        kwargs["logit_bias"] = torch.tensor(-3.0)
    name = draw(st.sampled_from(["image_emb", "text_emb"]))
    if how == "not_tensor":
        args[name] = draw(NOT_TENSORS)
    elif how == "rank":
        args[name] = _wrong_rank(args[name], draw(st.sampled_from([0, 1, 3])))
    elif how == "dtype":
        args[name] = args[name].to(draw(BAD_DTYPES))
    elif how == "text_shape":
        name = "text_emb"
        args[name] = torch.randn(b + draw(st.integers(1, 2)), d) if draw(st.booleans()) else torch.randn(b, d + 1)
    elif how == "text_float":
        name = "text_emb"
        args[name] = args[name].double()
    elif how == "text_meta":
        name = "text_emb"
        args[name] = args[name].to("meta")
    elif how == "strides":
        args[name] = _dense_last_dim_broken(args[name])
    elif how == "kind":
        name = "kind"
        kwargs["kind"] = draw(st.sampled_from(["clip", "InfoNCE", "", "sigmoid"]))
        kwargs.pop("logit_bias", None)
    elif how.startswith("scale"):
        name = "logit_scale"
        args[name] = {"scale_type": draw(st.sampled_from(["10", [10.0], True, None])),
                      "scale_numel": torch.ones(draw(st.sampled_from([(2,), (0,), (1, 2)]))),
                      "scale_int": torch.tensor(10), "scale_meta": torch.tensor(10.0, device="meta")}[how]
    else:
        name = "logit_bias"
        if how == "siglip_without_bias":
            kwargs.update(kind="siglip", logit_bias=None)
        elif how == "infonce_with_bias":
            kwargs.update(kind="infonce", logit_bias=torch.tensor(-3.0))
        else:
            kwargs.update(kind="siglip", logit_bias=draw(st.sampled_from(["-3", [1.0], torch.ones(2)])))
    return args, kwargs, (name,), draw(st.sampled_from([None, "reference", "triton"]))


@pytest.mark.parametrize("how", CONTRASTIVE_BREAKS)
def test_contrastive_loss_rejects_broken_inputs(how):
    def check(case):
        args, kwargs, names, backend = case
        assert_rejected(lambda: vlcore.contrastive_loss(**args, **kwargs, backend=backend), names)

    check_property(contrastive_breaks(how), check, PER_BREAK)


def test_contrastive_loss_empty_messages_name_the_embeddings():
    def check(case):
        b, d = case
        assert_rejected(lambda: vlcore.contrastive_loss(torch.randn(b, d), torch.randn(b, d), 10.0),
                        ("image_emb", "text_emb"))

    empty = st.one_of(st.tuples(st.just(0), st.integers(1, 5)), st.tuples(st.integers(0, 5), st.just(0)))
    check_property(empty, check, 5)


# ---- visual dictionary ----------------------------------------------------------------------------------

VQ_BREAKS = ["x_not_tensor", "x_dtype", "x_scalar", "codebook_rank", "codebook_dtype", "codebook_empty", "dim",
             "codebook_meta", "distance", "indices_dtype", "indices_shape", "indices_range", "indices_meta",
             "num_codes"]


@st.composite
def vq_breaks(draw, how: str):
    n, k, d = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    indices, num_codes, distance = torch.randint(0, k, (n,)), k, "l2"
    op = "statistics" if how.startswith(("indices", "num_codes")) else "nearest"
    names = ("num_codes",) if how == "num_codes" else (how.split("_")[0],)
    if how == "x_not_tensor":
        x = draw(NOT_TENSORS)
    elif how == "x_dtype":
        x = x.to(draw(BAD_DTYPES))
    elif how == "x_scalar":
        x = torch.tensor(1.0)
    elif how == "codebook_rank":
        codebook = _wrong_rank(codebook, draw(st.sampled_from([0, 1, 3])))
    elif how == "codebook_dtype":
        codebook = codebook.to(draw(BAD_DTYPES))
    elif how == "codebook_empty":
        codebook = torch.randn(*draw(st.sampled_from([(0, d), (k, 0)])))
    elif how == "dim":
        codebook, names = torch.randn(k, d + draw(st.integers(1, 3))), ("x", "codebook")
    elif how == "codebook_meta":
        codebook = codebook.to("meta")
    elif how == "distance":
        distance = draw(st.sampled_from(["L2", "cos", "", "euclidean"]))
    elif how == "indices_dtype":
        indices = indices.to(draw(st.sampled_from([torch.float32, torch.bool, torch.int16])))
    elif how == "indices_shape":
        indices = torch.zeros(draw(st.sampled_from([(n + 1,), (n, 1), ()])), dtype=torch.int64)
    elif how == "indices_range":
        indices = indices.clone()
        indices[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, k, k + 5]))
    elif how == "indices_meta":
        indices = indices.to("meta")
    elif how == "num_codes":
        num_codes = draw(st.sampled_from([0, -1, 2.0, True, None, "3"]))
    backend = draw(st.sampled_from([None, "reference", "triton"]))
    if op == "nearest":
        return (lambda: vlcore.vq_nearest(x, codebook, distance=distance, backend=backend)), names
    return (lambda: vlcore.vq_statistics(x, indices, num_codes, backend=backend)), names


@pytest.mark.parametrize("how", VQ_BREAKS)
def test_vq_rejects_broken_inputs(how):
    check_property(vq_breaks(how), lambda case: assert_rejected(*case), PER_BREAK)
