"""Property test of the checkpoint state codec: any nesting of dicts (string or integer keys, keys that look like
the codec's own tags), lists, tuples, tensors of several dtypes, numpy arrays, numbers (NaN and infinities
included), strings and None comes back bitwise equal and of the same types, through strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vlcore.train import state_codec

hyp = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install -e .[dev])")
st = pytest.importorskip("hypothesis.strategies")


def _tensors():
    dtypes = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool, torch.float16]
    return st.builds(lambda dt, vals: torch.tensor(vals).to(dt), st.sampled_from(dtypes),
                     st.lists(st.floats(-1e3, 1e3, width=16), max_size=5))


_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
           | _tensors() | st.builds(lambda v: np.array(v, dtype=np.uint32), st.lists(st.integers(0, 2**32 - 1))))
_keys = st.text(max_size=6) | st.sampled_from(["__tensor__", "__items__"]) | st.integers()  # tag look-alikes too
_states = st.recursive(_leaves, lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
                       | st.dictionaries(_keys, kids, max_size=4), max_leaves=20)


def _bitwise(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and \
            a.numpy().tobytes() == b.numpy().tobytes()
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@hyp.settings(max_examples=80, deadline=None)
@hyp.given(_states)
def test_any_storable_state_round_trips_bitwise(state):
    tensors, skeleton = state_codec.encode(state)
    assert _bitwise(state_codec.decode(tensors, json.loads(json.dumps(skeleton, allow_nan=False))), state)
