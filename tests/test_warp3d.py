"""The 3-D warp's kernels, eager fallback and compiled CPU loops against the float64 reference
(SPEC sections 1-4 in 3-D)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import fallback_on_cpu
from tcae_kernels import cpu, cpu3d, flow_warp3d, warp3d
from tcae_kernels.reference import warp3d_naive
from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import make_disp, rel_err

PADDINGS = ["zeros", "border"]
# src [B, C, D_in, H_in, W_in] and output size (D, H, W): odd sizes, src size ≠ output size.
SRC, OUT = (2, 3, 4, 5, 6), (3, 5, 7)


@pytest.fixture(params=["kernels", "fallback", "numba"])
def impl(request):
    """{flow: the warp, "name": its name} through the Triton kernels (interpreter), the PyTorch fallback, or the
    compiled CPU loops (called directly: under the interpreter the op dispatches to Triton)."""
    if request.param == "numba":
        if not cpu.available():
            pytest.skip("numba is not installed")

        def numba_warp(flow):
            return lambda s, d, padding="zeros", deterministic=None: cpu3d.warp3d(s, d, padding, flow)

        yield {False: numba_warp(False), True: numba_warp(True), "name": request.param}
    elif request.param == "fallback":
        with fallback_on_cpu():
            yield {False: warp3d, True: flow_warp3d, "name": request.param}
    else:
        yield {False: warp3d, True: flow_warp3d, "name": request.param}


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_disp3d(kind: str, b: int, size: tuple[int, int, int], dtype: torch.dtype, gen: torch.Generator):
    """[B, 3, D, H, W] voxels, each component drawn as testing.make_disp draws one (same kinds)."""
    d, h, w = size
    return make_disp(kind, 3 * b, d * h, w, dtype, "cpu", gen)[:, 0].reshape(b, 3, d, h, w)


def reference(src, disp, padding, grad_out, flow=False):
    """Forward and both gradients of warp3d_naive in float64 on the CPU (at x + disp when ``flow``)."""
    s = src.detach().cpu().double().requires_grad_()
    d = disp.detach().cpu().double().requires_grad_()
    out = warp3d_naive(s, -d if flow else d, padding)
    out.backward(grad_out.cpu().double())
    return out.detach(), s.grad, d.grad


def run(fn, src, disp, padding, grad_out, **kwargs):
    s = src.detach().clone().requires_grad_()
    d = disp.detach().clone().requires_grad_()
    out = fn(s, d, padding, **kwargs)
    out.backward(grad_out)
    return out.detach(), s.grad, d.grad


def check(impl, src, disp, padding, gen, flow=False):
    out_shape = (src.shape[0], src.shape[1], *disp.shape[2:])
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(src.dtype).to(src.device)
    out, gs, gd = (t.cpu() for t in run(impl[flow], src, disp, padding, grad_out))
    ref, ref_gs, ref_gd = reference(src, disp, padding, grad_out, flow)
    tol_fwd, tol_grad = TOL[src.dtype]
    assert out.dtype == src.dtype and out.shape == ref.shape
    assert gs.dtype == src.dtype and gd.dtype == disp.dtype
    assert rel_err(out, ref) <= tol_fwd
    assert rel_err(gs, ref_gs) <= tol_grad
    assert rel_err(gd, ref_gd) <= tol_grad


def inputs(key, dtype=torch.float32, kind="large"):
    gen = seeded(*key)
    src = torch.randn(SRC, generator=gen, dtype=torch.float64).to(dtype)
    # Mixed precision: float32 δ beside a bfloat16 src.
    disp = make_disp3d(kind, SRC[0], OUT, torch.float32 if dtype == torch.bfloat16 else dtype, gen)
    return src, disp, gen


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", ["small", "large", "integer", "half_integer", "far"])
def test_matches_reference(impl, padding, kind):
    src, disp, gen = inputs((impl["name"], padding, kind), kind=kind)
    check(impl, src, disp, padding, gen)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_match_reference(impl, padding, dtype):
    src, disp, gen = inputs((impl["name"], padding, str(dtype)), dtype)
    check(impl, src, disp, padding, gen)


@pytest.mark.parametrize("padding", PADDINGS)
def test_flow_is_the_negated_displacement(impl, padding):
    """flow_warp3d samples at x + flow: warp3d_naive at −flow, gradients negated."""
    src, flow, gen = inputs((impl["name"], padding, "flow"))
    check(impl, src, flow, padding, gen, flow=True)


@pytest.mark.parametrize("layout,dtype", [("ncdhw", torch.float32), ("channels_last_3d", torch.bfloat16)])
def test_gpu_launch_configuration(monkeypatch, layout, dtype):
    """The GPU's tiles (one row per program, GPU block sizes) under the interpreter,
    in both layouts (channels_last_3d runs channel tiles)."""
    monkeypatch.setattr(importlib.import_module("tcae_kernels.ops.launch"), "INTERPRET", False)
    src, disp, gen = inputs((layout, str(dtype)), dtype)
    if layout == "channels_last_3d":
        src = src.contiguous(memory_format=torch.channels_last_3d)
    check({False: warp3d}, src, disp, "border", gen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flow", [False, True])
def test_cuda_matches_reference(layout, padding, dtype, flow):
    """The Triton kernels on a GPU (the CPU cases above run them through the interpreter)."""
    src, disp, gen = inputs(("cuda", layout, padding, str(dtype), flow), dtype)
    src, disp = src.cuda(), disp.cuda()
    if layout == "channels_last_3d":
        src = src.contiguous(memory_format=torch.channels_last_3d)
    check({False: warp3d, True: flow_warp3d}, src, disp, padding, gen, flow)
    if dtype == torch.float32:
        grad_out = torch.randn(SRC[:2] + OUT, device="cuda")
        first, again = (run(warp3d, src, disp, padding, grad_out, deterministic=True)[1] for _ in range(2))
        assert torch.equal(first, again)


def test_channels_last_3d_result_and_strided_inputs(impl):
    src, disp, gen = inputs(("strided", impl["name"]))
    grad_out = torch.randn(SRC[:2] + OUT, generator=gen)
    ref = run(impl[False], src, disp, "zeros", grad_out)
    s = src.contiguous(memory_format=torch.channels_last_3d)
    d = torch.zeros(SRC[0], 3, *OUT[:2], 2 * OUT[2])[..., ::2]
    d.copy_(disp)
    got = run(impl[False], s, d, "zeros", grad_out)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)


def test_border_gate_tested_on_exact_position(impl):
    """δz = ±2⁻³⁰ puts ẑ a hair inside the border; in float32, z − δz rounds onto it. The gate
    must see the true position: δz keeps its gradient there (as the float64 reference)."""
    src = (torch.arange(2 * 4 * 2 * 2.0).reshape(1, 2, 4, 2, 2)) ** 2  # the slope differs at each edge
    disp = torch.zeros(1, 3, 4, 2, 2)
    disp[0, 2, 3] = 2.0**-30  # ẑ = 3 − 2⁻³⁰: just inside the far border
    disp[0, 2, 0] = -(2.0**-30)  # ẑ = 2⁻³⁰: just inside the near border
    grad_out = torch.ones(1, 2, 4, 2, 2)
    _, _, gd = run(impl[False], src, disp, "border", grad_out)
    _, _, ref_gd = reference(src, disp, "border", grad_out)
    assert (ref_gd[0, 2, 0] != 0).all() and (ref_gd[0, 2, 3] != 0).all()
    assert torch.allclose(gd.double(), ref_gd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_non_finite_displacement(impl, padding):
    src, disp, gen = inputs(("nan", impl["name"], padding), kind="small")
    hit = torch.zeros(SRC[0], *OUT, dtype=torch.bool)
    hit[0, 1, 2, 3] = hit[1, 0, 0, 0] = hit[1, 2, 4, 6] = True
    disp[:, 2][hit] = float("nan")  # δz only: the whole voxel is still poisoned
    disp[1, 0, 1, 1, 1] = float("inf")
    hit[1, 1, 1, 1] = True
    grad_out = torch.randn(SRC[:2] + OUT, generator=gen)
    out, gs, gd = run(impl[False], src, disp, padding, grad_out)
    assert torch.isnan(out.movedim(1, 0)[:, hit]).all() and torch.isnan(gd.movedim(1, 0)[:, hit]).all()
    assert torch.isfinite(out.movedim(1, 0)[:, ~hit]).all() and torch.isfinite(gs).all()
    # Elsewhere: the reference, where the poisoned voxels send nothing to src.
    clean = torch.where(hit.unsqueeze(1), torch.zeros_like(disp), disp)
    ref, ref_gs, ref_gd = reference(src, clean, padding, grad_out.masked_fill(hit.unsqueeze(1), 0))
    assert rel_err(out.movedim(1, 0)[:, ~hit], ref.movedim(1, 0)[:, ~hit]) <= 1e-6
    assert rel_err(gs, ref_gs) <= 1e-5
    assert rel_err(gd.movedim(1, 0)[:, ~hit], ref_gd.movedim(1, 0)[:, ~hit]) <= 1e-5


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(impl, flow, padding):
    gen = seeded("gradcheck", flow, padding)
    fn = impl[flow]
    src = torch.randn(1, 2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    # Fractional parts kept away from integers, where the derivative jumps.
    whole = torch.randint(-2, 3, (1, 3, 2, 3, 3), generator=gen).double()
    frac = 0.15 + 0.7 * torch.rand(1, 3, 2, 3, 3, generator=gen, dtype=torch.float64)
    disp = (whole + frac).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: fn(s, d, padding), (src, disp), eps=1e-6, atol=1e-7,
                                    fast_mode=True)


def test_deterministic_src_gradient(impl):
    """Fixed-point accumulation: within SPEC's tolerance, and the same bits on every run."""
    src, disp, gen = inputs(("det", impl["name"]), kind="small")
    grad_out = torch.randn(SRC[:2] + OUT, generator=gen)
    first = run(impl[False], src, disp, "zeros", grad_out, deterministic=True)
    again = run(impl[False], src, disp, "zeros", grad_out, deterministic=True)
    ref = reference(src, disp, "zeros", grad_out)
    assert torch.equal(first[1], again[1])
    assert rel_err(first[1], ref[1]) <= TOL[torch.float32][1]


def test_gradients_only_where_required(impl):
    src, disp, _ = inputs(("required", impl["name"]), kind="small")
    s = src.clone().requires_grad_()
    impl[False](s, disp).sum().backward()
    assert s.grad is not None and disp.grad is None
    d = disp.clone().requires_grad_()
    impl[False](src, d).sum().backward()
    assert d.grad is not None and src.grad is None
    assert torch.allclose(d.grad, run(impl[False], src, disp, "zeros", torch.ones(SRC[:2] + OUT))[2])


@pytest.mark.parametrize("src_shape,disp_shape", [
    ((0, 3, 4, 4, 4), (0, 3, 4, 4, 4)),
    ((2, 0, 4, 4, 4), (2, 3, 4, 4, 4)),
    ((2, 3, 4, 4, 4), (2, 3, 0, 4, 4)),
    ((2, 3, 0, 4, 4), (2, 3, 3, 3, 3)),
])
def test_empty_sizes(impl, src_shape, disp_shape):
    src = torch.randn(src_shape, requires_grad=True)
    disp = torch.randn(disp_shape, requires_grad=True)
    out = impl[False](src, disp)
    assert out.shape == (*src_shape[:2], *disp_shape[2:])
    assert (out == 0).all()  # a source without voxels gives zeros
    out.sum().backward()
    assert src.grad.shape == src.shape and disp.grad.shape == disp.shape
    assert (src.grad == 0).all() and (disp.grad == 0).all()


def test_matches_grid_sample_3d():
    """warp3d equals grid_sample(align_corners=True) on the normalized grid; VoxelMorph's flow
    (channels in (D, H, W) order, x + flow) is flow_warp3d's after flip(1)."""
    gen = seeded("grid_sample")
    src = torch.randn(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64)
    flow_dhw = torch.randn(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64) * 2
    zs, ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), torch.arange(7.0), indexing="ij")
    pos = [zs + flow_dhw[:, 0], ys + flow_dhw[:, 1], xs + flow_dhw[:, 2]]
    grid = torch.stack([2 * p / (n - 1) - 1 for p, n in zip(pos, (5, 6, 7))][::-1], dim=-1)
    expected = F.grid_sample(src, grid.double(), mode="bilinear", align_corners=True)
    assert rel_err(flow_warp3d(src, flow_dhw.flip(1)), expected) <= 1e-12
    assert rel_err(warp3d(src, -flow_dhw.flip(1)), expected) <= 1e-12


@pytest.mark.parametrize("src_shape,disp_shape,padding,error,match", [
    ((2, 3, 4, 4), (2, 3, 4, 4, 4), "zeros", ValueError, "src must be 5-D"),
    ((2, 3, 4, 4, 4), (2, 2, 4, 4, 4), "zeros", ValueError, "disp must have 3 channels"),
    ((2, 3, 4, 4, 4), (1, 3, 4, 4, 4), "zeros", ValueError, "disp batch size"),
    ((2, 3, 4, 4, 4), (2, 3, 4, 4, 4), "reflect", ValueError, "padding must be one of"),
])
def test_bad_arguments(src_shape, disp_shape, padding, error, match):
    with pytest.raises(error, match=match):
        warp3d(torch.zeros(src_shape), torch.zeros(disp_shape), padding)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="flow dtype must be torch.float32"):
        flow_warp3d(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="src must be floating point"):
        warp3d(torch.zeros(1, 1, 2, 2, 2, dtype=torch.int32), torch.zeros(1, 3, 2, 2, 2))


def test_volume_warp_module():
    from tcae_kernels.nn import VolumeWarp

    src, disp, _ = inputs(("module",), kind="small")
    assert torch.equal(VolumeWarp("border")(src, disp), warp3d(src, disp, "border"))
    assert torch.equal(VolumeWarp(flow=True)(src, disp), flow_warp3d(src, disp))
    assert "flow=True" in repr(VolumeWarp(flow=True))


def test_cpu_without_interpreter_runs_compiled_loops_and_exports():
    """Without the interpreter the op's CPU kernel is the compiled loops (numba; the eager
    fallback without it), and torch.export sees one node."""
    script = """
import torch
import tcae_kernels as tk
from tcae_kernels import fallback
torch.manual_seed(0)
src, disp = torch.randn(1, 2, 3, 4, 5), torch.randn(1, 3, 3, 4, 5)
assert torch.allclose(tk.flow_warp3d(src, disp), fallback.warp3d_forward(src, disp, "zeros", True, False),
                      rtol=1e-6, atol=1e-7)
class M(torch.nn.Module):
    def forward(self, s, d):
        return tk.warp3d(s, d, "border")
graph = torch.export.export(M(), (src, disp)).graph
print([str(n.target) for n in graph.nodes if str(n.target).startswith("tcae_kernels")])
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['tcae_kernels.warp3d.default']"


def test_64_bit_offset_path(monkeypatch):
    """The kernels' int64 indexing, forced on small tensors, gives the same results."""
    src, disp, gen = inputs(("idx64",), kind="large")
    grad_out = torch.randn(SRC[:2] + OUT, generator=gen)
    narrow = run(warp3d, src, disp, "border", grad_out)
    monkeypatch.setattr(importlib.import_module("tcae_kernels.ops.warp3d"), "needs_int64", lambda *t: True)
    for a, b in zip(run(warp3d, src, disp, "border", grad_out), narrow):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with 5 GB free")
def test_past_2_31_elements_cuda():
    """A [1, 1, S, S, S] float16 volume, S³ > 2**31, sampled in its far corner."""
    side = 1291
    src = torch.empty(1, 1, side, side, side, dtype=torch.float16, device="cuda")
    patch = torch.randn(1, 1, 4, 4, 4, generator=seeded("huge")).half()
    src[..., -4:, -4:, -4:] = patch.cuda()
    disp = torch.full((1, 3, 2, 2, 2), -(side - 3.5), device="cuda", requires_grad=True)
    out = warp3d(src, disp)
    d = torch.full((1, 3, 2, 2, 2), -0.5, dtype=torch.float64, requires_grad=True)
    expected = warp3d_naive(patch.double(), d)
    assert rel_err(out.cpu(), expected) <= 2e-3
    out.sum().backward()
    expected.sum().backward()
    assert rel_err(disp.grad.cpu(), d.grad) <= 5e-3
