"""splat (forward warping, x + flow) against its float64 reference, in every mode, with
gradients for src, flow and metric."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from conftest import fallback_on_cpu

from tcae_kernels import cpu, flow_warp, splat, splat_naive
from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import make_disp, rel_err

splat_module = importlib.import_module("tcae_kernels.ops.splat")
MODES = ["sum", "average", "linear", "softmax"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def seeded(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def inputs(mode, dtype, gen, shape=(2, 3, 7, 9), kind="small"):
    b, _, h, w = shape
    src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    field_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    flow = make_disp(kind, b, h, w, field_dtype, "cpu", gen)
    metric = None
    if mode == "linear":
        metric = (0.1 + torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)).to(field_dtype)
    elif mode == "softmax":
        metric = (2 * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)).to(field_dtype)
    return src, flow, metric


def run(fn, src, flow, mode, metric, grad_out, **kw):
    """Output and the gradients of ⟨out, grad_out⟩ for src, flow and (if any) metric."""
    leaves = [src.detach().clone().requires_grad_(), flow.detach().clone().requires_grad_()]
    if metric is not None:
        leaves.append(metric.detach().clone().requires_grad_())
    out = fn(leaves[0], leaves[1], mode, leaves[2] if metric is not None else None, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), list(grads)


def reference(src, flow, mode, metric, grad_out):
    return run(splat_naive, src.double(), flow.double(), mode, None if metric is None else metric.double(),
               grad_out.double())


def check(got, want, dtype):
    tol_fwd, tol_grad = TOL[dtype]
    (out, grads), (ref, ref_grads) = got, want
    assert rel_err(out, ref) <= tol_fwd, ("out", rel_err(out, ref))
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, r) <= tol_grad, (("src", "flow", "metric")[k], rel_err(g, r))


@pytest.mark.parametrize("path", ["kernels", "fallback"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(path, dtype, mode):
    gen = seeded(path, str(dtype), mode)
    src, flow, metric = inputs(mode, dtype, gen)
    grad_out = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    if path == "fallback":
        with fallback_on_cpu():
            got = run(splat, src, flow, mode, metric, grad_out)
    else:
        got = run(splat, src, flow, mode, metric, grad_out)
    assert got[0].dtype == dtype and [g.dtype for g in got[1]] == [t.dtype for t in (src, flow, metric) if t is not None]
    check(got, reference(src, flow, mode, metric, grad_out), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_and_far_flow(mode, layout):
    """Strided src, a flow whose values land far outside (1e6 and −1e30 px), more channels."""
    gen = seeded(mode, layout)
    src, flow, metric = inputs(mode, torch.float32, gen, shape=(2, 33, 5, 6), kind="far")
    if layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    else:
        src = torch.cat((src, src), dim=3)[..., ::2]
    grad_out = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    got = run(splat, src, flow, mode, metric, grad_out)
    check(got, reference(src, flow, mode, metric, grad_out), torch.float32)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_is_bitwise_repeatable(mode):
    gen = seeded("det", mode)
    src, flow, metric = inputs(mode, torch.float32, gen, shape=(2, 4, 9, 10), kind="large")
    flow = flow / 10  # many pixels land on the same target
    a = splat(src, flow, mode, metric, deterministic=True)
    b = splat(src, flow, mode, metric, deterministic=True)
    assert torch.equal(a, b)
    ref = splat_naive(src.double(), flow.double(), mode, None if metric is None else metric.double())
    assert rel_err(a, ref) <= TOL[torch.float32][0]


@pytest.mark.parametrize("path", ["kernels", "fallback"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(path, mode):
    gen = seeded("gradcheck", path, mode)
    src, _, metric = inputs(mode, torch.float64, gen, shape=(1, 2, 3, 4))
    # Fractional parts kept away from integers, where the derivative jumps.
    whole = torch.randint(-2, 3, (1, 2, 3, 4), generator=gen).double()
    flow = whole + 0.15 + 0.7 * torch.rand(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    leaves = [src.requires_grad_(), flow.requires_grad_()] + ([metric.requires_grad_()] if metric is not None else [])

    def fn(s, f, *m):
        return splat(s, f, mode, m[0] if m else None)

    if path == "fallback":
        with fallback_on_cpu():
            assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    else:
        # Fast mode (random projections of the Jacobian): the interpreter pays per call.
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_zero_flow_and_empty_targets(mode):
    gen = seeded("zero", mode)
    src, flow, metric = inputs(mode, torch.float32, gen)
    # Each pixel lands on itself alone: every mode returns src (z·src / z).
    assert torch.allclose(splat(src, torch.zeros_like(flow), mode, metric), src, rtol=1e-6, atol=1e-6)
    # Everything lands outside: the normalized modes divide 0 by 0 and give 0, not NaN.
    away = torch.full_like(flow, 100.0)
    assert torch.equal(splat(src, away, mode, metric), torch.zeros_like(src))


def test_softmax_is_stable_for_large_metrics():
    gen = seeded("large metric")
    src, flow, metric = inputs("softmax", torch.float32, gen)
    a = splat(src, flow, "softmax", metric)
    b = splat(src, flow, "softmax", metric + 1000.0)  # exp(1000) overflows float32 and float64
    assert torch.isfinite(b).all() and rel_err(b, a) <= 1e-5


def test_non_finite_flow_sends_nothing():
    gen = seeded("nan")
    src, flow, metric = inputs("softmax", torch.float32, gen)
    flow[0, 0, 2, 3] = float("nan")
    flow[1, 1, 0, 0] = float("inf")
    grad_out = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    out, (gs, gf, gm) = run(splat, src, flow, "softmax", metric, grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gf).all()
    assert (gf[0, :, 2, 3] == 0).all() and (gs[0, :, 2, 3] == 0).all() and gm[0, 0, 2, 3] == 0
    # The rest is the reference with those pixels absent (zero importance via a huge negative metric).
    clean = torch.where(torch.isfinite(flow), flow, 0.0)
    m = metric.clone()
    m[0, 0, 2, 3] = m[1, 0, 0, 0] = -1e4
    ref = splat_naive(src.double(), clean.double(), "softmax", m.double())
    assert rel_err(out, ref) <= 1e-6


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_cpu_path(mode, dtype):
    """The op's CPU kernels without the interpreter (numba loops), called directly."""
    gen = seeded("cpu", mode, str(dtype))
    src, flow, metric = inputs(mode, dtype, gen, shape=(2, 4, 7, 9))
    if dtype == torch.float32:
        src = src.contiguous(memory_format=torch.channels_last)
    m = metric if metric is not None else src.new_empty(0)
    grad_out = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    out, den = splat_module._cpu_forward(src, flow, m, mode, False)
    grads = splat_module._cpu_backward(grad_out.to(dtype), src, flow, m, out, den, mode, True, True, metric is not None)
    got = (out, list(grads[:3] if metric is not None else grads[:2]))
    check(got, reference(src, flow, mode, metric, grad_out.to(dtype)), dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == (dtype == torch.float32)


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
@pytest.mark.parametrize("mode", MODES)
def test_compiled_cpu_backward_only_what_is_asked(mode):
    """Each subset of gradients equals the full backward's, and no two results share storage with
    each other or an input: torch.library rejects such outputs (it did for flow's gradient alone)."""
    gen = seeded("cpu-needs", mode)
    src, flow, metric = inputs(mode, torch.float32, gen, shape=(2, 3, 5, 6))
    m = metric if metric is not None else src.new_empty(0)
    grad_out = torch.randn(src.shape, generator=gen)
    out, den = splat_module._cpu_forward(src, flow, m, mode, False)
    args = (grad_out, src, flow, m, out, den, mode)
    full = splat_module._cpu_backward(*args, True, True, metric is not None)
    for need in [(s, f, g) for s in (False, True) for f in (False, True) for g in (False, metric is not None)]:
        got = splat_module._cpu_backward(*args, *need)
        for k in range(3):
            assert torch.equal(got[k], full[k]) if need[k] else got[k].numel() == 0, (need, k)
        storages = [t.untyped_storage()._cdata for t in (*args[:6], *got)]
        assert len(set(storages)) == len(storages), need


def test_errors():
    src, flow = torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="mode"):
        splat(src, flow, "max")
    with pytest.raises(ValueError, match="metric is required"):
        splat(src, flow, "softmax")
    with pytest.raises(ValueError, match="metric must be None"):
        splat(src, flow, "sum", torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="flow"):
        splat(src, torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="metric must have shape"):
        splat(src, flow, "linear", torch.zeros(1, 2, 3, 4))
    with pytest.raises(TypeError, match="flow"):
        splat(src, flow.double())


def test_empty_sizes():
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)]:
        src = torch.randn(shape, requires_grad=True)
        flow = torch.zeros(shape[0], 2, *shape[2:], requires_grad=True)
        out = splat(src, flow, "average")
        assert out.shape == shape
        out.sum().backward()
        assert src.grad.shape == src.shape and flow.grad.shape == flow.shape


def test_custom_op_compiles_fullgraph():
    gen = seeded("compile")
    src, flow, metric = inputs("softmax", torch.float32, gen)
    grads = []
    for fn in (splat, torch.compile(splat, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (src, flow, metric)]
        fn(leaves[0], leaves[1], "softmax", leaves[2]).square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*grads))


def test_export_keeps_one_node_per_op():
    class M(torch.nn.Module):
        def forward(self, s, f, m):
            return splat(s, f, "softmax", m) + flow_warp(s, f, return_mask=True)[1]

    gen = seeded("export")
    src, flow, metric = inputs("softmax", torch.float32, gen)
    graph = torch.export.export(M(), (src, flow, metric)).graph
    ops = sorted(str(n.target) for n in graph.nodes if str(n.target).startswith("tcae_kernels"))
    assert ops == ["tcae_kernels.splat.default", "tcae_kernels.warp_variant.default"], ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_reference(mode, dtype, deterministic):
    """The Triton kernels on a GPU, compiled (not interpreted), both accumulations; the
    deterministic forward also bitwise repeatable."""
    gen = seeded("cuda", mode, str(dtype), deterministic)
    src, flow, metric = inputs(mode, dtype, gen, shape=(2, 5, 37, 45), kind="large")
    grad_out = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    on = [None if t is None else t.cuda() for t in (src, flow, metric)]
    got = run(splat, on[0], on[1], mode, on[2], grad_out.cuda(), deterministic=deterministic)
    check((got[0].cpu(), [g.cpu() for g in got[1]]), reference(src, flow, mode, metric, grad_out), dtype)
    if deterministic:
        again = run(splat, on[0], on[1], mode, on[2], grad_out.cuda(), deterministic=True)
        assert torch.equal(got[0], again[0])
