"""The compiled CPU kernels (tcae_kernels.cpu) against the float64 references (SPEC sections 1-3).

Forward and every gradient of warp, merged_warp and warp_l1, for all dtypes,
both paddings and the edge cases; layouts; determinism of ∂L/∂src with two
threads. numba compiles each kernel once per arithmetic dtype (float32,
float64) and caches it on disk, so the shapes stay tiny.
"""

from __future__ import annotations

import os
import threading
import warnings
import zlib

import pytest
import torch

from tcae_kernels import cpu, merge_displacements, warp_naive
from tcae_kernels.testing import TOLERANCES, make_disp, rel_err
from test_warp import EMPTY_SHAPES

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")

# SPEC section 3: relative L2 error against the float64 reference.
TOL = TOLERANCES
DTYPES = list(TOL)
PADDINGS = ["zeros", "border"]
# (B, C, H_in, W_in, H, W): odd sizes, H or W = 1, src size ≠ out size, a wide row far from the origin.
SHAPES = [(2, 3, 9, 11, 9, 11), (1, 1, 1, 7, 1, 7), (2, 5, 6, 1, 6, 1), (3, 4, 5, 6, 7, 4), (1, 2, 3, 1024, 3, 1024)]
KINDS = ["small", "large", "integer", "half_integer", "far"]


def seeded(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def field_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixed precision for bfloat16 (float32 δ beside it); float16 keeps δ in float16."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def reference(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn on float64 copies of inputs, and the gradient of each input for the cotangent grad (autograd)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad.double()))


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, dtype: torch.dtype | None = None) -> None:
    if dtype is not None:
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_warp_matches_reference(kind, dtype, padding):
    tol_fwd, tol_grad = TOL[dtype]
    for b, c, h_in, w_in, h, w in SHAPES:
        gen = seeded("warp", kind, str(dtype), padding, h_in, w_in)
        src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
        disp = make_disp(kind, b, h, w, field_dtype(dtype), "cpu", gen)
        grad_out = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
        out = cpu.warp_forward(src, disp, padding)
        gs, gd = cpu.warp_backward(grad_out, src, disp, padding, True, True)
        ref, (ref_gs, ref_gd) = reference(lambda s, d: warp_naive(s, d, padding), [src, disp], grad_out)
        check("out", out, ref, tol_fwd, dtype)
        check("grad_src", gs, ref_gs, tol_grad, dtype)
        check("grad_disp", gd, ref_gd, tol_grad, disp.dtype)


def merged_reference(padding: str):
    return lambda s, da, db, la, lb: warp_naive(s, merge_displacements(da, db, la, lb), padding)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["small", "integer", "far"])
def test_merged_warp_matches_reference(kind, dtype, padding):
    tol_fwd, tol_grad = TOL[dtype]
    for b, c, h_in, w_in, h, w in SHAPES[:4]:
        gen = seeded("merged", kind, str(dtype), padding, h_in, w_in)
        src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
        fdt = field_dtype(dtype)
        disp_a = make_disp(kind, b, h, w, fdt, "cpu", gen)
        disp_b = make_disp("small", b, h, w, fdt, "cpu", gen)
        logits = [(torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64) * 2).to(fdt) for _ in range(2)]
        fields = [disp_a, disp_b, *logits]
        grad_out = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
        out = cpu.merged_warp_forward(src, *fields, padding)
        gs, grads = cpu.merged_warp_backward(grad_out, src, *fields, padding, True, True)
        ref, ref_grads = reference(merged_reference(padding), [src, *fields], grad_out)
        check("out", out, ref, tol_fwd, dtype)
        check("grad_src", gs, ref_grads[0], tol_grad, dtype)
        for name, g, r in zip(("disp_a", "disp_b", "logit_a", "logit_b"), grads, ref_grads[1:]):
            # With a far δ_a the merged δ is far too, and the logits' slope is the (far) δ_a − δ_b:
            # float32 rounds that merge, so compare the logits there at the float32 tolerance.
            tol = max(tol_grad, 1e-5) if kind == "far" and name.startswith("logit") else tol_grad
            check(f"grad_{name}", g, r, tol, fdt)


def l1_reference(padding: str):
    return lambda s, d, t: (warp_naive(s, d, padding) - t).abs().flatten(1).mean(dim=1)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["small", "half_integer", "far"])
def test_warp_l1_matches_reference(kind, dtype, padding):
    tol_fwd, tol_grad = TOL[dtype]
    for b, c, h_in, w_in, h, w in SHAPES[:4]:
        gen = seeded("l1", kind, str(dtype), padding, h_in, w_in)
        src = torch.randn(b, c, h_in, w_in, generator=gen, dtype=torch.float64).to(dtype)
        disp = make_disp(kind, b, h, w, field_dtype(dtype), "cpu", gen)
        target = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
        grad_loss = torch.randn(b, generator=gen, dtype=torch.float64).to(cpu._acc(dtype))
        loss = cpu.warp_l1_forward(src, disp, target, padding)
        gs, gd, gt = cpu.warp_l1_backward(grad_loss, src, disp, target, padding, True, True, True)
        ref, (ref_gs, ref_gd, ref_gt) = reference(l1_reference(padding), [src, disp, target], grad_loss)
        check("loss", loss, ref, tol_fwd, cpu._acc(dtype))
        check("grad_src", gs, ref_gs, tol_grad, dtype)
        check("grad_disp", gd, ref_gd, tol_grad, disp.dtype)
        check("grad_target", gt, ref_gt, tol_grad, dtype)


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(padding):
    gen = seeded("gradcheck", padding)
    src = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    # Fractional parts kept away from integers, where the derivative jumps.
    whole = torch.randint(-3, 4, (2, 2, 3, 4), generator=gen).double()
    disp = (whole + 0.15 + 0.7 * torch.rand(2, 2, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: cpu.warp(s, d, padding), (src, disp), eps=1e-6, atol=1e-7)


def test_integer_shift_is_shifted_copy():
    src = torch.randn(2, 3, 8, 9, generator=seeded("shift"))
    disp = torch.empty(2, 2, 8, 9)
    disp[:, 0], disp[:, 1] = 2, -1
    expected = torch.zeros_like(src)
    expected[:, :, 0:7, 2:9] = src[:, :, 1:8, 0:7]  # out[y, x] = src[y + 1, x − 2]
    assert torch.equal(cpu.warp_forward(src, disp, "zeros"), expected)
    assert torch.equal(cpu.warp_forward(src, torch.zeros(2, 2, 8, 9), "border"), src)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_displacement(padding, bad):
    gen = seeded("nonfinite", padding, bad)
    src = torch.randn(2, 3, 7, 9, generator=gen)
    disp = make_disp("small", 2, 7, 9, torch.float32, "cpu", gen)
    hit = torch.zeros(2, 7, 9, dtype=torch.bool)
    hit[0, 3, 4] = hit[1, 0, 0] = hit[1, 6, 8] = True
    disp[:, 0][hit] = bad  # δx only: the whole pixel is still poisoned
    grad_out = torch.randn(2, 3, 7, 9, generator=gen)
    out = cpu.warp_forward(src, disp, padding)
    gs, gd = cpu.warp_backward(grad_out, src, disp, padding, True, True)
    at = lambda t: t.permute(1, 0, 2, 3)[:, hit]  # noqa: E731 - [channels, poisoned pixels]
    away = lambda t: t.permute(1, 0, 2, 3)[:, ~hit]  # noqa: E731
    assert torch.isnan(at(out)).all() and torch.isnan(at(gd)).all()
    # Elsewhere: the reference on a clean δ, the poisoned pixels sending nothing to src.
    clean = torch.where(hit.unsqueeze(1), torch.zeros_like(disp), disp)
    ref, (ref_gs, ref_gd) = reference(
        lambda s, d: warp_naive(s, d, padding), [src, clean], grad_out.masked_fill(hit.unsqueeze(1), 0)
    )
    check("out", away(out), away(ref), 1e-6)
    check("grad_src", gs, ref_gs, 1e-5)
    check("grad_disp", away(gd), away(ref_gd), 1e-5)

    target = torch.randn(2, 3, 7, 9, generator=gen)
    assert torch.isnan(cpu.warp_l1_forward(src, disp, target, padding)).all()  # both samples are poisoned
    _, gd, gt = cpu.warp_l1_backward(torch.ones(2), src, disp, target, padding, True, True, True)
    assert torch.isnan(at(gd)).all() and torch.isnan(at(gt)).all()
    assert torch.isfinite(away(gd)).all() and torch.isfinite(away(gt)).all()

    logits = torch.zeros(2, 1, 7, 9)
    out = cpu.merged_warp_forward(src, disp, disp, logits, logits, padding)
    _, grads = cpu.merged_warp_backward(grad_out, src, disp, disp, logits, logits, padding, True, True)
    assert torch.isnan(at(out)).all() and torch.isfinite(away(out)).all()
    for g in grads:
        assert torch.isnan(at(g)).all() and torch.isfinite(away(g)).all()


@pytest.mark.parametrize("src_shape,disp_shape", EMPTY_SHAPES)
def test_empty_sizes(src_shape, disp_shape):
    src = torch.randn(src_shape)
    disp = torch.randn(disp_shape)
    b, c = src_shape[:2]
    out_shape = (b, c, *disp_shape[2:])
    for padding in PADDINGS:
        out = cpu.warp_forward(src, disp, padding)
        assert out.shape == out_shape and (out == 0).all()  # a source without pixels gives zeros
        gs, gd = cpu.warp_backward(torch.randn(out_shape), src, disp, padding, True, True)
        assert gs.shape == src.shape and gd.shape == disp.shape
        assert (gs == 0).all() and (gd == 0).all()
        logit = torch.zeros(disp_shape[0], 1, *disp_shape[2:])
        assert (cpu.merged_warp_forward(src, disp, disp, logit, logit, padding) == 0).all()
        gs, grads = cpu.merged_warp_backward(torch.randn(out_shape), src, disp, disp, logit, logit, padding, True, True)
        assert gs.shape == src.shape and all((g == 0).all() for g in grads)
        target = torch.randn(out_shape)
        loss = cpu.warp_l1_forward(src, disp, target, padding)
        assert loss.shape == (b,)
        if c * disp_shape[2] * disp_shape[3] == 0:
            assert torch.isnan(loss).all()  # the mean of nothing
        else:
            assert torch.allclose(loss, target.abs().flatten(1).mean(dim=1))  # warped: zeros
        grads = cpu.warp_l1_backward(torch.ones(b), src, disp, target, padding, True, True, True)
        assert [g.shape for g in grads] == [src.shape, disp.shape, target.shape]


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "expanded_grad"])
def test_strided_inputs(layout):
    """Any strides read in place give the same bits as contiguous inputs; channels_last stays channels_last."""
    gen = seeded("strided", layout)
    src = torch.randn(2, 5, 8, 9, generator=gen)
    disp = make_disp("small", 2, 8, 9, torch.float32, "cpu", gen)
    grad_out = torch.randn(2, 5, 8, 9, generator=gen)
    target = torch.randn(2, 5, 8, 9, generator=gen)
    s, d, g, t = src, disp, grad_out, target
    if layout == "channels_last":
        s, d, g, t = (x.contiguous(memory_format=torch.channels_last) for x in (src, disp, grad_out, target))
    elif layout == "sliced":
        s = torch.randn(2, 10, 8, 18)[:, ::2, :, ::2].copy_(src)
        d = torch.randn(2, 2, 8, 27)[..., ::3].copy_(disp)
        t = torch.randn(3, 5, 16, 9)[:2, :, ::2].copy_(target)
    elif layout == "transposed":
        s, g = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (src, grad_out))
        d = disp.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        g = torch.ones(1, 1, 1, 1).expand(2, 5, 8, 9)  # as out.sum().backward() gives
        grad_out = torch.ones(2, 5, 8, 9)
    logit = torch.randn(2, 1, 8, 9, generator=gen)
    got = [
        cpu.warp_forward(s, d, "border"), *cpu.warp_backward(g, s, d, "border", True, True),
        cpu.merged_warp_forward(s, d, disp, logit, -logit, "zeros"),
        cpu.warp_l1_forward(s, d, t, "zeros"), *cpu.warp_l1_backward(torch.ones(2), s, d, t, "zeros", True, True, True),
        # ∂L/∂δ alone and the flow variant with its mask read δ's rows in loops of their own.
        cpu.warp_backward(g, s, d, "border", False, True)[1],
        *cpu.warp_variant_forward(s, d, "zeros", True, True),
        cpu.warp_variant_backward(g, logit, s, d, "zeros", False, True, True)[1],
    ]
    want = [
        cpu.warp_forward(src, disp, "border"), *cpu.warp_backward(grad_out, src, disp, "border", True, True),
        cpu.merged_warp_forward(src, disp, disp, logit, -logit, "zeros"),
        cpu.warp_l1_forward(src, disp, target, "zeros"),
        *cpu.warp_l1_backward(torch.ones(2), src, disp, target, "zeros", True, True, True),
        cpu.warp_backward(grad_out, src, disp, "border", False, True)[1],
        *cpu.warp_variant_forward(src, disp, "zeros", True, True),
        cpu.warp_variant_backward(grad_out, logit, src, disp, "zeros", False, True, True)[1],
    ]
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {k} differs"
    if layout == "channels_last":
        for k in (0, 1, 3, 5):  # outputs and ∂L/∂src
            assert got[k].is_contiguous(memory_format=torch.channels_last), f"result {k} is not channels_last"


def test_only_what_is_asked():
    src, disp = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    grad_out, target = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    both = cpu.warp_backward(grad_out, src, disp, "zeros", True, True)
    assert cpu.warp_backward(grad_out, src, disp, "zeros", False, True)[0] is None
    assert torch.equal(cpu.warp_backward(grad_out, src, disp, "zeros", False, True)[1], both[1])
    assert torch.equal(cpu.warp_backward(grad_out, src, disp, "zeros", True, False)[0], both[0])
    all3 = cpu.warp_l1_backward(torch.ones(1), src, disp, target, "zeros", True, True, True)
    for k in range(3):
        need = [j == k for j in range(3)]
        alone = cpu.warp_l1_backward(torch.ones(1), src, disp, target, "zeros", *need)
        assert torch.equal(alone[k], all3[k]) and all(alone[j] is None for j in range(3) if j != k)
    logit = torch.zeros(1, 1, 5, 5)
    gs, grads = cpu.merged_warp_backward(grad_out, src, disp, disp, logit, logit, "zeros", True, False)
    # (Merged positions are formed in float64: the same up to rounding.)
    assert grads is None and torch.allclose(gs, both[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [3, 1], ids=["by_batch", "by_channels"])
def test_grad_src_bitwise_repeatable_with_two_threads(monkeypatch, batch):
    """Two threads, forced even on small inputs: the same bits every run, and as with one thread.

    With one batch element the two threads split its channels.
    """
    gen = seeded("repeat", batch)
    src = torch.randn(batch, 4, 16, 16, generator=gen)
    # Large, rough δ: many pixels send to the same src element.
    disp = torch.randn(batch, 2, 16, 16, generator=gen) * 6
    grad_out = torch.randn(batch, 4, 16, 16, generator=gen)
    target = torch.randn(batch, 4, 16, 16, generator=gen)
    tasks = []
    real_run = cpu._run
    monkeypatch.setattr(cpu, "PARALLEL_MIN_VALUES", 1)
    monkeypatch.setattr(cpu, "_run", lambda *a: tasks.append(a[2]) or real_run(*a))

    def grads():
        return (
            cpu.warp_backward(grad_out, src, disp, "zeros", True, True),
            cpu.warp_l1_backward(torch.ones(batch), src, disp, target, "zeros", True, True, True),
        )

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(2)
        runs = [grads() for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert max(tasks) >= 2  # the work really was split
    for r in runs:
        for a, b in zip([*r[0], *r[1]], [*one[0], *one[1]]):
            assert torch.equal(a, b)


def test_numba_threads_from_several_python_threads(monkeypatch):
    """Two torch threads on numba's threads (drivers compiled first), called from four Python
    threads at once: no deadlock, and the bits of one thread."""
    gen = seeded("numba threads")
    src = torch.randn(2, 3, 12, 12, generator=gen)
    disp = torch.randn(2, 2, 12, 12, generator=gen) * 3
    grad_out = torch.randn(2, 3, 12, 12, generator=gen)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_VALUES", 1)
    monkeypatch.setattr(cpu, "COMPILE_AFTER", 0)
    launched = []
    real = cpu._on_numba_threads
    monkeypatch.setattr(cpu, "_on_numba_threads", lambda *a: launched.append(real(*a)) or launched[-1])

    def both():
        return (cpu.warp_forward(src, disp, "border"), *cpu.warp_backward(grad_out, src, disp, "border", True, True))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = both()
        torch.set_num_threads(2)
        both()  # starts the drivers' compiles
        for t in threading.enumerate():
            if t.name == "tcae_kernels compile":
                t.join()
        results = [None] * 4

        def call(k):
            results[k] = [both() for _ in range(3)]

        workers = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in workers)
    finally:
        torch.set_num_threads(threads)
    # On numba's threads, unless its layer is workqueue (then the pool ran them all).
    assert launched[-1] or (cpu._layer_pid == os.getpid() and not cpu._layer_safe)
    for per_thread in results:
        for r in per_thread:
            assert all(torch.equal(a, b) for a, b in zip(r, one))

def test_without_numba_one_warning(monkeypatch):
    monkeypatch.setattr(cpu, "numba", None)
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", ImportError("No module named 'numba'"))
    cpu.kernels_or_none.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numba") as record:
            assert cpu.kernels_or_none() is None
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert cpu.kernels_or_none() is None  # no second warning
        assert len(record) == 1
    finally:
        cpu.kernels_or_none.cache_clear()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.kernels_or_none().warp_forward is cpu.warp_forward


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("flow", [False, True])
def test_bfloat16_disp_gradient_reads_the_bits(layout, flow):
    """∂L/∂δ alone with bfloat16 src and grad_out widens their bits in the gathers instead of copying
    them to float32 first: bitwise the gradient of the same values given as float32."""
    gen = seeded("bf16 bits", layout, flow)
    src = torch.randn(2, 5, 9, 13, generator=gen).to(torch.bfloat16)
    grad_out = torch.randn(2, 5, 9, 13, generator=gen).to(torch.bfloat16)
    disp = torch.randn(2, 2, 9, 13, generator=gen) * 4
    disp[0, 0, 2, 3] = float("nan")
    src[1, 2, 4, 4] = float("inf")
    grad_mask = torch.randn(2, 1, 9, 13, generator=gen)
    if layout == "channels_last":
        src, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (src, grad_out))
    elif layout == "strided":
        src, grad_out = (torch.cat([t, t], dim=3)[..., ::2] for t in (src, grad_out))
    for padding in ("zeros", "border"):
        for mask in (None, grad_mask):
            bits = cpu.warp_variant_backward(grad_out, mask, src, disp, padding, False, True, flow)[1]
            wide = cpu.warp_variant_backward(grad_out.float(), mask, src.float(), disp, padding, False, True, flow)[1]
            assert torch.equal(bits.isnan(), wide.isnan()) and torch.equal(bits.nan_to_num(), wide.nan_to_num())
            assert bits.isfinite().sum() > 0.9 * bits.numel()
