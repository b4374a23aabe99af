"""FlashAttention-style tolerances: a kernel's error against a float64 reference must be at most `out_factor`
(outputs, default 2) or `grad_factor` (gradients, default 3) times the error of the same PyTorch math run in
the kernel's dtype, plus a small absolute floor (so an exact low-precision reference does not demand zero).

    check_fwd_bwd(kernel_fn, reference_fn, {"q": q, "k": k, "v": v}, dtype=torch.bfloat16)

`kernel_fn` and `reference_fn` are called with the named tensors as keyword arguments (bind everything else
with a lambda or functools.partial) and must return one tensor; the inputs given are the masters (any float
dtype); each run gets its own leaf copies in its dtype, and one shared random upstream gradient.
"""
from __future__ import annotations

import torch

ABS_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, *, factor: float,
                  floor: float) -> None:
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_abs_err(got, ref64)
    base = max_abs_err(ref_lowp, ref64)
    bound = factor * base + floor
    assert err <= bound, (f"{name}: max abs error {err:.3e} vs float64 exceeds {factor} x {base:.3e} (same math in "
                          f"{ref_lowp.dtype}) + {floor:.1e} = {bound:.3e}")


def _forward(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype):
    leaves = {name: t.detach().to(dtype).requires_grad_(True) for name, t in inputs.items()}
    return fn(**leaves), leaves


def _grads(out: torch.Tensor, leaves: dict[str, torch.Tensor], grad_out: torch.Tensor) -> dict:
    out.backward(grad_out.to(out.dtype))
    return {name: leaf.grad for name, leaf in leaves.items()}


def check_fwd_bwd(kernel_fn, reference_fn, inputs: dict[str, torch.Tensor], *, dtype: torch.dtype,
                  out_factor: float = 2.0, grad_factor: float = 3.0, floor: float | None = None,
                  backward: bool = True, seed: int = 0) -> None:
    """Compares output and every input gradient of kernel_fn (run in `dtype`) with reference_fn in float64,
    bounded by the error of reference_fn run in `dtype`."""
    floor = ABS_FLOOR[dtype] if floor is None else floor
    ref64, leaves64 = _forward(reference_fn, inputs, torch.float64)
    lowp, leaves_low = _forward(reference_fn, inputs, dtype)
    got, leaves_got = _forward(kernel_fn, inputs, dtype)
    assert got.dtype == dtype, f"out: dtype {got.dtype}, expected {dtype}"
    assert_within("out", got, ref64, lowp, factor=out_factor, floor=floor)
    if not backward:
        return
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(ref64.shape, generator=gen, dtype=torch.float64).to(ref64.device)
    g64 = _grads(ref64, leaves64, grad_out)
    glow = _grads(lowp, leaves_low, grad_out)
    gget = _grads(got, leaves_got, grad_out)
    for name in g64:
        assert gget[name] is not None, f"d{name}: no gradient reached the input"
        assert_within(f"d{name}", gget[name], g64[name], glow[name], factor=grad_factor, floor=floor)
