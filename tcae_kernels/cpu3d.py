"""Compiled CPU kernels of the 3-D warp (numba): the Triton kernels of ops/warp3d.py as loops.

Semantics, caching, threads and determinism as tcae_kernels.cpu (read its
docstring): the same position arithmetic per axis (``cpu._axis``), NaN at a
non-finite δ, which sends nothing to ∂L/∂src; arithmetic in float32 (float64
for float64), float16/bfloat16 converted at the boundary. ``flow`` samples at
x + field instead of x − field (a sign applied as δ is read, and to its
gradient as it is written).

Each task owns whole output rows (b, z, y): for each it forms the eight
neighbours' offsets, weights and slopes of every voxel once (a row scratch),
then walks the channels. ∂L/∂src is a scatter: each task owns whole (b, c)
planes and adds its voxels' contributions in row order, so the result is
bitwise the same for any number of threads; ∂L/∂δ reduces per voxel.
"""

from __future__ import annotations

import numpy as np
import torch

from . import cpu
from .cpu import _acc, _as, _field, _flat, _parts, _run, _to
from .ops.launch import memory_format_of

if cpu.numba is not None:
    from numba import prange

    from .cpu import _axis, _bounds, _jit, _pjit

    @_jit(inline="always")
    def _side(i0, a, n, f, stride, one):
        """One axis's two neighbours i0, i0 + 1: clamped offsets, weights and slopes (0 outside src)."""
        zero = one - one
        v0 = i0 >= 0 and i0 < n and f
        v1 = i0 >= -1 and i0 < n - 1 and f
        return (
            np.uint64(min(max(i0, 0), n - 1)) * stride, np.uint64(min(max(i0 + 1, 0), n - 1)) * stride,
            one - a if v0 else zero, a if v1 else zero, -one if v0 else zero, one if v1 else zero,
        )

    @_jit
    def _row(dsp, dbase, nvox, sgn, yf, zf, sizes, ss, border, off, wts, slope, flags, need_slope):
        """The row scratch of output row (z, y): for voxel x, off[k, x] (the offset in src of
        neighbour k = 4·jz + 2·jy + jx, clamped), wts[k, x] (0 outside src or at a
        non-finite δ), slope[3·k + axis, x] (∂weight/∂position), flags[axis, x] (gates)
        and flags[3, x] (finite). δ of voxel x is sgn·dsp[dbase + a·nvox + x], a = 0, 1, 2.
        Slopes only when need_slope (∂L/∂δ)."""
        d_in, h_in, w_in = sizes[5], sizes[6], sizes[7]
        t = dsp.dtype.type
        one = t(1)
        zero = one - one
        lo_x, hi_x = _bounds(t(w_in), border, one)
        lo_y, hi_y = _bounds(t(h_in), border, one)
        lo_z, hi_z = _bounds(t(d_in), border, one)
        us_d, us_h, us_w = np.uint64(ss[2]), np.uint64(ss[3]), np.uint64(ss[4])
        for x in range(off.shape[1]):
            xf = t(x)
            dx = sgn * dsp[dbase + x]
            dy = sgn * dsp[dbase + nvox + x]
            dz = sgn * dsp[dbase + 2 * nvox + x]
            f = (dx - dx == zero) and (dy - dy == zero) and (dz - dz == zero)
            # A non-finite δ samples at its own voxel with zero weights; callers write NaN.
            x0, ax, gx = _axis(xf, dx if f else xf, lo_x, hi_x, border, one)
            y0, ay, gy = _axis(yf, dy if f else yf, lo_y, hi_y, border, one)
            z0, az, gz = _axis(zf, dz if f else zf, lo_z, hi_z, border, one)
            flags[0, x] = gx
            flags[1, x] = gy
            flags[2, x] = gz
            flags[3, x] = f
            ox0, ox1, wx0, wx1, sx0, sx1 = _side(x0, ax, w_in, f, us_w, one)
            oy0, oy1, wy0, wy1, sy0, sy1 = _side(y0, ay, h_in, f, us_h, one)
            oz0, oz1, wz0, wz1, sz0, sz1 = _side(z0, az, d_in, f, us_d, one)
            oz = (oz0, oz0, oz0, oz0, oz1, oz1, oz1, oz1)
            oy = (oy0, oy0, oy1, oy1, oy0, oy0, oy1, oy1)
            ox = (ox0, ox1, ox0, ox1, ox0, ox1, ox0, ox1)
            wz = (wz0, wz0, wz0, wz0, wz1, wz1, wz1, wz1)
            wy = (wy0, wy0, wy1, wy1, wy0, wy0, wy1, wy1)
            wx = (wx0, wx1, wx0, wx1, wx0, wx1, wx0, wx1)
            for k in range(8):
                off[k, x] = oz[k] + oy[k] + ox[k]
                wts[k, x] = wz[k] * wy[k] * wx[k]
            if need_slope:
                sz = (sz0, sz0, sz0, sz0, sz1, sz1, sz1, sz1)
                sy = (sy0, sy0, sy1, sy1, sy0, sy0, sy1, sy1)
                sx = (sx0, sx1, sx0, sx1, sx0, sx1, sx0, sx1)
                for k in range(8):
                    slope[3 * k, x] = wz[k] * wy[k] * sx[k]
                    slope[3 * k + 1, x] = wz[k] * sy[k] * wx[k]
                    slope[3 * k + 2, x] = sz[k] * wy[k] * wx[k]

    @_jit(inline="always")
    def _scratch(w, like):
        f = like.dtype
        return np.empty((8, w), np.uint64), np.empty((8, w), f), np.empty((24, w), f), np.empty((4, w), np.bool_)

    @_jit
    def _fwd(src, ss, dsp, out, so, sizes, border, sgn, lo, hi):
        """Output rows of planes [lo, hi) of the B·D planes (b, z)."""
        c_, d, h, w = sizes[1], sizes[2], sizes[3], sizes[4]
        off, wts, slope, flags = _scratch(w, dsp)
        t = dsp.dtype.type
        nvox = d * h * w
        for p in range(lo, hi):
            b, z = p // d, p % d
            for y in range(h):
                _row(dsp, (b * 3 * d + z) * h * w + y * w, nvox, sgn, t(y), t(z), sizes, ss, border,
                     off, wts, slope, flags, False)
                for c in range(c_):
                    base = np.uint64(b * ss[0] + c * ss[1])
                    ob = b * so[0] + c * so[1] + z * so[2] + y * so[3]
                    for x in range(w):
                        v = t(0)
                        for k in range(8):
                            v += wts[k, x] * src[base + off[k, x]]
                        out[ob + x * so[4]] = v if flags[3, x] else np.nan

    @_jit
    def _bwd_disp(src, ss, dsp, gout, sg, gdisp, sizes, border, sgn, lo, hi):
        """∂L/∂field of the voxels of planes [lo, hi): Σ_c g·∂out/∂position, gated, signed."""
        c_, d, h, w = sizes[1], sizes[2], sizes[3], sizes[4]
        off, wts, slope, flags = _scratch(w, dsp)
        t = dsp.dtype.type
        nvox = d * h * w
        sums = np.empty((3, w), dsp.dtype)
        for p in range(lo, hi):
            b, z = p // d, p % d
            for y in range(h):
                dbase = (b * 3 * d + z) * h * w + y * w
                _row(dsp, dbase, nvox, sgn, t(y), t(z), sizes, ss, border, off, wts, slope, flags, True)
                sums[:] = 0
                for c in range(c_):
                    base = np.uint64(b * ss[0] + c * ss[1])
                    gb = b * sg[0] + c * sg[1] + z * sg[2] + y * sg[3]
                    for x in range(w):
                        g = gout[gb + x * sg[4]]
                        sx = t(0)
                        sy = t(0)
                        sz = t(0)
                        for k in range(8):
                            v = src[base + off[k, x]]
                            sx += slope[3 * k, x] * v
                            sy += slope[3 * k + 1, x] * v
                            sz += slope[3 * k + 2, x] * v
                        sums[0, x] += g * sx
                        sums[1, x] += g * sy
                        sums[2, x] += g * sz
                for m in range(3):
                    for x in range(w):
                        # ∂position/∂δ = −1; a flow's (sgn = −1) is +1.
                        gv = -sgn * sums[m, x] if flags[m, x] else t(0)
                        gdisp[dbase + m * nvox + x] = gv if flags[3, x] else np.nan

    @_jit
    def _bwd_src(src, ss, dsp, gout, sg, gsrc, sizes, border, sgn, parts, lo, hi):
        """∂L/∂src of channels part of batch element b, for tasks (b, part) in [lo, hi)."""
        c_, d, h, w = sizes[1], sizes[2], sizes[3], sizes[4]
        off, wts, slope, flags = _scratch(w, dsp)
        t = dsp.dtype.type
        nvox = d * h * w
        for task in range(lo, hi):
            b, part = task // parts, task % parts
            c0, c1 = c_ * part // parts, c_ * (part + 1) // parts
            for z in range(d):
                for y in range(h):
                    _row(dsp, (b * 3 * d + z) * h * w + y * w, nvox, sgn, t(y), t(z), sizes, ss, border,
                         off, wts, slope, flags, False)
                    for c in range(c0, c1):
                        base = np.uint64(b * ss[0] + c * ss[1])
                        gb = b * sg[0] + c * sg[1] + z * sg[2] + y * sg[3]
                        for x in range(w):
                            if flags[3, x]:  # a non-finite δ sends nothing to src
                                g = gout[gb + x * sg[4]]
                                for k in range(8):
                                    gsrc[base + off[k, x]] += g * wts[k, x]

    # Their drivers on numba's threads (see cpu._run).
    @_pjit
    def _fwd_par(src, ss, dsp, out, so, sizes, border, sgn, cuts):
        for k in prange(len(cuts) - 1):
            _fwd(src, ss, dsp, out, so, sizes, border, sgn, cuts[k], cuts[k + 1])

    @_pjit
    def _bwd_disp_par(src, ss, dsp, gout, sg, gdisp, sizes, border, sgn, cuts):
        for k in prange(len(cuts) - 1):
            _bwd_disp(src, ss, dsp, gout, sg, gdisp, sizes, border, sgn, cuts[k], cuts[k + 1])

    @_pjit
    def _bwd_src_par(src, ss, dsp, gout, sg, gsrc, sizes, border, sgn, parts, cuts):
        for k in prange(len(cuts) - 1):
            _bwd_src(src, ss, dsp, gout, sg, gsrc, sizes, border, sgn, parts, cuts[k], cuts[k + 1])

    cpu.DRIVERS.update({_fwd: _fwd_par, _bwd_disp: _bwd_disp_par, _bwd_src: _bwd_src_par})


def _sign(flow: bool, field: np.ndarray) -> np.floating:
    """The sign δ is read with (−1 for a flow), in the field's dtype: numba would widen float32
    arithmetic with a Python float to float64."""
    return field.dtype.type(-1.0 if flow else 1.0)


def _volume(src: torch.Tensor, acc: torch.dtype, like: torch.Tensor | None = None
            ) -> tuple[np.ndarray, tuple[int, ...], tuple[int, int, int]]:
    """src for the kernels: (flat array, strides, (D_in, H_in, W_in)); with ``like`` (the ∂L/∂src
    buffer) in like's strides. A source without voxels becomes one zero voxel (every
    neighbour of an empty source is outside it)."""
    b, c = src.shape[:2]
    if src.shape[2:].numel() == 0:
        return *_flat(torch.zeros(b, c, 1, 1, 1, dtype=acc)), (1, 1, 1)
    s = _to(src, acc)
    if like is not None and s.stride() != like.stride():
        s = s.contiguous(memory_format=memory_format_of(src))
    return *_flat(s), tuple(src.shape[2:])


def warp3d_forward(src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool) -> torch.Tensor:
    """src [B, C, D_in, H_in, W_in] at x − disp (x + disp when ``flow``), disp [B, 3, D, H, W]
    in voxels → [B, C, D, H, W] in src's dtype and memory format."""
    acc = _acc(src.dtype)
    b, c = src.shape[:2]
    d, h, w = disp.shape[2:]
    out = torch.empty((b, c, d, h, w), dtype=acc, memory_format=memory_format_of(src))
    if out.numel():
        s, ss, size_in = _volume(src, acc)
        sizes = (b, c, d, h, w, *size_in)
        o, so = _flat(out)
        field = _field(disp, acc)
        _run(_fwd, (s, ss, field, o, so, sizes, padding == "border", _sign(flow, field)), b * d, out.numel())
    return _as(out, src.dtype)


def warp3d_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool,
    need_src: bool, need_disp: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂src in src's dtype and memory format | None, ∂L/∂disp contiguous in disp's dtype | None)."""
    acc = _acc(src.dtype)
    b, c = src.shape[:2]
    d, h, w = disp.shape[2:]
    grad_src = torch.zeros(src.shape, dtype=acc).contiguous(memory_format=memory_format_of(src)) if need_src else None
    grad_disp = torch.empty(disp.shape, dtype=acc) if need_disp else None
    border = padding == "border"
    values = b * max(c, 1) * d * h * w
    if values and (need_src or need_disp):
        scatter = need_src and grad_src.numel() > 0
        s, ss, size_in = _volume(src, acc, grad_src if scatter else None)
        sizes = (b, c, d, h, w, *size_in)
        field = _field(disp, acc)
        sgn = _sign(flow, field)
        g, sg = _flat(_to(grad_out, acc))
        if scatter:
            parts = _parts(b, c)
            _run(_bwd_src, (s, ss, field, g, sg, _flat(grad_src)[0], sizes, border, sgn, parts), b * parts, values)
        if need_disp:
            _run(_bwd_disp, (s, ss, field, g, sg, _flat(grad_disp)[0], sizes, border, sgn), b * d, values)
    elif need_disp:
        grad_disp.zero_()
    return (
        _as(grad_src, src.dtype) if need_src else None,
        _as(grad_disp, disp.dtype) if need_disp else None,
    )


class _Warp3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, disp, padding, flow):
        ctx.save_for_backward(src, disp)
        ctx.padding, ctx.flow = padding, flow
        return warp3d_forward(src, disp, padding, flow)

    @staticmethod
    def backward(ctx, grad_out):
        src, disp = ctx.saved_tensors
        grads = warp3d_backward(grad_out, src, disp, ctx.padding, ctx.flow, *ctx.needs_input_grad[:2])
        return (*grads, None, None)


def warp3d(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros", flow: bool = False) -> torch.Tensor:
    """The 3-D warp (x − δ, or x + flow with ``flow``; voxels) through these kernels behind
    autograd, on CPU tensors, whatever the op's dispatch would pick: what the benchmark
    times and gradcheck checks. Needs numba."""
    return _Warp3d.apply(src, disp, padding, flow)
