"""The peers' install: torchvision (imported by timm and open_clip) imports beside the CPU torch wheel."""

import importlib.util

import pytest
import torch


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed "
                    "(pip install -r requirements-interop.txt)")
def test_torchvision_imports_beside_this_torch():
    """PyPI's torchvision is a CUDA build whose C ops cannot load beside a CPU-only torch; vlcore.integrations
    declares their schemas so that ``import torchvision`` (hence timm, open_clip) succeeds."""
    import vlcore.integrations  # noqa: F401, I001  (must come first)
    import torchvision

    assert hasattr(torch.ops.torchvision, "nms")
    assert torchvision.__version__.startswith("0.28")


def test_the_interop_extra_reads_the_pinned_requirements():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pins = [line for line in (root / "requirements-interop.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", p) for p in pins), pins
    assert "requirements-interop.txt" in (root / ".ci" / "run").read_text()
