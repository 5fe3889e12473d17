"""The warp's kernels and fallback against the float64 reference (SPEC sections 1-4)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from tcae_kernels import warp, warp_grid_sample, warp_naive, warp_torch
from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import make_disp, rel_err

warp_module = importlib.import_module("tcae_kernels.ops.warp")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = {"kernels": warp, "fallback": warp_torch}
PADDINGS = ["zeros", "border"]
# (src shape, disp shape) with an empty batch, channel, output row or column, or source.
EMPTY_SHAPES = [
    ((0, 3, 4, 4), (0, 2, 4, 4)),
    ((2, 0, 4, 4), (2, 2, 4, 4)),
    ((2, 3, 4, 4), (2, 2, 0, 4)),
    ((2, 3, 4, 4), (2, 2, 4, 0)),
    ((2, 3, 0, 4), (2, 2, 3, 3)),
    ((2, 3, 4, 0), (2, 2, 3, 3)),
]

# (B, C, H_in, W_in, H, W): odd sizes, H or W = 1, C up to 33, src size ≠ out size.
SHAPES = [
    (2, 3, 9, 11, 9, 11),
    (1, 1, 1, 7, 1, 7),
    (2, 5, 6, 1, 6, 1),
    (3, 33, 5, 6, 7, 4),
    (1, 2, 8, 8, 5, 13),
]


def reference(src, disp, padding, grad_out):
    """Forward and both gradients of warp_naive in float64."""
    s = src.detach().double().requires_grad_()
    d = disp.detach().double().requires_grad_()
    out = warp_naive(s, d, padding)
    out.backward(grad_out.double())
    return out.detach(), s.grad, d.grad


def run(fn, src, disp, padding, grad_out):
    s = src.detach().clone().requires_grad_()
    d = disp.detach().clone().requires_grad_()
    out = fn(s, d, padding)
    out.backward(grad_out)
    return out.detach(), s.grad, d.grad


def check_against_reference(fn, src, disp, padding, gen):
    out_shape = (src.shape[0], src.shape[1], disp.shape[2], disp.shape[3])
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(src.dtype).to(src.device)
    out, gs, gd = run(fn, src, disp, padding, grad_out)
    ref, ref_gs, ref_gd = reference(src, disp, padding, grad_out)
    tol_fwd, tol_grad = TOL[src.dtype]
    assert out.dtype == src.dtype and out.shape == ref.shape
    assert gs.dtype == src.dtype and gd.dtype == disp.dtype
    assert rel_err(out, ref) <= tol_fwd
    assert rel_err(gs, ref_gs) <= tol_grad
    assert rel_err(gd, ref_gd) <= tol_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["small", "large", "integer", "half_integer", "far"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, impl, padding, dtype, kind, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((impl, padding, str(dtype), kind, shape)).encode()))
    b, c, h_in, w_in, h, w = shape
    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype).to(device)
    # Mixed precision: float32 δ beside a half or bfloat16 src.
    disp_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    disp = make_disp(kind, b, h, w, disp_dtype, device, gen)
    check_against_reference(IMPLS[impl], src, disp, padding, gen)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11, 9, 11), (3, 33, 5, 6, 7, 4)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_launch_configuration(monkeypatch, layout, padding, dtype, shape):
    """The interpreter normally takes several rows per program; here it runs the GPU's
    tiles (one row per program, GPU block sizes), so that layout is checked too."""
    monkeypatch.setattr(importlib.import_module("tcae_kernels.ops.launch"), "INTERPRET", False)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, padding, str(dtype), shape)).encode()))
    b, c, h_in, w_in, h, w = shape
    src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    disp = make_disp("large", b, h, w, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu", gen)
    check_against_reference(warp, src, disp, padding, gen)


@pytest.mark.parametrize("impl", IMPLS)
def test_border_gate_tested_on_exact_position(impl):
    """A δ of 2⁻³⁰ px puts x̂ a hair inside the border; in float32, x − δ rounds onto it.
    The gate must see the true position: δ keeps its gradient there (as the float64 reference)."""
    src = torch.arange(12.0).reshape(1, 2, 1, 6) ** 2  # the slope differs at each edge
    disp = torch.zeros(1, 2, 1, 6)
    disp[0, 0, 0, 5] = 2.0**-30  # x̂ = 5 − 2⁻³⁰: just inside the right border
    disp[0, 0, 0, 0] = -(2.0**-30)  # x̂ = 2⁻³⁰: just inside the left border
    grad_out = torch.ones(1, 2, 1, 6)
    _, _, gd = run(IMPLS[impl], src, disp, "border", grad_out)
    _, _, ref_gd = reference(src, disp, "border", grad_out)
    assert ref_gd[0, 0, 0, 5] != 0 and ref_gd[0, 0, 0, 0] != 0
    assert torch.allclose(gd.double(), ref_gd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_half_src_with_float32_disp(device, impl):
    gen = torch.Generator().manual_seed(7)
    src = torch.randn(2, 4, 10, 12, generator=gen).half().to(device)
    disp = make_disp("small", 2, 10, 12, torch.float32, device, gen)
    check_against_reference(IMPLS[impl], src, disp, "zeros", gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_float32_precision_far_from_origin(device, impl, padding):
    """Positions near 2000 px keep full float32 precision (weights are formed exactly)."""
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(1, 3, 4, 2048, generator=gen).to(device)
    disp = make_disp("small", 1, 4, 2048, torch.float32, device, gen)
    check_against_reference(IMPLS[impl], src, disp, padding, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_displacement(device, impl, padding, bad):
    gen = torch.Generator().manual_seed(11)
    src = torch.randn(2, 3, 7, 9, generator=gen).to(device)
    disp = make_disp("small", 2, 7, 9, torch.float32, device, gen)
    hit = torch.zeros(2, 7, 9, dtype=torch.bool)
    hit[0, 3, 4] = hit[1, 0, 0] = hit[1, 6, 8] = True
    disp[:, 0][hit.to(device)] = bad  # δx only: the whole pixel is still poisoned
    grad_out = torch.randn(2, 3, 7, 9, generator=gen).to(device)
    out, gs, gd = run(IMPLS[impl], src, disp, padding, grad_out)
    hit = hit.to(device)
    assert torch.isnan(out.permute(1, 0, 2, 3)[:, hit]).all()
    assert torch.isnan(gd.permute(1, 0, 2, 3)[:, hit]).all()
    assert torch.isfinite(out.permute(1, 0, 2, 3)[:, ~hit]).all()
    assert torch.isfinite(gs).all() and torch.isfinite(gd.permute(1, 0, 2, 3)[:, ~hit]).all()
    # Elsewhere: exactly the reference, where the poisoned pixels send nothing to src.
    clean = torch.where(hit.unsqueeze(1), torch.zeros_like(disp), disp)
    masked_g = grad_out.masked_fill(hit.unsqueeze(1), 0)
    ref, ref_gs, ref_gd = reference(src, clean, padding, masked_g)
    keep = ~hit
    assert rel_err(out.permute(1, 0, 2, 3)[:, keep], ref.permute(1, 0, 2, 3)[:, keep]) <= 1e-6
    assert rel_err(gs, ref_gs) <= 1e-5
    assert rel_err(gd.permute(1, 0, 2, 3)[:, keep], ref_gd.permute(1, 0, 2, 3)[:, keep]) <= 1e-5


def test_reference_non_finite_gives_nan():
    src = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    disp = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    disp[0, 1, 2, 2] = float("nan")
    out = warp_naive(src, disp)
    assert torch.isnan(out[0, :, 2, 2]).all()
    assert torch.isfinite(out).sum() == out.numel() - 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(impl, padding):
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    # Fractional parts kept away from integers, where the derivative jumps.
    whole = torch.randint(-3, 4, (2, 2, 3, 4), generator=gen).double()
    frac = 0.15 + 0.7 * torch.rand(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    disp = (whole + frac).requires_grad_()
    fn = IMPLS[impl]
    assert torch.autograd.gradcheck(lambda s, d: fn(s, d, padding), (src, disp), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_zero_displacement_is_identity(device, impl, padding, dtype):
    src = torch.randn(2, 4, 6, 7).to(dtype).to(device)
    disp = torch.zeros(2, 2, 6, 7, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    assert torch.equal(IMPLS[impl](src, disp, padding), src)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sx,sy", [(2, -1), (-3, 2), (0, 4)])
def test_integer_shift_is_shifted_copy(device, impl, sx, sy):
    src = torch.randn(2, 3, 8, 9, device=device)
    disp = torch.empty(2, 2, 8, 9, device=device)
    disp[:, 0], disp[:, 1] = sx, sy
    out = IMPLS[impl](src, disp, "zeros")
    # out[y, x] = src[y - sy, x - sx], zeros entering where that leaves src.
    expected = torch.zeros_like(src)
    ys, xs = slice(max(sy, 0), 8 + min(sy, 0)), slice(max(sx, 0), 9 + min(sx, 0))
    ys_src, xs_src = slice(max(-sy, 0), 8 + min(-sy, 0)), slice(max(-sx, 0), 9 + min(-sx, 0))
    expected[:, :, ys, xs] = src[:, :, ys_src, xs_src]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("padding", PADDINGS)
def test_grid_sample_reference_agrees_with_naive(padding):
    gen = torch.Generator().manual_seed(13)
    src = torch.randn(2, 3, 9, 10, generator=gen, dtype=torch.float64)
    disp = make_disp("large", 2, 7, 12, torch.float64, "cpu", gen) / 5
    grad_out = torch.randn(2, 3, 7, 12, generator=gen, dtype=torch.float64)
    out, gs, gd = run(warp_grid_sample, src, disp, padding, grad_out)
    ref, ref_gs, ref_gd = reference(src, disp, padding, grad_out)
    assert rel_err(out, ref) <= 1e-12
    assert rel_err(gs, ref_gs) <= 1e-10
    assert rel_err(gd, ref_gd) <= 1e-10


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fallback_agrees_with_kernels(padding, dtype):
    gen = torch.Generator().manual_seed(17)
    src = torch.randn(2, 6, 9, 10, generator=gen).to(dtype)
    disp = make_disp("large", 2, 9, 10, dtype if dtype == torch.float64 else torch.float32, "cpu", gen) / 5
    grad_out = torch.randn(2, 6, 9, 10, generator=gen).to(dtype)
    a = run(warp, src, disp, padding, grad_out)
    b = run(warp_torch, src, disp, padding, grad_out)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for x, y in zip(a, b):
        assert rel_err(x, y) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_strided_inputs(device, impl, layout):
    gen = torch.Generator().manual_seed(19)
    src = torch.randn(2, 5, 8, 9, generator=gen).to(device)
    disp = make_disp("small", 2, 8, 9, torch.float32, device, gen)
    if layout == "channels_last":
        s, d = src.to(memory_format=torch.channels_last), disp.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        s = torch.randn(2, 10, 8, 18, device=device)[:, ::2, :, ::2]
        s.copy_(src)
        d = torch.randn(2, 2, 8, 27, device=device)[..., ::3]
        d.copy_(disp)
    else:
        s = src.transpose(2, 3).contiguous().transpose(2, 3)
        d = disp.transpose(0, 1).contiguous().transpose(0, 1)
    assert not s.is_contiguous()
    grad_out = torch.randn(2, 5, 8, 9, generator=gen).to(device)
    out, gs, gd = run(IMPLS[impl], s, d, "zeros", grad_out.to(memory_format=torch.channels_last))
    ref, ref_gs, ref_gd = run(IMPLS[impl], src, disp, "zeros", grad_out)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gs, ref_gs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gd, ref_gd, rtol=1e-5, atol=1e-5)
    if layout == "channels_last" and impl == "kernels":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_only_where_required(device, impl):
    src = torch.randn(1, 2, 5, 5, device=device)
    disp = torch.randn(1, 2, 5, 5, device=device)
    s = src.clone().requires_grad_()
    out = IMPLS[impl](s, disp, "zeros")
    out.sum().backward()
    assert s.grad is not None and disp.grad is None
    d = disp.clone().requires_grad_()
    IMPLS[impl](src, d, "zeros").sum().backward()
    assert d.grad is not None and src.grad is None
    assert torch.allclose(d.grad, run(IMPLS[impl], src, disp, "zeros", torch.ones(1, 2, 5, 5, device=device))[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("src_shape,disp_shape", EMPTY_SHAPES)
def test_empty_sizes(device, impl, padding, src_shape, disp_shape):
    src = torch.randn(src_shape, device=device, requires_grad=True)
    disp = torch.randn(disp_shape, device=device, requires_grad=True)
    assert torch.equal(warp_naive(src.detach(), disp.detach(), padding), torch.zeros(0).new_zeros(
        src_shape[0], src_shape[1], disp_shape[2], disp_shape[3]).to(device))
    out = IMPLS[impl](src, disp, padding)
    assert out.shape == (src_shape[0], src_shape[1], disp_shape[2], disp_shape[3])
    assert (out == 0).all()  # a source without pixels gives zeros
    out.sum().backward()
    assert src.grad.shape == src.shape and disp.grad.shape == disp.shape
    assert (src.grad == 0).all() and (disp.grad == 0).all()


def test_cpu_without_interpreter_dispatches_to_fallback():
    """Without the interpreter each op's CPU kernel is the compiled CPU path (numba; the eager
    fallback without it), registered with torch.library: the ops run (a Triton launch on CPU
    would fail) and export as one node each. Importing the package does not import numba."""
    script = """
import sys
import torch
import tcae_kernels as tk
assert "numba" not in sys.modules  # imported at the first CPU call, not at start-up
from tcae_kernels import fallback
from tcae_kernels import cpu
assert tk.implementation("cpu") == ("numba" if cpu.available() else "pytorch"), tk.implementation("cpu")
src, disp = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5)
eager = fallback.warp_forward(src, disp, "zeros", False)
assert torch.allclose(tk.warp(src, disp), eager, rtol=1e-6, atol=1e-7)
class M(torch.nn.Module):
    def forward(self, s, d):
        return tk.warp(s, d).sum() + tk.merged_warp(s, d, -d, d[:, :1], -d[:, :1]).sum() + tk.warp_l1(s, d, s).sum()
graph = torch.export.export(M(), (src, disp)).graph
ops = [str(n.target) for n in graph.nodes if str(n.target).startswith("tcae_kernels")]
assert sorted(ops) == ["tcae_kernels.merged_warp.default", "tcae_kernels.warp.default",
                       "tcae_kernels.warp_l1.default"], ops
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_matches_grid_sample_align_corners_true():
    """SPEC: T equals grid_sample(align_corners=True) on the normalized grid."""
    gen = torch.Generator().manual_seed(23)
    src = torch.randn(2, 3, 9, 10, generator=gen, dtype=torch.float64)
    disp = torch.randn(2, 2, 9, 10, generator=gen, dtype=torch.float64) * 3
    ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(10.0), indexing="ij")
    grid = torch.stack((2 * (xs - disp[:, 0]) / 9 - 1, 2 * (ys - disp[:, 1]) / 8 - 1), dim=-1)
    expected = F.grid_sample(src, grid.double(), mode="bilinear", align_corners=True)
    assert rel_err(warp(src, disp), expected) <= 1e-12
