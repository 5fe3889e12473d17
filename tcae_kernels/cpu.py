"""Compiled CPU kernels of every warp op (numba): the Triton kernels' math as loops over pixels.

numba compiles these with LLVM at the first call (no C/C++ toolchain on the
user's machine) and caches the machine code on disk (``cache=True``): next to
this file in ``__pycache__`` when that is writable, else in ``~/.cache/numba``
or ``$NUMBA_CACHE_DIR``; with no writable place at all they compile once per
process. Threads follow ``torch.get_num_threads()``.

Semantics are those of the kernels in ``warp.py`` (SPEC sections 1-3): the
same position arithmetic (weights (x − ⌊x̂⌋) − δ, bounds tested on δ, the
"below" floor correction, border gates), NaN at a non-finite δ, which sends
nothing to ∂L/∂src. Arithmetic is float32 (float64 for float64 src);
float16/bfloat16 inputs are converted to float32 at the boundary (one copy
each way). ``merged_warp`` merges the displacements and forms positions in
float64, as its kernel does.

Layouts: src, disp, grad_out and target are read in place through their
strides (NCHW, channels_last, slices: no copy); the four fields of
``merged_warp`` are made contiguous (a copy only if they are not). Results
follow src's memory format; gradients of δ and the fields are contiguous.

Determinism: forward, loss and ∂L/∂δ reduce per pixel or per row in a fixed
order. ∂L/∂src is a scatter: a first pass over rows stores each pixel's
position, a second pass gives every (b, c) plane to one thread, which adds
its pixels' contributions in pixel order. The result is bitwise the same for
any number of threads.
"""

from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except Exception as e:  # noqa: BLE001 - not installed, or refusing this numpy: the eager path serves
    numba = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

# A non-finite δ's position: left neighbours this far out make all four invalid,
# so the scatter pass skips the pixel without a separate flag.
_NOWHERE = -4


def available() -> bool:
    """Whether numba imported (so the compiled CPU kernels can run)."""
    return numba is not None


@functools.cache
def kernels_or_none() -> SimpleNamespace | None:
    """This module's six entry points when numba is usable, else None after one warning.

    The caller registers them as the CPU kernels of the custom ops, or keeps
    the eager PyTorch fallback when this returns None.
    """
    if available():
        return SimpleNamespace(
            warp_forward=warp_forward, warp_backward=warp_backward,
            merged_warp_forward=merged_warp_forward, merged_warp_backward=merged_warp_backward,
            warp_l1_forward=warp_l1_forward, warp_l1_backward=warp_l1_backward,
        )
    warnings.warn(
        f"tcae_kernels: numba is not usable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); CPU tensors "
        "run the eager PyTorch fallback, several times slower. pip install 'tcae-kernels[cpu]' to fix.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _jit(fn):
    """Serial, GIL-free machine code, cached on disk (or per process where no cache directory is writable)."""
    try:
        return njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available for file"
        return njit(cache=False, nogil=True, fastmath=False, error_model="numpy")(fn)


# Typed constants come from array dtypes (a.dtype.type(1)): numba would widen
# float32 arithmetic with a Python literal to float64. Offsets into src are
# uint64 so that indexing carries no negative-index wraparound, which keeps the
# per-row loops vectorizable. A row scratch (see _scratch) holds, per output
# pixel of one row: off [4, W] src offsets of the neighbours 00 01 10 11
# (clamped into src), wts [4, W] their bilinear weights (0 outside src or at a
# non-finite δ), idx [4, W] the clamped x0, x1, y0, y1, axw [8, W] the axis
# weights wx0 wx1 wy0 wy1 (0 outside) and in-bounds masks mx0 mx1 my0 my1 (as
# 0/1), flags [3, W] gate_x, gate_y, finite.
if numba is not None:

    @_jit
    def _bounds(size, border, one):
        """Clamp bounds of one axis: [0, size − 1] for border, [−2, size + 1] for zeros (size as a float)."""
        if border:
            return one - one, size - one
        return -(one + one), size + one

    @_jit
    def _axis(coord, d, lo, hi, border, one):
        """One axis of the position coord − d (pixels): left neighbour i0, right weight a, gradient gate.

        As ``warp._axis``: the weight is (coord − i0) − d, exact for δ of a few
        pixels at any distance from the origin, and the position is clamped in
        floating point before an integer is formed.
        """
        t = coord - d
        # Bounds are tested on d, exactly: t itself may have rounded onto one.
        inside = d >= coord - hi and d <= coord - lo
        tc = min(max(t, lo), hi)
        i0 = np.floor(tc)
        a = (coord - i0) - d if inside else tc - i0
        # t was rounded: it may sit on the integer just above its true floor.
        below = a < 0
        i0 = i0 - one if below else i0
        a = a + one if below else a
        gate = (d < coord and d > coord - hi) if border else True
        return int(i0), a, gate

    @_jit
    def _scratch(w, like):
        """Per-row scratch for W pixels, float arrays in like's dtype (layout above)."""
        return (
            np.empty((4, w), np.uint64), np.empty((4, w), like.dtype), np.empty((4, w), np.int32),
            np.empty((8, w), like.dtype), np.empty((3, w), np.bool_),
        )

    @_jit
    def _row_positions(dsx, ox, dsy, oy, xs, yf, bounds, border, w_in, h_in, s_h, s_w, scratch):
        """Where the pixels of one output row sample: δ of pixel x is (dsx[ox + x], dsy[oy + x]).

        xs holds the x coordinates and yf the row's y in the position dtype (δ's).
        """
        off, wts, idx, axw, flags = scratch
        lo_x, hi_x, lo_y, hi_y = bounds
        one = xs.dtype.type(1)
        zero = one - one
        us_h = np.uint64(s_h)
        us_w = np.uint64(s_w)
        for x in range(xs.shape[0]):
            dx = dsx[ox + x]
            dy = dsy[oy + x]
            xf = xs[x]
            f = (dx - dx == zero) and (dy - dy == zero)
            # A non-finite δ samples at its own pixel with zero weights; callers write NaN.
            dx = dx if f else xf
            dy = dy if f else yf
            x0, ax, gx = _axis(xf, dx, lo_x, hi_x, border, one)
            y0, ay, gy = _axis(yf, dy, lo_y, hi_y, border, one)
            vx0 = x0 >= 0 and x0 < w_in
            vx1 = x0 >= -1 and x0 < w_in - 1
            vy0 = y0 >= 0 and y0 < h_in
            vy1 = y0 >= -1 and y0 < h_in - 1
            wx0 = one - ax if vx0 and f else zero
            wx1 = ax if vx1 and f else zero
            wy0 = one - ay if vy0 and f else zero
            wy1 = ay if vy1 and f else zero
            cx0 = min(max(x0, 0), w_in - 1)
            cx1 = min(max(x0 + 1, 0), w_in - 1)
            cy0 = min(max(y0, 0), h_in - 1)
            cy1 = min(max(y0 + 1, 0), h_in - 1)
            off[0, x] = np.uint64(cy0) * us_h + np.uint64(cx0) * us_w
            off[1, x] = np.uint64(cy0) * us_h + np.uint64(cx1) * us_w
            off[2, x] = np.uint64(cy1) * us_h + np.uint64(cx0) * us_w
            off[3, x] = np.uint64(cy1) * us_h + np.uint64(cx1) * us_w
            wts[0, x] = wy0 * wx0
            wts[1, x] = wy0 * wx1
            wts[2, x] = wy1 * wx0
            wts[3, x] = wy1 * wx1
            idx[0, x] = cx0
            idx[1, x] = cx1
            idx[2, x] = cy0
            idx[3, x] = cy1
            axw[0, x] = wx0
            axw[1, x] = wx1
            axw[2, x] = wy0
            axw[3, x] = wy1
            axw[4, x] = one if vx0 else zero
            axw[5, x] = one if vx1 else zero
            axw[6, x] = one if vy0 else zero
            axw[7, x] = one if vy1 else zero
            flags[0, x] = gx
            flags[1, x] = gy
            flags[2, x] = f

    @_jit
    def _coords(w, like):
        """0 … W − 1 in like's dtype."""
        xs = np.empty(w, like.dtype)
        for x in range(w):
            xs[x] = like.dtype.type(x)
        return xs

    @_jit
    def _warp_bounds(like, w_in, h_in, border):
        t = like.dtype.type
        lo_x, hi_x = _bounds(t(w_in), border, t(1))
        lo_y, hi_y = _bounds(t(h_in), border, t(1))
        return lo_x, hi_x, lo_y, hi_y

    @_jit
    def _interpolate_row(src, base, off, wts, out, ob, os_w, w):
        """out[ob + x·os_w] = Σ_n wts[n, x] · src[base + off[n, x]] for one channel of one row."""
        for x in range(w):
            out[ob + np.uint64(x) * os_w] = (wts[0, x] * src[base + off[0, x]] + wts[1, x] * src[base + off[1, x]]) + (
                wts[2, x] * src[base + off[2, x]] + wts[3, x] * src[base + off[3, x]]
            )

    @_jit
    def _nan_where_not_finite(out, ob, os_c, os_w, c_, fin):
        for x in range(fin.shape[0]):
            if not fin[x]:
                for c in range(c_):
                    out[ob + c * os_c + x * os_w] = np.nan

    @_jit
    def _position_sums(src, base, off, axw, g, gb, g_w, sums, w):
        """sums[0, x] += g · ∂out/∂x̂, sums[1, x] += g · ∂out/∂ŷ for one channel of one row (SPEC section 2).

        With zero-filled neighbours outside src: ∂out/∂x̂ = wy0(v01 − v00) + wy1(v11 − v10),
        the masks (axw[4:8]) playing the zero fill.
        """
        for x in range(w):
            gv = g[gb + np.uint64(x) * g_w]
            v00 = src[base + off[0, x]]
            v01 = src[base + off[1, x]]
            v10 = src[base + off[2, x]]
            v11 = src[base + off[3, x]]
            sums[0, x] += gv * (axw[2, x] * (axw[5, x] * v01 - axw[4, x] * v00)
                                + axw[3, x] * (axw[5, x] * v11 - axw[4, x] * v10))
            sums[1, x] += gv * (axw[0, x] * (axw[7, x] * v10 - axw[6, x] * v00)
                                + axw[1, x] * (axw[7, x] * v11 - axw[6, x] * v01))

    @_jit
    def _keep_positions(pos, i, idx, axw, w):
        """Copy a row's clamped neighbours and axis weights into the per-pixel scratch of the scatter."""
        pidx, pw = pos
        for x in range(w):
            for k in range(4):
                pidx[k, i + x] = idx[k, x]
                pw[k, i + x] = axw[k, x]

    @_jit
    def _warp_fwd(src, ss, disp, out, so, sizes, border, r0, r1):
        """Rows r0 … r1 − 1 (over B·H) of T(src, δ); disp contiguous [B, 2, H, W]."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        xs = _coords(w, disp)
        bounds = _warp_bounds(disp, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, wts = scratch[0], scratch[1]
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _row_positions(disp, b * 2 * hw + y * w, disp, b * 2 * hw + hw + y * w, xs, disp.dtype.type(y),
                           bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            for c in range(c_):
                _interpolate_row(src, np.uint64(b * ss[0] + c * ss[1]), off, wts,
                                 out, np.uint64(b * so[0] + c * so[1] + y * so[2]), np.uint64(so[3]), w)
            _nan_where_not_finite(out, b * so[0] + y * so[2], so[1], so[3], c_, scratch[4][2])

    @_jit
    def _warp_bwd(src, ss, disp, g, sg, gdisp, pos, sizes, border, need_src, need_disp, r0, r1):
        """Rows r0 … r1 − 1 of ∂L/∂δ (gdisp contiguous [B, 2, H, W]) and/or the scatter's positions (pos)."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        xs = _coords(w, disp)
        bounds = _warp_bounds(disp, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, _, idx, axw, flags = scratch
        sums = np.empty((2, w), src.dtype)
        zero = src.dtype.type(0)
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _row_positions(disp, b * 2 * hw + y * w, disp, b * 2 * hw + hw + y * w, xs, disp.dtype.type(y),
                           bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            if need_src:
                _keep_positions(pos, q * w, idx, axw, w)
            if need_disp:
                sums[:] = zero
                for c in range(c_):
                    _position_sums(src, np.uint64(b * ss[0] + c * ss[1]), off, axw,
                                   g, np.uint64(b * sg[0] + c * sg[1] + y * sg[2]), np.uint64(sg[3]), sums, w)
                gd = b * 2 * hw + y * w
                for x in range(w):
                    # ∂x̂/∂δx = −1.
                    gdisp[gd + x] = (-sums[0, x] if flags[0, x] else zero) if flags[2, x] else np.nan
                    gdisp[gd + hw + x] = (-sums[1, x] if flags[1, x] else zero) if flags[2, x] else np.nan

    @_jit
    def _scatter_kernel(g, sg, pos, gsrc, sgs, sizes, p0, p1):
        """Planes p0 … p1 − 1 (over B·C) of ∂L/∂src += g · weight at the four neighbours, pixels in order."""
        b_, c_, h, w, h_in, w_in = sizes
        pidx, pw = pos
        g_h = np.uint64(sgs[2])
        g_w = np.uint64(sgs[3])
        for plane in range(p0, p1):
            b = plane // c_
            c = plane - b * c_
            base = np.uint64(b * sgs[0] + c * sgs[1])
            for y in range(h):
                gb = b * sg[0] + c * sg[1] + y * sg[2]
                for x in range(w):
                    i = (b * h + y) * w + x
                    gv = g[gb + x * sg[3]]
                    r0 = base + np.uint64(pidx[2, i]) * g_h
                    r1 = base + np.uint64(pidx[3, i]) * g_h
                    c0 = np.uint64(pidx[0, i]) * g_w
                    c1 = np.uint64(pidx[1, i]) * g_w
                    top = gv * pw[2, i]
                    bottom = gv * pw[3, i]
                    gsrc[r0 + c0] += top * pw[0, i]
                    gsrc[r0 + c1] += top * pw[1, i]
                    gsrc[r1 + c0] += bottom * pw[0, i]
                    gsrc[r1 + c1] += bottom * pw[1, i]

    @_jit
    def _merge_row(fa, fb, la, lb, b, y, w, hw, rows):
        """δ_a, δ_b, w_a and the merged δ of one row, float64 (rows [7, W]: dax day dbx dby wa dx dy).

        The fields are contiguous. w_a = sigmoid(l_a − l_b), as ``merge_displacements``.
        """
        for x in range(w):
            pix = y * w + x
            o = b * 2 * hw + pix
            dax = np.float64(fa[o])
            day = np.float64(fa[o + hw])
            dbx = np.float64(fb[o])
            dby = np.float64(fb[o + hw])
            wa = 1.0 / (1.0 + np.exp(np.float64(lb[b * hw + pix]) - np.float64(la[b * hw + pix])))
            rows[0, x] = dax
            rows[1, x] = day
            rows[2, x] = dbx
            rows[3, x] = dby
            rows[4, x] = wa
            rows[5, x] = wa * dax + (1.0 - wa) * dbx
            rows[6, x] = wa * day + (1.0 - wa) * dby

    @_jit
    def _merged_fwd(src, ss, fa, fb, la, lb, out, so, sizes, border, r0, r1):
        """Rows r0 … r1 − 1 of T(src, merged δ); positions in float64, channel arithmetic in src's dtype."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        rows = np.empty((7, w), np.float64)
        xs = _coords(w, rows)
        bounds = _warp_bounds(rows, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, wts = scratch[0], scratch[1]
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _merge_row(fa, fb, la, lb, b, y, w, hw, rows)
            _row_positions(rows[5], 0, rows[6], 0, xs, np.float64(y), bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            for c in range(c_):
                _interpolate_row(src, np.uint64(b * ss[0] + c * ss[1]), off, wts,
                                 out, np.uint64(b * so[0] + c * so[1] + y * so[2]), np.uint64(so[3]), w)
            _nan_where_not_finite(out, b * so[0] + y * so[2], so[1], so[3], c_, scratch[4][2])

    @_jit
    def _merged_bwd(src, ss, fa, fb, la, lb, g, sg, grads, pos, sizes, border, need_src, need_fields, r0, r1):
        """Rows r0 … r1 − 1 of the four fields' gradients (grads, contiguous) and/or the scatter's positions."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        gfa, gfb, gla, glb = grads
        rows = np.empty((7, w), np.float64)
        xs = _coords(w, rows)
        bounds = _warp_bounds(rows, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, _, idx, axw, flags = scratch
        sums = np.empty((2, w), src.dtype)
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _merge_row(fa, fb, la, lb, b, y, w, hw, rows)
            _row_positions(rows[5], 0, rows[6], 0, xs, np.float64(y), bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            if need_src:
                _keep_positions(pos, q * w, idx, axw, w)
            if need_fields:
                sums[:] = 0
                for c in range(c_):
                    _position_sums(src, np.uint64(b * ss[0] + c * ss[1]), off, axw,
                                   g, np.uint64(b * sg[0] + c * sg[1] + y * sg[2]), np.uint64(sg[3]), sums, w)
                for x in range(w):
                    od = b * 2 * hw + y * w + x
                    ol = b * hw + y * w + x
                    if not flags[2, x]:
                        gfa[od] = gfa[od + hw] = gfb[od] = gfb[od + hw] = gla[ol] = glb[ol] = np.nan
                        continue
                    gdx = -np.float64(sums[0, x]) if flags[0, x] else 0.0
                    gdy = -np.float64(sums[1, x]) if flags[1, x] else 0.0
                    # δ = w_a·δ_a + w_b·δ_b with ∂w_a/∂l_a = w_a·w_b = −∂w_a/∂l_b.
                    wa = rows[4, x]
                    wb = 1.0 - wa
                    gl = wa * wb * (gdx * (rows[0, x] - rows[2, x]) + gdy * (rows[1, x] - rows[3, x]))
                    gfa[od] = wa * gdx
                    gfa[od + hw] = wa * gdy
                    gfb[od] = wb * gdx
                    gfb[od + hw] = wb * gdy
                    gla[ol] = gl
                    glb[ol] = -gl

    @_jit
    def _l1_fwd(src, ss, disp, tgt, st, part, sizes, border, r0, r1):
        """part[q] = Σ over x, c of |T(src, δ) − target| on row q (over B·H), summed in float64."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        xs = _coords(w, disp)
        bounds = _warp_bounds(disp, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, wts, _, _, flags = scratch
        acc = np.empty(w, np.float64)
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _row_positions(disp, b * 2 * hw + y * w, disp, b * 2 * hw + hw + y * w, xs, disp.dtype.type(y),
                           bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            acc[:] = 0.0
            for c in range(c_):
                base = np.uint64(b * ss[0] + c * ss[1])
                tb = np.uint64(b * st[0] + c * st[1] + y * st[2])
                for x in range(w):
                    val = (wts[0, x] * src[base + off[0, x]] + wts[1, x] * src[base + off[1, x]]) + (
                        wts[2, x] * src[base + off[2, x]] + wts[3, x] * src[base + off[3, x]])
                    acc[x] += np.float64(abs(val - tgt[tb + np.uint64(x) * np.uint64(st[3])]))
            total = 0.0
            for x in range(w):
                total += acc[x] if flags[2, x] else np.nan
            part[q] = total

    @_jit
    def _l1_bwd(src, ss, disp, tgt, st, gloss, inv_count, gbuf, gdisp, gtgt, pos, sizes, border,
                need_src, need_disp, need_target, r0, r1):
        """Rows r0 … r1 − 1: ∂loss[b]/∂out = sign(out − target)·grad_loss[b]/(C·H·W) into gbuf (contiguous,
        for the scatter), ∂L/∂δ into gdisp and ∂L/∂target into gtgt (contiguous), as asked."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        xs = _coords(w, disp)
        bounds = _warp_bounds(disp, w_in, h_in, border)
        scratch = _scratch(w, src)
        off, wts, idx, axw, flags = scratch
        sums = np.empty((2, w), src.dtype)
        gval = np.empty(w, src.dtype)
        zero = src.dtype.type(0)
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _row_positions(disp, b * 2 * hw + y * w, disp, b * 2 * hw + hw + y * w, xs, disp.dtype.type(y),
                           bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            if need_src:
                _keep_positions(pos, q * w, idx, axw, w)
            g_b = src.dtype.type(gloss[b]) * src.dtype.type(inv_count)
            sums[:] = zero
            for c in range(c_):
                base = np.uint64(b * ss[0] + c * ss[1])
                tb = np.uint64(b * st[0] + c * st[1] + y * st[2])
                for x in range(w):
                    val = (wts[0, x] * src[base + off[0, x]] + wts[1, x] * src[base + off[1, x]]) + (
                        wts[2, x] * src[base + off[2, x]] + wts[3, x] * src[base + off[3, x]])
                    diff = val - tgt[tb + np.uint64(x) * np.uint64(st[3])]
                    gval[x] = g_b if diff > 0 else (-g_b if diff < 0 else zero)
                ob = ((b * c_ + c) * h + y) * w
                if need_disp:
                    _position_sums(src, base, off, axw, gval, np.uint64(0), np.uint64(1), sums, w)
                if need_src:
                    gbuf[ob:ob + w] = gval
                if need_target:
                    for x in range(w):
                        # |NaN − t| has no slope: NaN, as autograd gives for abs at NaN.
                        gtgt[ob + x] = -gval[x] if flags[2, x] else np.nan
            if need_disp:
                gd = b * 2 * hw + y * w
                for x in range(w):
                    gdisp[gd + x] = (-sums[0, x] if flags[0, x] else zero) if flags[2, x] else np.nan
                    gdisp[gd + hw + x] = (-sums[1, x] if flags[1, x] else zero) if flags[2, x] else np.nan


# Below this many output values a call runs on the calling thread only: handing
# work to another thread costs tens of µs, more on a busy machine.
PARALLEL_MIN_VALUES = 1 << 16
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1


def _run(kernel, args: tuple, n: int, values: int) -> None:
    """kernel(*args, lo, hi) over [0, n) in contiguous ranges, one per torch thread (at most).

    The kernels release the GIL. Each range's result does not depend on how
    [0, n) is split, so any thread count gives the same bits.
    """
    global _pool, _pool_pid
    threads = min(torch.get_num_threads(), n, max(1, values // PARALLEL_MIN_VALUES))
    if threads <= 1:
        kernel(*args, 0, n)
        return
    if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the parent's threads
        _pool, _pool_pid = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)), os.getpid()
    cuts = [n * k // threads for k in range(threads + 1)]
    futures = [_pool.submit(kernel, *args, cuts[k], cuts[k + 1]) for k in range(1, threads)]
    kernel(*args, cuts[0], cuts[1])
    for f in futures:
        f.result()


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(src: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last src, else contiguous: the format of [B, C, H, W] results."""
    channels_last = src.is_contiguous(memory_format=torch.channels_last) and not src.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _flat(t: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """t's memory from its first element as a 1-D numpy array (no copy), and t's strides in elements.

    t: on the CPU, float32 or float64. An empty t gives a one-element dummy the kernels never read.
    """
    t = t.detach()
    if t.numel() == 0:
        return np.zeros(1, dtype=np.float64 if t.dtype == torch.float64 else np.float32), (0,) * t.dim()
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,)).numpy(), tuple(t.stride())


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, strides kept where they can be (a copy only for another dtype)."""
    return t.detach() if t.dtype == dtype else t.detach().to(dtype)


def _source(src: torch.Tensor, acc: torch.dtype) -> tuple[np.ndarray, tuple[int, ...], int, int]:
    """src for the kernels: (flat array, strides, H_in, W_in).

    A source without pixels becomes one zero pixel: every sample then reads 0,
    as every neighbour of an empty source is outside it.
    """
    b, c, h_in, w_in = src.shape
    if h_in * w_in == 0:
        return *_flat(torch.zeros(b, c, 1, 1, dtype=acc)), 1, 1
    return *_flat(_to(src, acc)), h_in, w_in


def _scatter_scratch(n: int, acc: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: clamped x0, x1, y0, y1 and axis weights wx0, wx1, wy0, wy1 (empty when n is 0)."""
    return np.empty((4, n), np.int32), np.empty((4, n), np.float64 if acc == torch.float64 else np.float32)


def _grad_src_buffer(src: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return torch.empty(src.shape, dtype=acc, memory_format=_memory_format(src)).zero_()


def _scatter(g: tuple[np.ndarray, tuple[int, ...]], pos, grad_src: torch.Tensor, sizes: tuple[int, ...]) -> None:
    """grad_src += the scatter of g (flat, strides) through the positions pos: one task per (b, c) plane."""
    b, c, h, w = sizes[:4]
    if grad_src.numel() and b * c * h * w:
        gs = _flat(grad_src)
        _run(_scatter_kernel, (*g, pos, *gs, sizes), b * c, b * c * h * w)


def warp_forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """T(src, δ): src [B, C, H_in, W_in], disp [B, 2, H, W] in pixels → [B, C, H, W] in src's dtype."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    out = torch.empty((b, c, h, w), dtype=acc, memory_format=_memory_format(src))
    if out.numel():
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        d = _flat(_to(disp, acc).contiguous())[0]
        _run(_warp_fwd, (s, ss, d, *_flat(out), sizes, padding == "border"), b * h, out.numel())
    return out.to(src.dtype)


def warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, need_src: bool, need_disp: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂src in src's dtype and memory format | None, ∂L/∂δ contiguous in disp's dtype | None)."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    grad_src = _grad_src_buffer(src, acc) if need_src else None
    grad_disp = torch.empty(disp.shape, dtype=acc) if need_disp else None
    if b * h * w and (need_src or need_disp):
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        g = _flat(_to(grad_out, acc))
        pos = _scatter_scratch(b * h * w if need_src else 0, acc)
        gd = _flat(grad_disp)[0] if need_disp else np.empty(0, s.dtype)
        d = _flat(_to(disp, acc).contiguous())[0]
        _run(_warp_bwd, (s, ss, d, *g, gd, pos, sizes, padding == "border", need_src, need_disp),
             b * h, b * max(c, 1) * h * w)
        if need_src:
            _scatter(g, pos, grad_src, sizes)
    return (
        grad_src.to(src.dtype) if need_src else None,
        grad_disp.to(disp.dtype) if need_disp else None,
    )


def _fields(fields: tuple[torch.Tensor, ...], acc: torch.dtype) -> list[np.ndarray]:
    """The merge's four fields, contiguous in the arithmetic dtype (a copy only if they are not), flat."""
    return [_flat(_to(f, acc).contiguous())[0] for f in fields]


def merged_warp_forward(
    src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str,
) -> torch.Tensor:
    """T(src, w_a·δ_a + (1 − w_a)·δ_b), w_a = sigmoid(l_a − l_b), merged in float64 per pixel.

    disp_a, disp_b: [B, 2, H, W] pixels; logit_a, logit_b: [B, 1, H, W]. → [B, C, H, W] in src's dtype.
    """
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp_a.shape[2:]
    out = torch.empty((b, c, h, w), dtype=acc, memory_format=_memory_format(src))
    if out.numel():
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        fields = _fields((disp_a, disp_b, logit_a, logit_b), acc)
        _run(_merged_fwd, (s, ss, *fields, *_flat(out), sizes, padding == "border"), b * h, out.numel())
    return out.to(src.dtype)


def merged_warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str, need_src: bool, need_fields: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """(∂L/∂src | None, [∂L/∂disp_a, ∂L/∂disp_b, ∂L/∂logit_a, ∂L/∂logit_b] (contiguous, fields' dtype) | None)."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp_a.shape[2:]
    inputs = (disp_a, disp_b, logit_a, logit_b)
    grad_src = _grad_src_buffer(src, acc) if need_src else None
    grads = [torch.empty(f.shape, dtype=acc) for f in inputs] if need_fields else None
    if b * h * w and (need_src or need_fields):
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        g = _flat(_to(grad_out, acc))
        pos = _scatter_scratch(b * h * w if need_src else 0, acc)
        gf = tuple(_flat(t)[0] for t in grads) if need_fields else (np.empty(0, s.dtype),) * 4
        _run(_merged_bwd, (s, ss, *_fields(inputs, acc), *g, gf, pos, sizes, padding == "border",
                           need_src, need_fields), b * h, b * max(c, 1) * h * w)
        if need_src:
            _scatter(g, pos, grad_src, sizes)
    return (
        grad_src.to(src.dtype) if need_src else None,
        [t.to(f.dtype) for t, f in zip(grads, inputs)] if need_fields else None,
    )


def warp_l1_forward(src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str) -> torch.Tensor:
    """loss[b] = mean over (c, y, x) of |T(src, δ) − target|: [B], float32 (float64 for float64).

    Each row is summed in float64, then each sample's rows in order. An empty
    sample (C·H·W = 0) gives NaN, as the mean of nothing.
    """
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    count = c * h * w
    if count == 0:
        return torch.full((b,), float("nan"), dtype=acc)
    part = np.empty(b * h, np.float64)
    if b:
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        d = _flat(_to(disp, acc).contiguous())[0]
        _run(_l1_fwd, (s, ss, d, *_flat(_to(target, acc)), part, sizes, padding == "border"), b * h, b * count)
    return torch.from_numpy(part.reshape(b, h).sum(axis=1) / count).to(acc)


def warp_l1_backward(
    grad_loss: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, need_target: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_loss [B] → (∂L/∂src | None, ∂L/∂δ | None, ∂L/∂target | None); δ's and target's contiguous.

    ∂loss[b]/∂out = sign(out − target)/(C·H·W), 0 where they are equal.
    """
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    count = c * h * w
    grad_src = _grad_src_buffer(src, acc) if need_src else None
    grad_disp = torch.zeros(disp.shape, dtype=acc) if need_disp else None
    grad_target = torch.zeros(target.shape, dtype=acc) if need_target else None
    if b * count and (need_src or need_disp or need_target):
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        none = np.empty(0, s.dtype)
        pos = _scatter_scratch(b * h * w if need_src else 0, acc)
        gbuf = np.empty(b * count if need_src else 0, s.dtype)
        gd = _flat(grad_disp)[0] if need_disp else none
        gt = _flat(grad_target)[0] if need_target else none
        gl = _to(grad_loss, acc).contiguous().numpy()
        d = _flat(_to(disp, acc).contiguous())[0]
        _run(_l1_bwd, (s, ss, d, *_flat(_to(target, acc)), gl, 1.0 / count, gbuf, gd, gt, pos, sizes,
                       padding == "border", need_src, need_disp, need_target), b * h, b * count)
        if need_src:
            _scatter((gbuf, (count, h * w, w, 1)), pos, grad_src, sizes)
    return (
        grad_src.to(src.dtype) if need_src else None,
        grad_disp.to(disp.dtype) if need_disp else None,
        grad_target.to(target.dtype) if need_target else None,
    )
