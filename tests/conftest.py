"""Test configuration: the Triton interpreter on machines without a GPU, markers, shared fixtures.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set at conftest import time.
bf16 is wrong under the interpreter (arithmetic and tl.dot): interpreter tests use fp32/fp16, bf16 runs on GPU.
"""

import os
import sys

import pytest

try:  # torch.cuda.is_available() does not import triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/kernel_check.py, tests/dist_utils.py
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/

HAS_CUDA = _HAS_CUDA
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernel tests run on: cuda natively, cpu under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
