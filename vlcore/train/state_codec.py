"""A training state (nested dicts/lists/tuples of tensors, numpy arrays and plain values) as tensors + JSON.

Checkpoints must never be unpickled: a pickle is a program, and a crafted ``.state`` file in a folder handed to
``--resume`` would run it. ``encode`` splits a state into a flat ``{name: tensor}`` dict (stored as safetensors)
and a JSON skeleton that names those tensors; ``decode`` rebuilds it. Everything the loop saves is covered:
optimizer and scheduler state dicts (integer keys, tuples such as ``betas``), torch/CUDA RNG states (uint8
tensors), numpy's RNG (a tuple holding a uint32 array), Python's RNG (nested tuples of ints), data positions,
the step and the run's config. Anything else is refused at save time, naming where it sits in the state.

Tags in the skeleton (a dict with one key starting with ``__``; ordinary string-keyed dicts stay plain JSON)::

    {"__tensor__": name}                         a torch tensor, stored under ``name``
    {"__ndarray__": name, "dtype": "uint32"}     a numpy array, its bytes stored under ``name`` as uint8
    {"__tuple__": [...]}                         a tuple (``random.setstate`` and numpy need real tuples)
    {"__items__": [[key, value], ...]}           a dict whose keys are not all strings (optimizer state)
    {"__float__": "nan" | "inf" | "-inf"}        non-finite floats (strict JSON has none)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__")


def encode(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by name, JSON-serialisable skeleton) of ``state``; ``decode(tensors, skeleton)`` rebuilds it."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj, where: str):
        if isinstance(obj, torch.Tensor):
            name = f"t{len(tensors)}"
            # own storage: safetensors refuses tensors that share memory, and a view would save its whole base
            tensors[name] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": name}
        if isinstance(obj, np.ndarray):
            name = f"t{len(tensors)}"
            arr = np.ascontiguousarray(obj)
            tensors[name] = torch.from_numpy(arr.view(np.uint8).reshape(-1).copy())
            return {"__ndarray__": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if isinstance(obj, np.generic):
            return enc(obj.item(), where)
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: enc(v, f"{where}.{k}") for k, v in obj.items()}
            return {"__items__": [[enc(k, f"{where} key"), enc(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        raise TypeError(f"training state{where}: cannot store a {type(obj).__name__} without pickle; only "
                        "tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts are saved")

    return tensors, enc(state, "")


def decode(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The state ``encode`` split into ``tensors`` and ``skeleton``; a malformed skeleton raises ValueError."""

    def tensor(name):
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"training state: the skeleton names tensor {name!r}, which the file does not hold")
        return tensors[name]

    def dec(obj):
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        tag = next((k for k in obj if k in _TAGS), None)
        if tag == "__tensor__":
            return tensor(obj[tag])
        if tag == "__ndarray__":
            dtype = np.dtype(obj["dtype"])
            if dtype.kind not in "biufc":  # never reinterpret file bytes as object pointers
                raise ValueError(f"training state: numpy dtype {dtype} is not a plain number type")
            return tensor(obj[tag]).numpy().view(dtype).reshape(obj["shape"]).copy()
        if tag == "__tuple__":
            return tuple(dec(v) for v in obj[tag])
        if tag == "__items__":
            return {dec(k): dec(v) for k, v in obj[tag]}
        if tag == "__float__":
            return float(obj[tag])
        return {k: dec(v) for k, v in obj.items()}

    try:
        return dec(skeleton)
    except (TypeError, KeyError) as e:
        raise ValueError(f"training state: malformed skeleton ({type(e).__name__}: {e})") from None

