"""flow_warp (x + flow) and the validity mask, against the float64 reference and against the
warps of RAFT, PWC-Net and VoxelMorph, re-implemented here in plain PyTorch from their
documented semantics."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import fallback_on_cpu

from tcae_kernels import cpu, flow_warp, warp, warp_naive
from tcae_kernels.nn import FlowWarp
from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import make_disp, rel_err

warp_module = importlib.import_module("tcae_kernels.ops.warp")
PADDINGS = ["zeros", "border"]


def seeded(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def reference(src, flow, padding, grad_out, grad_mask):
    """Output, mask and the gradients of ⟨out, grad_out⟩ + ⟨mask, grad_mask⟩, float64 autograd:
    the flow warp is warp_naive at −flow, the mask warp_naive of a plane of ones."""
    s = src.detach().double().requires_grad_()
    f = flow.detach().double().requires_grad_()
    out = warp_naive(s, -f, padding)
    mask = warp_naive(torch.ones_like(s[:, :1]), -f, padding)
    ((out * grad_out.double()).sum() + (mask * grad_mask.double()).sum()).backward()
    return out.detach(), mask.detach(), s.grad, f.grad


def run(src, flow, padding, grad_out, grad_mask, **kw):
    s = src.detach().clone().requires_grad_()
    f = flow.detach().clone().requires_grad_()
    out, mask = flow_warp(s, f, padding, return_mask=True, **kw)
    ((out.double() * grad_out.double()).sum() + (mask.double() * grad_mask.double()).sum()).backward()
    return out.detach(), mask.detach(), s.grad, f.grad


@pytest.mark.parametrize("path", ["kernels", "fallback"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["small", "large", "far"])
def test_matches_reference(path, layout, padding, dtype, kind):
    gen = seeded(path, layout, padding, str(dtype), kind)
    b, c, h_in, w_in, h, w = 2, 5, 7, 9, 6, 10
    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    flow = make_disp(kind, b, h, w, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu", gen)
    grad_out = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    grad_mask = torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
    if path == "fallback":
        with fallback_on_cpu():
            got = run(src, flow, padding, grad_out, grad_mask)
    else:
        got = run(src, flow, padding, grad_out, grad_mask)
    want = reference(src, flow, padding, grad_out, grad_mask)
    tol_fwd, tol_grad = TOL[dtype]
    out, mask, gs, gf = got
    assert out.dtype == mask.dtype == gs.dtype == src.dtype and gf.dtype == flow.dtype
    assert mask.shape == (b, 1, h, w)
    for name, x, y, tol in zip(("out", "mask", "grad src", "grad flow"), got, want,
                               (tol_fwd, tol_fwd, tol_grad, tol_grad)):
        assert rel_err(x, y) <= tol, (name, rel_err(x, y))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_is_warp_of_the_negated_flow_bitwise(padding, deterministic):
    """x − (−f) is x + f exactly: flow_warp(s, f) and warp(s, −f) agree to the last bit,
    gradients included (∂L/∂flow = −∂L/∂δ)."""
    gen = seeded(padding, deterministic)
    src = torch.randn(2, 3, 8, 9, generator=gen).requires_grad_()
    flow = make_disp("large", 2, 8, 9, torch.float32, "cpu", gen).requires_grad_()
    g = torch.randn(2, 3, 8, 9, generator=gen)
    a = flow_warp(src, flow, padding, deterministic)
    ga = torch.autograd.grad(a, (src, flow), g)
    nflow = (-flow.detach()).requires_grad_()
    b = warp(src, nflow, padding, deterministic)
    gb = torch.autograd.grad(b, (src, nflow), g)
    assert torch.equal(a, b) and torch.equal(ga[0], gb[0]) and torch.equal(ga[1], -gb[1])


def test_gradcheck_with_mask():
    gen = seeded("gradcheck")
    src = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    whole = torch.randint(-3, 4, (1, 2, 3, 4), generator=gen).double()
    flow = (whole + 0.15 + 0.7 * torch.rand(1, 2, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    # Fast mode (random projections of the Jacobian): the interpreter pays per call.
    for fn in (flow_warp, warp):
        assert torch.autograd.gradcheck(lambda s, f, fn=fn: fn(s, f, return_mask=True), (src, flow), eps=1e-6,
                                        atol=1e-7, fast_mode=True)


def test_mask_is_warped_ones_and_in_unit_interval():
    gen = seeded("mask")
    flow = make_disp("large", 2, 9, 11, torch.float32, "cpu", gen)
    src = torch.randn(2, 3, 9, 11, generator=gen)
    _, mask = flow_warp(src, flow, return_mask=True)
    ones = flow_warp(torch.ones(2, 1, 9, 11), flow)
    assert torch.allclose(mask, ones, atol=1e-6) and (mask >= 0).all() and (mask <= 1).all()
    assert (mask == 0).any() and (mask == 1).any()  # the field leaves src in places
    _, mask_b = flow_warp(src, flow, "border", return_mask=True)
    assert torch.equal(mask_b, torch.ones_like(mask_b))
    # warp's mask is flow_warp's at −δ.
    assert torch.equal(warp(src, -flow, return_mask=True)[1], mask)


def test_non_finite_flow_gives_nan_mask():
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 1, 1, 2] = float("nan")
    out, mask = flow_warp(torch.randn(1, 2, 3, 4), flow, return_mask=True)
    assert torch.isnan(mask[0, 0, 1, 2]) and torch.isnan(out[0, :, 1, 2]).all()
    assert torch.isfinite(mask).sum() == 11


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
@pytest.mark.parametrize("kind", ["large", "far"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_compiled_cpu_path(padding, dtype, kind):
    """The op's CPU kernel without the interpreter (numba loops), called directly."""
    gen = seeded("cpu", padding, str(dtype), kind)
    src = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64).to(dtype)
    flow = make_disp(kind, 2, 6, 8, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu", gen)
    grad_out = torch.randn(2, 3, 6, 8, generator=gen, dtype=torch.float64)
    grad_mask = torch.randn(2, 1, 6, 8, generator=gen, dtype=torch.float64)
    out, mask = warp_module._cpu_variant_forward(src, flow, padding, False, True, True)
    gs, gf = warp_module._cpu_variant_backward(
        grad_out.to(dtype), grad_mask.to(dtype), src, flow, padding, True, True, False, True, True
    )
    want = reference(src, flow, padding, grad_out.to(dtype), grad_mask.to(dtype))
    tol_fwd, tol_grad = TOL[dtype]
    for x, y, tol in zip((out, mask, gs, gf), want, (tol_fwd, tol_fwd, tol_grad, tol_grad)):
        assert rel_err(x, y) <= tol


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
def test_compiled_cpu_path_non_finite_and_empty_source():
    flow = torch.zeros(2, 2, 3, 3)
    flow[1, 0, 2, 1] = float("nan")
    grad_mask = torch.ones(2, 1, 3, 3)
    for src in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 0, 4)):
        _, mask = warp_module._cpu_variant_forward(src, flow, "zeros", False, True, True)
        _, gf = warp_module._cpu_variant_backward(
            torch.ones(2, 3, 3, 3), grad_mask, src, flow, "zeros", False, True, False, True, True
        )
        # The Triton kernels' mask (interpreter) for the same inputs.
        want_mask = warp_module._variant_forward(src, flow, "zeros", False, True, True)[1]
        assert torch.isnan(mask[1, 0, 2, 1]) and torch.isnan(gf[1, :, 2, 1]).all()
        assert torch.equal(mask.nan_to_num(), want_mask.nan_to_num())
        if src.shape[2] == 0:
            assert (mask.nan_to_num() == 0).all() and (gf.nan_to_num() == 0).all()


# The anchors: each model's warp as its code computes it (normalized grid, grid_sample).


def _base_grid(b: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys)).expand(b, 2, h, w)


def raft_warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """RAFT (core/utils/utils.py): coords = coords_grid + flow; bilinear_sampler normalizes
    x to 2x/(W−1) − 1 and calls grid_sample(align_corners=True), zeros outside."""
    b, _, h, w = img.shape
    coords = _base_grid(b, h, w, flow.dtype) + flow
    xgrid = 2 * coords[:, 0] / (w - 1) - 1
    ygrid = 2 * coords[:, 1] / (h - 1) - 1
    return F.grid_sample(img, torch.stack((xgrid, ygrid), dim=-1), align_corners=True)


def pwcnet_warp(x: torch.Tensor, flo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PWC-Net (PyTorch/models/PWCNet.py, warp): vgrid = grid + flo, normalized with
    max(W − 1, 1), grid_sample; the mask is grid_sample of ones (before PWC-Net
    thresholds it at 0.9999). Returns (output before masking, mask)."""
    b, _, h, w = x.shape
    vgrid = _base_grid(b, h, w, flo.dtype) + flo
    gx = 2.0 * vgrid[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * vgrid[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    output = F.grid_sample(x, grid, align_corners=True)
    mask = F.grid_sample(torch.ones_like(x[:, :1]), grid, align_corners=True)
    return output, mask


def voxelmorph_warp(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's 2-D SpatialTransformer (voxelmorph/torch/layers.py): new_locs = grid + flow
    with channel 0 along H (rows), normalized by 2(p/(size − 1) − 0.5), channels reversed to
    (x, y) for grid_sample(align_corners=True, mode="bilinear")."""
    b, _, h, w = src.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    new_locs = torch.stack((ys, xs)).expand(b, 2, h, w) + flow
    shape = (h, w)
    new_locs = torch.stack([2 * (new_locs[:, i] / (shape[i] - 1) - 0.5) for i in range(2)], dim=1)
    new_locs = new_locs.permute(0, 2, 3, 1)[..., [1, 0]]
    return F.grid_sample(src, new_locs, align_corners=True, mode="bilinear")


def _anchor_check(ours, theirs, leaves, gen, dtype):
    """Forward and every gradient within SPEC's tolerance for dtype."""
    g = torch.randn(ours.shape, generator=gen, dtype=torch.float64).to(dtype)
    # Graphs kept: the output and the mask share theirs.
    got = torch.autograd.grad(ours, leaves, g, retain_graph=True)
    want = torch.autograd.grad(theirs, leaves, g, retain_graph=True)
    tol_fwd, tol_grad = TOL[dtype]
    assert rel_err(ours, theirs) <= tol_fwd
    for x, y in zip(got, want):
        assert rel_err(x, y) <= tol_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reproduces_raft(dtype):
    gen = seeded("raft", str(dtype))
    img = torch.randn(2, 4, 12, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    flow = make_disp("large", 2, 12, 16, dtype, "cpu", gen).div(5).requires_grad_()
    _anchor_check(flow_warp(img, flow), raft_warp(img, flow), (img, flow), gen, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reproduces_pwcnet_with_mask(dtype):
    gen = seeded("pwcnet", str(dtype))
    x = torch.randn(2, 3, 10, 13, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    flo = make_disp("large", 2, 10, 13, dtype, "cpu", gen).div(5).requires_grad_()
    out, mask = flow_warp(x, flo, return_mask=True)
    ref_out, ref_mask = pwcnet_warp(x, flo)
    _anchor_check(out, ref_out, (x, flo), gen, dtype)
    _anchor_check(mask, ref_mask, (flo,), gen, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reproduces_voxelmorph(dtype):
    gen = seeded("voxelmorph", str(dtype))
    src = torch.randn(2, 1, 11, 14, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    flow_yx = make_disp("large", 2, 11, 14, dtype, "cpu", gen).div(5).requires_grad_()  # VoxelMorph: (dy, dx)
    ours = FlowWarp()(src, flow_yx.flip(1))
    _anchor_check(ours, voxelmorph_warp(src, flow_yx), (src, flow_yx), gen, dtype)


def test_module_and_errors():
    m = FlowWarp("border", return_mask=True)
    out, mask = m(torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert out.shape == (1, 2, 3, 4) and mask.shape == (1, 1, 3, 4)
    with pytest.raises(ValueError, match="flow"):
        flow_warp(torch.randn(1, 2, 3, 4), torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match="padding"):
        flow_warp(torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), "reflect")


def test_custom_op_compiles_fullgraph():
    """One graph through dynamo and AOT autograd (the op's fake kernels), forward and backward."""
    gen = seeded("compile")
    src = torch.randn(1, 2, 5, 6, generator=gen)
    flow = torch.randn(1, 2, 5, 6, generator=gen)

    def f(s, fl):
        out, mask = flow_warp(s, fl, return_mask=True)
        return (out * mask).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        s, fl = src.clone().requires_grad_(), flow.clone().requires_grad_()
        fn(s, fl).backward()
        grads.append((s.grad, fl.grad))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference(padding, dtype, layout, deterministic):
    """The Triton kernels on a GPU, compiled (not interpreted): flow_warp with its mask."""
    gen = seeded("cuda", padding, str(dtype), layout, deterministic)
    b, c, h_in, w_in, h, w = 2, 5, 37, 41, 33, 45
    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    flow = make_disp("large", b, h, w, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu", gen)
    grad_out = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    grad_mask = torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
    got = run(src.cuda(), flow.cuda(), padding, grad_out.cuda(), grad_mask.cuda(), deterministic=deterministic)
    want = reference(src, flow, padding, grad_out, grad_mask)
    tol_fwd, tol_grad = TOL[dtype]
    for name, x, y, tol in zip(("out", "mask", "grad src", "grad flow"), got, want,
                               (tol_fwd, tol_fwd, tol_grad, tol_grad)):
        assert rel_err(x.cpu(), y) <= tol, (name, rel_err(x.cpu(), y))
