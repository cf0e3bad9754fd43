"""Kernel-vs-reference comparison helpers (used by every kernel test).

The rule (flash-attn's): a low-precision kernel is right when its error against the float64 truth is at most
twice the error of the reference run at the same low precision, plus a rounding floor. Forward and backward
get the *same* upstream gradient; a failure prints where the values differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# absolute floor, relative part, per dtype
FLOORS = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def where_they_differ(name: str, actual: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor,
                      limit: int = 5) -> str:
    err = (actual.double() - expected.double()).abs()
    bad = (err > allowed) | (actual.isnan() != expected.isnan())
    idx = bad.nonzero()[:limit].tolist()
    flat = int(err.nan_to_num(float("inf")).argmax())
    worst = list(torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else []
    worst = [int(w) for w in worst]
    lines = [f"{name}: {int(bad.sum())} of {bad.numel()} values out of bound (shape {tuple(actual.shape)})",
             f"  worst at {worst}: got {actual.flatten()[flat].item():.6g}, expected "
             f"{expected.flatten()[flat].item():.6g}, |err| {err.flatten()[flat].item():.3g}, "
             f"allowed {allowed.flatten()[flat].item() if allowed.dim() else allowed.item():.3g}"]
    for i in idx:
        t = tuple(i)
        lines.append(f"  at {list(t)}: got {actual[t].item():.6g}, expected {expected[t].item():.6g}")
    return "\n".join(lines)


def assert_close(name: str, actual: torch.Tensor, truth: torch.Tensor, *, dtype: torch.dtype,
                 reference_lowp: torch.Tensor | None = None, floor_scale: float = 1.0) -> None:
    """|actual − truth| ≤ 2·|reference_lowp − truth| + atol + rtol·|truth| elementwise (shapes must match)."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(truth.shape)}"
    atol, rtol = FLOORS[dtype]
    a, t = actual.detach().double().cpu(), truth.detach().double().cpu()
    allowed = floor_scale * (atol + rtol * t.abs())
    if reference_lowp is not None:
        allowed = allowed + 2 * (reference_lowp.detach().double().cpu() - t).abs()
    nan_mismatch = a.isnan() != t.isnan()
    if bool(((a - t).abs() > allowed).any()) or bool(nan_mismatch.any()):
        raise AssertionError(where_they_differ(name, a, t, allowed))


def compare_with_reference(kernel_fn: Callable[..., torch.Tensor], reference_fn: Callable[..., torch.Tensor],
                           inputs: Mapping[str, torch.Tensor | None], *, dtype: torch.dtype,
                           grad_names: tuple[str, ...] | None = None, seed: int = 0,
                           floor_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Run kernel and reference on the same inputs and upstream gradient; compare output and gradients.

    ``inputs`` holds tensors already in the test dtype (integer tensors pass through). Floating inputs named in
    ``grad_names`` (default: all floating ones) get gradients. The truth is the reference in float64.
    Returns the kernel's output and gradients (for further checks).
    """
    names = [n for n, t in inputs.items() if t is not None and t.is_floating_point()]
    grad_names = tuple(names) if grad_names is None else grad_names

    def run(fn, cast):
        args = {}
        for n, t in inputs.items():
            if t is None or not t.is_floating_point():
                args[n] = t
            else:
                x = cast(t.detach()).clone()
                args[n] = x.requires_grad_(n in grad_names)
        out = fn(**args)
        return args, out

    k_args, k_out = run(kernel_fn, lambda t: t)
    r_args, r_out = run(reference_fn, lambda t: t)
    t_args, t_out = run(reference_fn, lambda t: t.double())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad = torch.randn(t_out.shape, generator=gen, dtype=torch.float64)
    assert_close("output", k_out, t_out, dtype=dtype, reference_lowp=r_out, floor_scale=floor_scale)
    results = {"output": k_out.detach()}
    if not grad_names:
        return results
    leaves = lambda a: [a[n] for n in grad_names]
    k_grads = torch.autograd.grad(k_out, leaves(k_args), grad.to(k_out.dtype).to(k_out.device), allow_unused=True)
    r_grads = torch.autograd.grad(r_out, leaves(r_args), grad.to(r_out.dtype).to(r_out.device), allow_unused=True)
    t_grads = torch.autograd.grad(t_out, leaves(t_args), grad.to(t_out.device), allow_unused=True)
    for n, kg, rg, tg in zip(grad_names, k_grads, r_grads, t_grads):
        if tg is None:
            assert kg is None or not kg.any(), f"d{n}: kernel gave a gradient where the reference has none"
            continue
        assert kg is not None, f"d{n}: kernel gave no gradient"
        assert_close(f"d{n}", kg, tg, dtype=dtype, reference_lowp=rg, floor_scale=floor_scale)
        results[f"d{n}"] = kg.detach()
    return results


class _AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest_bytes = 0
        self.largest_shape = ()

    def _record(self, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest_bytes:
                self.largest_bytes = t.untyped_storage().nbytes()
                self.largest_shape = tuple(t.shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _vlcore_opdef(func)
        if opdef is not None:
            # A mode is switched off while it handles an op, so it would see only the custom op's outputs:
            # run vlcore's own ops' Python implementation with the mode back on, to see their launchers' buffers.
            with self:
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self._record(out)
        return out


def _vlcore_opdef(func):
    name = getattr(getattr(func, "_schema", None), "name", "")
    if not name.startswith("vlcore::"):
        return None
    from torch._library.custom_ops import OPDEFS

    return OPDEFS.get(name)


@contextlib.contextmanager
def track_allocations():
    """Records the largest tensor storage created by torch ops inside the block — inside vlcore's registered
    ops too (their launchers' buffers) — so a test can assert that nothing of size Nq×Nk (b×B, N×K) was
    allocated."""
    tracker = _AllocationTracker()
    with tracker:
        yield tracker
