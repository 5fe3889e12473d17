"""merged_warp, warp_l1, deterministic mode, torch.compile/export and the module wrapper."""

from __future__ import annotations

import importlib

import pytest
import torch

from tcae_kernels import merge_displacements, merged_warp, warp, warp_l1, warp_naive
from tcae_kernels.nn import DisplacementWarp

from tcae_kernels.testing import TOLERANCES as TOL
from tcae_kernels.testing import rel_err
from test_warp import DEVICES

warp_module = importlib.import_module("tcae_kernels.ops.warp")
PADDINGS = ["zeros", "border"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def field_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def grads_of(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def assert_matches(fn, ref_fn, inputs, dtype, gen):
    probe = fn(*inputs)
    grad = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(probe.dtype).to(probe.device)
    out, grads = grads_of(fn, inputs, grad)
    ref, ref_grads = grads_of(ref_fn, [t.double() for t in inputs], grad.double())
    tol_fwd, tol_grad = TOL[dtype]
    assert rel_err(out, ref) <= tol_fwd
    for g, r, t in zip(grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, r) <= tol_grad


def merged_inputs(dtype, device, gen, b=2, c=5, size_in=(9, 10), size=(7, 8), scale=3.0):
    fd = field_dtype(dtype)
    src = torch.randn(b, c, *size_in, generator=gen, dtype=torch.float64).to(dtype).to(device)
    da, db = (torch.randn(b, 2, *size, generator=gen, dtype=torch.float64) * scale for _ in range(2))
    la, lb = (torch.randn(b, 1, *size, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    return [src] + [t.to(fd).to(device) for t in (da, db, la, lb)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_merged_warp_matches_composition(device, padding, dtype, scale, path):
    gen = torch.Generator().manual_seed(101)
    inputs = merged_inputs(dtype, device, gen, scale=scale)
    assert_matches(
        lambda *a: merged_warp(*a, padding=padding),
        lambda s, *f: warp_naive(s, merge_displacements(*f), padding),
        inputs, dtype, gen,
    )


def test_merge_is_the_attention_formula():
    gen = torch.Generator().manual_seed(1)
    _, da, db, la, lb = merged_inputs(torch.float64, "cpu", gen)
    expected = (la.exp() * da + lb.exp() * db) / (la.exp() + lb.exp())
    assert torch.allclose(merge_displacements(da, db, la, lb), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_merged_warp_gradcheck(padding):
    gen = torch.Generator().manual_seed(3)
    src, da, db, la, lb = merged_inputs(torch.float64, "cpu", gen, b=1, c=2, size_in=(4, 5), size=(3, 3), scale=0.7)
    inputs = [t.requires_grad_() for t in (src, da, db, la, lb)]
    assert torch.autograd.gradcheck(lambda *a: merged_warp(*a, padding=padding), inputs, eps=1e-6, atol=1e-7)


def test_merged_warp_non_finite_logit_poisons_pixel():
    gen = torch.Generator().manual_seed(4)
    src, da, db, la, lb = merged_inputs(torch.float32, "cpu", gen)
    la[1, 0, 2, 3] = float("nan")
    out = merged_warp(src, da, db, la, lb)
    assert torch.isnan(out[1, :, 2, 3]).all()
    assert torch.isfinite(out).sum() == out.numel() - out.shape[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_l1_matches_warp_plus_l1(device, padding, dtype, path):
    gen = torch.Generator().manual_seed(202)
    src = torch.randn(3, 4, 9, 10, generator=gen, dtype=torch.float64).to(dtype).to(device)
    disp = (torch.randn(3, 2, 7, 8, generator=gen, dtype=torch.float64) * 3).to(field_dtype(dtype)).to(device)
    target = torch.randn(3, 4, 7, 8, generator=gen, dtype=torch.float64).to(dtype).to(device)

    def reference(s, d, t):
        return (warp_naive(s, d, padding) - t).abs().flatten(1).mean(dim=1)

    assert_matches(lambda s, d, t: warp_l1(s, d, t, padding=padding), reference, [src, disp, target], dtype, gen)


def test_warp_l1_mean_reduction_and_strided_target():
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(2, 3, 6, 6, generator=gen)
    disp = torch.randn(2, 2, 6, 6, generator=gen)
    target = torch.randn(2, 6, 6, 3, generator=gen).permute(0, 3, 1, 2).requires_grad_()
    loss = warp_l1(src, disp, target, reduction="mean")
    expected = (warp(src, disp) - target).abs().mean()
    assert torch.allclose(loss, expected, rtol=1e-6)
    loss.backward()
    ref_target = target.detach().clone().requires_grad_()
    (warp(src, disp) - ref_target).abs().mean().backward()
    assert torch.allclose(target.grad, ref_target.grad, rtol=1e-6, atol=1e-9)


def collision_case(gen, dtype=torch.float32):
    """Many output pixels landing on few source pixels: the scatter's worst case."""
    src = torch.randn(2, 3, 4, 5, generator=gen, dtype=dtype)
    disp = (torch.randn(2, 2, 16, 16, generator=gen, dtype=torch.float64) * 6).to(dtype)
    grad = torch.randn(2, 3, 16, 16, generator=gen, dtype=dtype)
    return src, disp, grad


def src_grad(src, disp, grad, **kw):
    s = src.clone().requires_grad_()
    warp(s, disp, "border", **kw).backward(grad)
    return s.grad


def test_deterministic_is_accurate_and_order_independent(monkeypatch):
    """Fixed-point sums give the same bits whatever order the programs add in."""
    gen = torch.Generator().manual_seed(9)
    src, disp, grad = collision_case(gen)
    exact = src_grad(src.double(), disp.double(), grad.double())
    runs = []
    real = warp_module.row_launches

    def with_block(block):
        def launches(src, b, h, w):
            _, meta = real(src, b, h, w)
            return [((-(-w // block), h, b), 0, 0)], {**meta, "BLOCK_X": block, "ROWS": 1}
        return launches

    for block in (4, 8, 64):
        monkeypatch.setattr(warp_module, "row_launches", with_block(block))
        runs.append(src_grad(src, disp, grad, deterministic=True))
    for r in runs:
        assert torch.equal(r, runs[0])
    assert rel_err(runs[0], exact) <= 1e-6
    # The global switch selects the same path.
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(src_grad(src, disp, grad), runs[-1])
    finally:
        torch.use_deterministic_algorithms(False)


def tiles_of(monkeypatch, block):
    """Make every op's launcher cover the output in one-row tiles of ``block`` pixels. The
    interpreter runs programs x block first, so the order in which a source pixel's
    contributions arrive changes with the tiling: float atomics would change their bits."""
    launch = importlib.import_module("tcae_kernels.ops.launch")
    for name in ("warp", "merged_warp", "warp_l1"):

        def launches(src, b, h, w):
            _, meta = launch.row_launches(src, b, h, w)
            return [((-(-w // block), h, b), 0, 0)], {**meta, "BLOCK_X": block, "ROWS": 1}

        monkeypatch.setattr(importlib.import_module(f"tcae_kernels.ops.{name}"), "row_launches", launches)


def op_src_grad(op, src, disp, grad, padding, reference=False, **kw):
    """∂L/∂src of one op (or of its float64 reference composition) on the collision case;
    for warp_l1, ``grad`` is the target."""
    s = src.clone().requires_grad_()
    fields = (disp, -disp.flip(2), disp[:, :1] / 3, -disp[:, :1] / 3)
    if op == "warp":
        out = warp_naive(s, disp, padding) if reference else warp(s, disp, padding, **kw)
        out.backward(grad)
    elif op == "merged_warp":
        if reference:
            out = warp_naive(s, merge_displacements(*fields), padding)
        else:
            out = merged_warp(s, *fields, padding, **kw)
        out.backward(grad)
    else:
        if reference:
            loss = (warp_naive(s, disp, padding) - grad).abs().flatten(1).mean(dim=1)
        else:
            loss = warp_l1(s, disp, grad, "none", padding, **kw)
        loss.sum().backward()
    return s.grad


@pytest.mark.parametrize("op", ["warp", "merged_warp", "warp_l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", PADDINGS)
def test_deterministic_src_grad_is_accurate_and_order_free(monkeypatch, op, dtype, padding):
    """Deterministic ∂L/∂src: the same bits whatever the program order, and within SPEC's
    tolerance of the float64 reference (fixed point keeps float64's precision too)."""
    gen = torch.Generator().manual_seed(10)
    src, disp, grad = collision_case(gen, dtype)
    if op == "warp_l1":
        grad = grad * 2  # a target the warped image crosses: the residual takes both signs
    exact = op_src_grad(op, src.double(), disp.double(), grad.double(), padding, reference=True)
    whole = op_src_grad(op, src, disp, grad, padding, deterministic=True)  # the interpreter's one program
    tiles_of(monkeypatch, 8)
    tiled = op_src_grad(op, src, disp, grad, padding, deterministic=True)
    assert whole.abs().sum() > 0
    assert torch.equal(tiled, whole)
    assert rel_err(whole, exact) <= TOL[dtype][1]


def test_deterministic_non_finite_grad_gives_nan():
    """The kernels' fixed point cannot carry ±Inf: the (b, c) plane that received one is NaN,
    the others exact (on the GPU when there is one, where CPU tensors run the fallback)."""
    gen = torch.Generator().manual_seed(12)
    src, disp, grad = (t.to(DEVICES[-1]) for t in collision_case(gen))
    clean = src_grad(src, disp, grad, deterministic=True)
    grad[0, 0, 0, 0] = float("inf")
    poisoned = src_grad(src, disp, grad, deterministic=True)
    assert torch.isnan(poisoned[0, 0]).all()
    assert torch.equal(poisoned[1], clean[1]) and torch.equal(poisoned[0, 1:], clean[0, 1:])


@pytest.mark.parametrize("g", [1.0, 2.0**-140], ids=["one", "subnormal"])
def test_deterministic_headroom_when_one_element_takes_the_whole_bound(g):
    """All 16 output pixels sample src[0, 0] with weight 1 and ∂L/∂out = g: the element receives
    exactly its plane's bound, 16·g, a power of two. The fixed-point sum must hold bound · scale
    = 2⁶² (with 2⁶³ it would wrap around int64), and at a float32-subnormal g = 2⁻¹⁴⁰ each of the
    scale's two factors (2⁹⁹) must stay finite: the result is exact either way."""
    src = torch.randn(1, 1, 4, 4, device=DEVICES[-1])
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    disp = torch.stack((xs, ys))[None].to(src.device)  # x − δ = 0 everywhere
    grad = src_grad(src, disp, torch.full((1, 1, 4, 4), g, device=src.device), deterministic=True)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0] = 16.0 * g
    assert torch.equal(grad.cpu(), expected)


def test_deterministic_half_gradient_bound_does_not_overflow():
    """The bound Σ|∂L/∂out| of a float16 plane can pass float16's 65,504 while every element
    fits: it is summed in float32, so the plane's ∂L/∂src stays finite and exact."""
    gen = torch.Generator().manual_seed(14)
    src = torch.randn(1, 2, 8, 8, generator=gen).half().to(DEVICES[-1])
    disp = (0.25 * torch.randn(1, 2, 8, 8, generator=gen)).half().to(src.device)
    grad = torch.full((1, 2, 8, 8), 2048.0, dtype=torch.float16, device=src.device)  # Σ = 131,072
    got = src_grad(src, disp, grad, deterministic=True)
    exact = src_grad(src.double(), disp.double(), grad.double())
    assert torch.isfinite(got).all()
    assert rel_err(got.double(), exact) <= TOL[torch.float16][1]


@pytest.mark.parametrize("op", ["warp", "merged_warp", "warp_l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_deterministic_src_grad_at_extreme_magnitudes(op, dtype, factor):
    """Fixed point keeps its precision for any finite gradient size (README: rounded to
    bound·2⁻⁶²): scaling ∂L/∂out scales ∂L/∂src, to SPEC's tolerance."""
    gen = torch.Generator().manual_seed(13)
    src, disp, grad = collision_case(gen, dtype)
    scale = torch.tensor(factor, dtype=dtype)
    if op == "warp_l1":  # its ∂L/∂out is ∂loss/∂loss[b] = 1, scaled
        s = src.clone().requires_grad_()
        (warp_l1(s, disp, grad * 2, padding="border", deterministic=True) * scale).sum().backward()
        scaled = s.grad
    else:
        scaled = op_src_grad(op, src, disp, grad * scale, "border", deterministic=True)
    plain = op_src_grad(op, src, disp, grad * 2 if op == "warp_l1" else grad, "border", deterministic=True)
    assert rel_err(scaled / scale, plain) <= TOL[dtype][1]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.warp = DisplacementWarp("border")

    def forward(self, x, target):
        f = self.head(x)
        warped = self.warp(x, f[:, :2])
        merged = merged_warp(x, f[:, :2], f[:, 2:4], f[:, 4:5], f[:, 5:6], padding="border")
        return warped.square().mean() + merged.abs().mean() + warp_l1(x, f[:, 2:4], target, "mean", "border")


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Model()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    eager = model(x, target)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x, target)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_export():
    torch.manual_seed(0)
    model = _Model()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x, target))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"tcae_kernels.warp.default", "tcae_kernels.merged_warp.default", "tcae_kernels.warp_l1.default"} <= ops
    assert torch.allclose(exported.module()(x, target), model(x, target), rtol=1e-6)


def test_module_wrapper():
    m = DisplacementWarp("border")
    src, disp = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    assert torch.equal(m(src, disp), warp(src, disp, "border"))
    assert "border" in repr(m)
    with pytest.raises(ValueError, match="padding"):
        DisplacementWarp("mirror")


def test_path_fixture_dispatches_where_it_says(path, monkeypatch):
    """"kernels" launches Triton (interpreted) for every op; "fallback" launches nothing."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    real = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or real(self, *a, **k))
    gen = torch.Generator().manual_seed(4)
    src, da, db, la, lb = merged_inputs(torch.float32, "cpu", gen, size_in=(7, 8))
    for fn in (lambda: warp(src, da), lambda: merged_warp(src, da, db, la, lb), lambda: warp_l1(src, da, src)):
        launches.clear()
        fn()
        assert (len(launches) == 1) == (path == "kernels")


@pytest.mark.parametrize("padding", PADDINGS)
def test_merged_warp_infinite_logit_takes_the_limit(path, padding):
    """An infinite logit gives its displacement all the weight (the softmax's limit), on both paths."""
    gen = torch.Generator().manual_seed(14)
    src, da, db, la, lb = merged_inputs(torch.float32, "cpu", gen)
    la[0, 0, 1, 2], lb[1, 0, 3, 4] = float("inf"), float("inf")
    la[0, 0, 5, 5] = -float("inf")
    fields = [t.clone().requires_grad_() for t in (da, db, la, lb)]
    out = merged_warp(src, *fields, padding=padding)
    expected = warp_naive(src.double(), merge_displacements(*(f.detach().double() for f in fields)), padding)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= TOL[torch.float32][0]
    out.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in fields)
    assert fields[2].grad[0, 0, 1, 2] == 0 and fields[1].grad[0, :, 1, 2].abs().sum() == 0
