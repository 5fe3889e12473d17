"""Autograd beyond first-order reverse mode (issue #13): forward mode (torch.func.jvp, jacfwd,
forward_ad.make_dual), torch.func's reverse transforms (jacrev, grad, vjp) and double backward
(create_graph=True) of warp, merged_warp and warp_l1 (and of warp_torch where it differs), against
the float64 reference's autograd (warp_naive) and, for double backward, gradgradcheck's finite
differences."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from tcae_kernels import merge_displacements, merged_warp, warp, warp_l1, warp_naive, warp_torch
from tcae_kernels.ops import launch
from tcae_kernels.testing import TOLERANCES, rel_err

OPS = ["warp", "merged_warp", "warp_l1"]
# warp_torch (the fallback as an autograd.Function) has no path: it is the fallback.
ALL = OPS + ["warp_torch"]
PADDINGS = ["zeros", "border"]
# B, C, H_in, W_in, H, W: the output is not src's size.
SHAPE = (2, 2, 4, 5, 3, 4)


def seeded(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def op_and_reference(op: str, padding: str):
    """The op and its float64 reference, both as functions of the op's tensors only."""
    if op in ("warp", "warp_torch"):
        fn = warp if op == "warp" else warp_torch
        return (lambda s, d: fn(s, d, padding)), (lambda s, d: warp_naive(s, d, padding))
    if op == "merged_warp":
        return (
            lambda s, da, db, la, lb: merged_warp(s, da, db, la, lb, padding),
            lambda s, da, db, la, lb: warp_naive(s, merge_displacements(da, db, la, lb), padding),
        )
    return (
        lambda s, d, t: warp_l1(s, d, t, padding=padding),
        lambda s, d, t: (warp_naive(s, d, padding) - t).abs().flatten(1).mean(dim=1),
    )


def make_inputs(op: str, gen: torch.Generator, dtype: torch.dtype = torch.float64,
                disp_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Random inputs whose sample positions lie 0.2 px or more from any integer, so that
    finite differences never cross a cell (or a border, for "border" padding)."""
    b, c, h_in, w_in, h, w = SHAPE
    disp_dtype = disp_dtype or dtype

    def field(channels: int) -> torch.Tensor:
        whole = torch.randint(-2, 3, (b, channels, h, w), generator=gen).double()
        frac = 0.2 + 0.6 * torch.rand(b, channels, h, w, generator=gen, dtype=torch.float64)
        return (whole + frac).to(disp_dtype)

    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
    if op in ("warp", "warp_torch"):
        return [src, field(2)]
    if op == "merged_warp":
        logits = [torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64).to(disp_dtype) for _ in range(2)]
        return [src, field(2), field(2), *logits]
    return [src, field(2), torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)]


def reference_jacobian(ref, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂out/∂input for each input, [out elements, input elements], by the float64 reference's
    reverse-mode autograd."""
    jac = torch.autograd.functional.jacobian(ref, tuple(t.detach().double() for t in inputs))
    return [j.reshape(j.shape[: j.dim() - t.dim()].numel(), t.numel()) for j, t in zip(jac, inputs)]


def reference_jvp(jac: list[torch.Tensor], tangents: list[torch.Tensor]) -> torch.Tensor:
    return sum(j @ t.double().flatten() for j, t in zip(jac, tangents))


def flat_jacobian(jac: tuple[torch.Tensor, ...], out_numel: int) -> list[torch.Tensor]:
    return [j.reshape(out_numel, -1) for j in jac]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("op", OPS)
def test_jvp_and_make_dual(op, padding, path):
    """Forward mode gives the reference's J·v, through torch.func and through forward_ad."""
    gen = seeded("jvp", op, padding, path)
    fn, ref = op_and_reference(op, padding)
    inputs = make_inputs(op, gen)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    want = reference_jvp(reference_jacobian(ref, inputs), tangents)
    out, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
    assert rel_err(out, fn(*inputs)) <= TOLERANCES[torch.float64][0]
    assert rel_err(tangent.flatten(), want) <= TOLERANCES[torch.float64][1]
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(t, v) for t, v in zip(inputs, tangents)))
        tangent = fwAD.unpack_dual(dual).tangent
    assert tangent is not None and rel_err(tangent.flatten(), want) <= TOLERANCES[torch.float64][1]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("op", ALL)
def test_torch_func_jacobians_grad_and_vjp(op, padding):
    """jacfwd and jacrev give the reference's Jacobian; grad and vjp its transpose times a vector."""
    gen = seeded("jac", op, padding)
    fn, ref = op_and_reference(op, padding)
    inputs = make_inputs(op, gen)
    want = reference_jacobian(ref, inputs)
    argnums = tuple(range(len(inputs)))
    out_numel = fn(*inputs).numel()
    tol = TOLERANCES[torch.float64][1]
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        got = flat_jacobian(transform(fn, argnums=argnums)(*inputs), out_numel)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= tol, transform.__name__
    cotangent = torch.randn(fn(*inputs).shape, generator=gen, dtype=torch.float64)
    want_vjp = [w.T @ cotangent.flatten() for w in want]
    grads = torch.func.grad(lambda *a: (fn(*a) * cotangent).sum(), argnums=argnums)(*inputs)
    _, pullback = torch.func.vjp(fn, *inputs)
    for g, v, w in zip(grads, pullback(cotangent), want_vjp):
        assert rel_err(g.flatten(), w) <= tol and rel_err(v.flatten(), w) <= tol


@pytest.mark.parametrize("op", OPS)
def test_hessian(op):
    """torch.func.hessian (jacfwd of jacrev) of a weighted sum gives the reference's Hessian."""
    gen = seeded("hessian", op)
    fn, ref = op_and_reference(op, "zeros")
    inputs = make_inputs(op, gen)
    weights = torch.randn(fn(*inputs).shape, generator=gen, dtype=torch.float64)
    argnums = tuple(range(len(inputs)))
    got = torch.func.hessian(lambda *a: (fn(*a) * weights).sum(), argnums=argnums)(*inputs)
    want = torch.autograd.functional.hessian(lambda *a: (ref(*a) * weights).sum(), tuple(inputs))
    for row_got, row_want in zip(got, want):
        for g, w in zip(row_got, row_want):
            assert rel_err(g, w) <= TOLERANCES[torch.float64][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_jvp_low_precision(op, dtype):
    """Forward mode in float32, and in bfloat16 beside a float32 δ, within SPEC's gradient tolerance."""
    gen = seeded("jvp-low", op, dtype)
    fn, ref = op_and_reference(op, "zeros")
    inputs = make_inputs(op, gen, dtype, torch.float32)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in inputs]
    out, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
    assert out.dtype == fn(*inputs).dtype and tangent.dtype == out.dtype
    want = reference_jvp(reference_jacobian(ref, inputs), tangents)
    assert rel_err(tangent.flatten(), want) <= TOLERANCES[dtype][1]


def second_derivatives(first: tuple[torch.Tensor, ...], inputs: list[torch.Tensor],
                       weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂(Σ weights · first)/∂inputs, zeros for an input it does not depend on."""
    total = sum((f * w).sum() for f, w in zip(first, weights))
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("op", OPS)
def test_double_backward(op, padding, path):
    """create_graph=True: the first-order gradients equal the fast path's, and their own
    gradients match the reference's second derivatives and pass gradgradcheck."""
    gen = seeded("gradgrad", op, padding, path)
    fn, ref = op_and_reference(op, padding)
    inputs = [t.requires_grad_() for t in make_inputs(op, gen)]
    cotangent = torch.randn(fn(*inputs).shape, generator=gen, dtype=torch.float64)
    fast = torch.autograd.grad(fn(*inputs), inputs, cotangent)
    first = torch.autograd.grad(fn(*inputs), inputs, cotangent, create_graph=True)
    for f, g in zip(first, fast):
        assert rel_err(f, g) <= TOLERANCES[torch.float64][1]
    # Second derivatives against the reference's: ∂/∂inputs of Σ w·∂L/∂inputs.
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    got = second_derivatives(first, inputs, weights)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    want = second_derivatives(torch.autograd.grad(ref(*leaves), leaves, cotangent, create_graph=True), leaves, weights)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOLERANCES[torch.float64][1]
    # The paths differ only in the forward, and the interpreter is slow: gradgradcheck's
    # hundreds of calls run on the fallback path.
    if path == "fallback":
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ALL)
def test_second_derivatives_on_the_border(op):
    """Positions exactly on the border ("border" padding), where δ gets no gradient along that
    axis: nor do the first-order gradients along the other axis (the reference's convention)."""
    gen = seeded("border", op)
    fn, ref = op_and_reference(op, "border")
    inputs = make_inputs(op, gen)
    _, _, h_in, w_in, h, w = SHAPE
    xs, ys = torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64)[:, None]
    for field in (1, 2) if op == "merged_warp" else (1,):
        d = inputs[field]
        # Column 0 samples at x̂ = 0, the last column at x̂ = W_in − 1; row 0 at ŷ = H_in − 1.
        d[:, 0, :, 0] = 0.0
        d[:, 0, :, -1] = (xs[-1] - (w_in - 1)).item()
        d[:, 1, 0, :] = (ys[0] - (h_in - 1)).item()
    if op == "merged_warp":  # equal fields: the merged position is theirs exactly
        inputs[2] = inputs[1].clone()
    leaves = [t.requires_grad_() for t in inputs]
    cotangent = torch.randn(fn(*leaves).shape, generator=gen, dtype=torch.float64)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in leaves]
    got = second_derivatives(torch.autograd.grad(fn(*leaves), leaves, cotangent, create_graph=True), leaves, weights)
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    want = second_derivatives(torch.autograd.grad(ref(*refs), refs, cotangent, create_graph=True), refs, weights)
    for g, w_ in zip(got, want):
        assert rel_err(g, w_) <= TOLERANCES[torch.float64][1]


@pytest.mark.parametrize("op", OPS)
def test_non_finite_displacement(op):
    """At a pixel with NaN or ±Inf in δ the output is NaN, and so are its forward-mode
    tangent and, with create_graph, its δ gradient (as on the fast path); src's gradient
    receives nothing from it."""
    gen = seeded("nan", op)
    fn, _ = op_and_reference(op, "zeros")
    inputs = make_inputs(op, gen)
    for field in (1, 2) if op == "merged_warp" else (1,):
        inputs[field][0, 0, 1, 2] = float("nan")
        inputs[field][1, 1, 0, 3] = float("inf")
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    out, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
    assert torch.equal(out.isnan(), tangent.isnan()) and out.isnan().any()
    leaves = [t.requires_grad_() for t in inputs]
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    fast = torch.autograd.grad(fn(*leaves), leaves, cotangent)
    first = torch.autograd.grad(fn(*leaves), leaves, cotangent, create_graph=True)
    for f, g in zip(first, fast):
        assert torch.equal(f.isnan(), g.isnan())
        assert torch.allclose(f, g, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
def test_first_order_backward_stays_on_the_kernels(op, monkeypatch):
    """Without create_graph (and outside forward mode and torch.func) the composite never runs."""
    fn, _ = op_and_reference(op, "zeros")
    inputs = [t.requires_grad_() for t in make_inputs(op, seeded("fast", op))]

    def refuse(*args):
        raise AssertionError("the composite ran")

    monkeypatch.setitem(launch.COMPOSITES, launch.OPS[op], refuse)
    fn(*inputs).sum().backward()
    assert all(t.grad is not None for t in inputs)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("op", ["warp3d", "flow_warp3d"])
def test_volume_warps_every_mode(op, padding):
    """warp3d and flow_warp3d route like the 2-D ops: forward mode and jacrev match the float64
    reference's Jacobian, and double backward passes gradgradcheck."""
    from tcae_kernels import flow_warp3d, warp3d, warp3d_naive

    gen = seeded("volume", op, padding)
    sign = -1.0 if op == "flow_warp3d" else 1.0
    fn = (lambda s, d: flow_warp3d(s, d, padding)) if op == "flow_warp3d" else (lambda s, d: warp3d(s, d, padding))

    def ref(s, d):
        return warp3d_naive(s, sign * d, padding)

    whole = torch.randint(-2, 3, (1, 3, 2, 2, 3), generator=gen).double()
    disp = whole + 0.2 + 0.6 * torch.rand(1, 3, 2, 2, 3, generator=gen, dtype=torch.float64)
    inputs = [torch.randn(1, 2, 3, 4, 3, generator=gen, dtype=torch.float64), disp]
    n_out = 2 * 2 * 2 * 3
    jac = reference_jacobian(ref, inputs)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    _, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
    assert rel_err(tangent.flatten(), reference_jvp(jac, tangents)) <= TOLERANCES[torch.float64][1]
    for got, want in zip(flat_jacobian(torch.func.jacrev(fn, argnums=(0, 1))(*inputs), n_out), jac):
        assert rel_err(got, want) <= TOLERANCES[torch.float64][1]
    assert torch.autograd.gradgradcheck(fn, tuple(t.clone().requires_grad_() for t in inputs))


@pytest.mark.parametrize("op", ["flow_warp_mask", "splat_softmax", "splat_average"])
def test_flow_warp_and_splat_every_mode(op):
    """flow_warp (with its mask) and splat route like the other ops: forward mode and jacrev
    match the float64 reference's Jacobian, and double backward passes gradgradcheck."""
    from tcae_kernels import flow_warp, splat, splat_naive

    gen = seeded("flow-splat", op)
    b, c, h, w = 1, 2, 3, 4
    whole = torch.randint(-1, 2, (b, 2, h, w), generator=gen).double()
    flow = whole + 0.2 + 0.6 * torch.rand(b, 2, h, w, generator=gen, dtype=torch.float64)
    src = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    if op == "flow_warp_mask":
        inputs = [src, flow]

        def fn(s, f):
            return torch.cat(flow_warp(s, f, return_mask=True), dim=1)

        def ref(s, f):
            return torch.cat((warp_naive(s, -f), warp_naive(torch.ones_like(s[:, :1]), -f)), dim=1)
    else:
        mode = op.split("_")[1]
        metric = torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
        inputs = [src, flow, metric] if mode == "softmax" else [src, flow]

        def fn(s, f, *m):
            return splat(s, f, mode, *m)

        def ref(s, f, *m):
            return splat_naive(s, f, mode, *m)

    n_out = ref(*inputs).numel()
    jac = reference_jacobian(ref, inputs)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    _, tangent = torch.func.jvp(fn, tuple(inputs), tuple(tangents))
    assert rel_err(tangent.flatten(), reference_jvp(jac, tangents)) <= TOLERANCES[torch.float64][1]
    argnums = tuple(range(len(inputs)))
    for got, want in zip(flat_jacobian(torch.func.jacrev(fn, argnums=argnums)(*inputs), n_out), jac):
        assert rel_err(got, want) <= TOLERANCES[torch.float64][1]
    assert torch.autograd.gradgradcheck(fn, tuple(t.clone().requires_grad_() for t in inputs))
