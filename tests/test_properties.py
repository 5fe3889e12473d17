"""Property-based checks of warp, merged_warp and warp_l1 against the float64 reference.

Random shapes, strides, dtypes and displacements, including huge, subnormal,
NaN and ±Inf values. CI runs a fixed-seed profile; ``HYPOTHESIS_PROFILE=dev``
searches longer (tests/conftest.py).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tcae_kernels import merge_displacements, merged_warp, warp, warp_l1, warp_naive

from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import rel_err

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in other strides."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@st.composite
def displacement_values(draw, dtype: torch.dtype, n: int) -> torch.Tensor:
    """n displacement values in pixels: mostly ordinary, some extreme."""
    huge = 6e4 if dtype == torch.float16 else 1e30
    # Subnormal, except in bfloat16: the Triton interpreter (not CUDA) flushes
    # bfloat16 subnormals to zero when it converts them, which moves a position
    # 1e-40 px left of an integer onto it. 1e-30 probes the same rounding.
    tiny = {torch.float16: 6e-8, torch.bfloat16: 1e-30}.get(dtype, 1e-40)
    special = st.sampled_from([huge, -huge, tiny, -tiny, 0.0, float("nan"), float("inf"), -float("inf"), 1e6, -1e6])
    ordinary = st.floats(-12, 12, allow_nan=False, width=32)
    integer = st.integers(-6, 6).map(float)
    values = draw(st.lists(st.one_of(ordinary, ordinary, ordinary, integer, special), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    disp_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()) else dtype
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    h_in, w_in, h, w = (draw(st.integers(1, 8)) for _ in range(4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
    disp = draw(displacement_values(disp_dtype, b * 2 * h * w)).reshape(b, 2, h, w).to(disp_dtype)
    grad = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    padding = draw(st.sampled_from(["zeros", "border"]))
    return relayout(src, layout), relayout(disp, draw(st.sampled_from(LAYOUTS))), grad, padding, gen


def with_grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check(out, grads, ref, ref_grads, bad, dtype):
    """Equal to the reference with SPEC's tolerances; NaN exactly at the non-finite pixels (bad).

    grads[0] is src's; the others are per-pixel fields', NaN where bad.
    """
    tol_fwd, tol_grad = TOL[dtype]
    bad_c = bad.unsqueeze(1).expand_as(out)
    assert torch.isnan(out[bad_c]).all() and torch.isfinite(out[~bad_c]).all()
    assert rel_err(out[~bad_c], ref[~bad_c]) <= tol_fwd
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if i > 0:
            bad_g = bad.unsqueeze(1).expand_as(g)
            assert torch.isnan(g[bad_g]).all()
            assert rel_err(g[~bad_g], r[~bad_g]) <= tol_grad
        else:
            assert rel_err(g, r) <= tol_grad


def reference(fn, inputs, grad, bad):
    """The float64 reference where non-finite pixels send nothing back (the kernels' contract)."""
    wide = [t.double() for t in inputs]
    return with_grads(fn, wide, grad.double().masked_fill(bad.unsqueeze(1), 0.0))


@given(cases())
def test_warp_property(case):
    src, disp, grad, padding, _ = case
    bad = ~torch.isfinite(disp).all(dim=1)
    out, grads = with_grads(lambda s, d: warp(s, d, padding), [src, disp], grad)
    ref, ref_grads = reference(lambda s, d: warp_naive(s, d, padding), [src, disp], grad, bad)
    check(out, grads, ref, ref_grads, bad, src.dtype)


@given(cases())
def test_merged_warp_property(case):
    src, disp, grad, padding, gen = case
    b, _, h, w = disp.shape
    # Finite logits and a second displacement; the first carries the extreme values.
    logits = [(torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64) * 3).to(disp.dtype) for _ in range(2)]
    other = (torch.randn(b, 2, h, w, generator=gen, dtype=torch.float64) * 4).to(disp.dtype)
    inputs = [src, disp, other, *logits]
    merged = merge_displacements(*(t.double() for t in inputs[1:]))
    bad = ~torch.isfinite(merged).all(dim=1)
    out, grads = with_grads(lambda *a: merged_warp(*a, padding=padding), inputs, grad)
    ref, ref_grads = reference(
        lambda s, *f: warp_naive(s, merge_displacements(*f), padding), inputs, grad, bad
    )
    check(out, grads, ref, ref_grads, bad, src.dtype)


@given(cases())
def test_warp_l1_property(case):
    src, disp, grad, padding, gen = case
    target = torch.randn(grad.shape, generator=gen, dtype=torch.float64).to(src.dtype)
    bad = ~torch.isfinite(disp).all(dim=1)
    loss = warp_l1(src, disp, target, padding=padding)
    expected = (warp_naive(src.double(), disp.double(), padding) - target.double()).abs().flatten(1).mean(dim=1)
    poisoned = bad.flatten(1).any(dim=1)
    assert torch.isnan(loss[poisoned]).all()
    assert rel_err(loss[~poisoned], expected[~poisoned]) <= TOL[src.dtype][0]
