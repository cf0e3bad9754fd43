"""Lets ``import torchvision`` (hence ``import timm`` / ``import open_clip``) work beside a CPU-only torch wheel.

PyPI's torchvision wheel is a CUDA build: its C ops (``torchvision/_C.so``) link against ``libtorch_cuda.so``,
which the CPU torch wheel lacks, so loading them fails silently and torchvision's import then dies in
``_meta_registrations`` with "operator torchvision::nms does not exist". Neither timm nor open_clip uses those
ops (NMS, RoI pooling, deformable convolution); declaring their schemas (no kernels) lets torchvision import.
Calling one of them still raises torch's "no kernel registered" error, which names the op.

:func:`ensure` does nothing when torchvision is absent or its C ops load, and must run before torchvision is
first imported (``vlcore.integrations`` calls it on import).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

# The schemas torchvision 0.2x's C++ library registers (csrc/ops/*.cpp), for the ops its Python side refers to
# at import time.
_ROI = "Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width"
_SIZES = "SymInt batch_size, SymInt channels, SymInt height, SymInt width"
_DEFORM = ("Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, "
           "SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
           "SymInt offset_groups, bool use_mask")
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    f"roi_align({_ROI}, int sampling_ratio, bool aligned) -> Tensor",
    f"qroi_align({_ROI}, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    f"SymInt pooled_width, {_SIZES}, int sampling_ratio, bool aligned) -> Tensor",
    f"ps_roi_align({_ROI}, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    f"SymInt pooled_height, SymInt pooled_width, int sampling_ratio, {_SIZES}) -> Tensor",
    f"roi_pool({_ROI}) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    f"SymInt pooled_width, {_SIZES}) -> Tensor",
    f"ps_roi_pool({_ROI}) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    f"SymInt pooled_height, SymInt pooled_width, {_SIZES}) -> Tensor",
    f"deform_conv2d(Tensor input, {_DEFORM}) -> Tensor",
    f"_deform_conv2d_backward(Tensor grad, Tensor input, {_DEFORM}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "_cuda_version() -> int",
)

_library: torch.library.Library | None = None  # kept alive: dropping a Library removes its definitions


def _c_ops_load() -> bool:
    """True when torchvision's own C ops load (or are loaded), False when they cannot."""
    if hasattr(torch.ops.torchvision, "nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    folders = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for lib in (f for folder in folders for f in folder.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure() -> bool:
    """Declare torchvision's op schemas if its C ops cannot load; returns True when it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    if _c_ops_load():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    # torchvision asks for the CUDA version its ops were built with; -1 is its "CPU build" answer.
    _library.impl("_cuda_version", lambda: -1, "CompositeExplicitAutograd")
    return True
