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

# timm, open_clip and transformers import torchvision, whose CUDA-built C ops cannot load beside the CPU torch
# wheel; vlcore.integrations declares their schemas so those imports work in every test (after the line above:
# importing vlcore may import triton).
import vlcore.integrations  # noqa: E402,F401

try:  # property tests (tests/test_properties_*.py): a small reproducible budget in CI, more on request
    from hypothesis import HealthCheck, example, given, settings

    # derandomize: CI runs the same examples every time (a failure reproduces); no deadline: the Triton
    # interpreter's first call compiles. `HYPOTHESIS_PROFILE=thorough pytest tests/test_properties_*` searches wider.
    # no example database: a CI run never depends on what an earlier run on the same machine found
    settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                              print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("thorough", max_examples=300, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the property tests skip without hypothesis
    settings = None


def hypothesis_examples(ci: int) -> int:
    """A property test's example count: ``ci`` in the CI profile, the profile's count scaled alike otherwise."""
    if settings is None or os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return ci
    return max(ci, ci * settings.default.max_examples // 10)


# every backend that runs on this machine: the cpu backend takes CPU tensors only (the tests use the GPU when present)
PROPERTY_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    HAS_CUDA, reason="the cpu backend takes CPU tensors; on this machine the tests put inputs on the GPU")), "triton"]


def check_property(strategy, check, ci_examples: int, *, always=(), **options) -> None:
    """Run ``check(case)`` on the cases in ``always``, then on ``hypothesis_examples(ci_examples)`` drawn ones."""
    test = given(strategy)(check)
    for case in always:
        test = example(case)(test)
    settings(max_examples=hypothesis_examples(ci_examples), **options)(test)()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    skip_long = pytest.mark.skip(reason="takes minutes on a 2-core CPU: run with VLCORE_LONG=1")
    run_long = os.environ.get("VLCORE_LONG") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "long" in item.keywords and not run_long:
            item.add_marker(skip_long)


@pytest.fixture
def device():
    """The device kernel tests run on: cuda natively, cpu under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
