"""kernels/_launch.py's TF32 opt-in when the legacy and the per-backend torch APIs were mixed (torch raises
from its global query then). In a subprocess: the mixed state cannot be undone inside one process."""

import subprocess
import sys

import pytest

SCRIPT = """
import torch
from vlcore.kernels import _launch
torch.set_float32_matmul_precision("high")
torch.backends.cuda.matmul.allow_tf32 = {flag}
print(_launch.allow_tf32(), _launch.fp32_dot_precision(interpret=False))
"""


@pytest.mark.parametrize("flag, want", [(False, "False ieee"), (True, "True tf32")])
def test_tf32_opt_in_after_mixing_torchs_legacy_and_new_apis(flag, want):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(flag=flag)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == want
