"""What the interpreter cannot show about the contrastive and VQ launches: CUDA's grid limits at huge shapes,
the device guard around every launch (Triton and the CUDA extension), the CUDA sources clearing a pending error
before launching, the deterministic mode, the TF32 opt-in, and the static variants for the resource report."""

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


# ---- csrc: a pending error is cleared before each launch ------------------------------------------------

def _entry_points(source: str) -> dict[str, str]:
    """Bodies of the exported (column-0) ``std::string name(...)`` functions of a .cu file."""
    bodies = {}
    for m in re.finditer(r"^std::string (\w+)\(", source, flags=re.M):
        end = source.index("\n}\n", m.end())
        bodies[m.group(1)] = source[m.end():end]
    return bodies


def test_cuda_entry_points_clear_a_pending_error_before_launching():
    """Without it, last_error() after the launch reports another kernel's (non-sticky) error as this one's."""
    checked = []
    for name in ("vq.cu", "contrastive.cu"):
        for fn, body in _entry_points((CSRC / name).read_text()).items():
            launch = re.search(r"<<<|\blaunch_nearest\w*<|VLCORE_CONTRASTIVE_BWD\(", body)
            if launch is None:
                continue
            clear = re.search(r"cudaGetLastError\(\)|clear_pending_error\(\)", body)
            assert clear is not None and clear.start() < launch.start(), f"{name}:{fn} launches before clearing"
            checked.append(fn)
    assert sorted(checked) == ["contrastive_backward", "contrastive_forward", "vq_ema", "vq_nearest",
                               "vq_statistics"]
