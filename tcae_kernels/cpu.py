"""Compiled CPU kernels of every op (numba): the Triton kernels' math as loops over pixels.

numba compiles them with LLVM at the first call (no C/C++ toolchain on the
user's machine; 2-4 s for each op's forward or backward and dtype) and caches
the machine code on disk: in ``__pycache__`` next to this file when that is
writable, else in ``~/.cache/numba``, or in ``$NUMBA_CACHE_DIR`` when set;
later processes load it in about 0.5 s. With no writable place at all they
compile once per process.

Semantics are those of the Triton kernels in ``ops/`` (SPEC sections 1-3): the
same position arithmetic (weights (x − ⌊x̂⌋) − δ, bounds tested on δ, the
"below" floor correction, border gates), NaN at a non-finite δ, which sends
nothing to ∂L/∂src. Arithmetic is float32 (float64 for float64 src);
float16/bfloat16 inputs are converted to float32 at the boundary (one copy
each way). ``merged_warp`` merges the displacements and forms positions in
float64, as its kernel does.

Layouts: src, grad_out and target are read in place through their strides
(NCHW, channels_last, slices, expanded: no copy); δ and the merge's fields are
made contiguous (a copy only if they are not; they are small). Results follow
src's memory format; gradients of δ and the fields are contiguous.

Threads: torch.get_num_threads() of them, on numba's threads (a driver per
kernel compiled with parallel=True: OpenMP or TBB, whose workers wait for work
spinning) once the driver is compiled, else on a small pool of Python threads
(the kernels release the GIL): see _run. Calls below PARALLEL_MIN_VALUES output
values stay on the calling thread.

Determinism: forward, loss and ∂L/∂δ reduce per pixel or per row in a fixed
order. ∂L/∂src is a scatter: each task owns whole (b, c) planes and adds its
pixels' contributions row by row, pixel by pixel. The result is bitwise the
same for any number of threads.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from .fallback import splat_importance, splat_output_grads

try:
    import numba
    from numba import njit, prange
    from numba.core import types as _types
    from numba.extending import overload
except Exception as e:  # noqa: BLE001 - not installed, or refusing this numpy: the eager path serves
    numba = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

def available() -> bool:
    """Whether numba imported (so the compiled CPU kernels can run)."""
    return numba is not None


@functools.cache
def kernels_or_none() -> SimpleNamespace | None:
    """This module's entry points when numba is usable, else None after one warning.

    The caller registers them as the CPU kernels of the custom ops, or keeps
    the eager PyTorch fallback when this returns None.
    """
    if available():
        return SimpleNamespace(
            warp_forward=warp_forward, warp_backward=warp_backward,
            warp_variant_forward=warp_variant_forward, warp_variant_backward=warp_variant_backward,
            merged_warp_forward=merged_warp_forward, merged_warp_backward=merged_warp_backward,
            warp_l1_forward=warp_l1_forward, warp_l1_backward=warp_l1_backward,
            splat_forward=splat_forward, splat_backward=splat_backward,
        )
    warnings.warn(
        f"tcae_kernels: numba is not usable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); CPU tensors "
        "run the eager PyTorch fallback, several times slower. pip install 'tcae-kernels[cpu]' to fix.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _jit(fn=None, **options):
    """Serial, GIL-free machine code, cached on disk (or per process where no cache directory is writable)."""
    if fn is None:
        return lambda f: _jit(f, **options)
    try:
        return njit(cache=True, nogil=True, fastmath=False, error_model="numpy", **options)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available for file"
        return njit(cache=False, nogil=True, fastmath=False, error_model="numpy", **options)(fn)


# How the kernels are written, and why:
# - Typed constants come from array dtypes (a.dtype.type(1)): numba would widen
#   float32 arithmetic with a Python literal to float64.
# - Each output row is processed in short loops over its pixels that LLVM
#   vectorizes: first the positions into a row scratch, then one loop per
#   channel. A loop that stores into more than ~10 arrays is left scalar by
#   LLVM (too many runtime alias checks), hence several small loops.
# - Offsets are uint64: numba adds a negative-index wraparound to signed
#   indices, which turns contiguous loads into slow gathers.
# - The row loops (forward and backward) are functions of their own compiled
#   with _nrt=False, their arrays allocated by the caller: numba's
#   reference-count pruning gives up on large functions and leaves an atomic
#   incref/decref of every array an inlined helper receives, in every row or
#   even every pixel (it had doubled the forward's time).
# - LLVM cannot vectorize a loop that loads src at gathered offsets and stores
#   elsewhere: it cannot bound the offsets, so it cannot rule out aliasing. ∂L/∂δ
#   therefore copies each channel's neighbours into contiguous rows with a
#   scalar loop and does its arithmetic in a separate, vectorized loop
#   (_position_sums). Gathering two or three channels per copy loop, or
#   blocks of several rows, measured slower or no faster.
# A row scratch (see _scratch) holds for each pixel x of the row: off[n][x],
# the offset in src of neighbour n (00, 01, 10, 11: (y0, x0), (y0, x1), ...),
# clamped into src; wts[n][x], its bilinear weight (0 outside src and at a
# non-finite δ); axw[k][x], the slopes of the four weights along x̂ (k < 4) and
# along ŷ (k ≥ 4), for ∂L/∂δ; flags[k][x]: gate_x, gate_y, finite.
# Reading a clamped neighbour with weight 0 instead of skipping it is what the
# float64 reference and the eager fallback do too; it differs from skipping only
# where a non-finite src or ∂L/∂out value meets a zero weight (0·Inf is NaN).
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

    @_jit(inline="always")
    def _scratch(w, like):
        """A row scratch for W pixels (layout above), floats in like's dtype."""
        f = like.dtype
        return (
            (np.empty(w, np.uint64), np.empty(w, np.uint64), np.empty(w, np.uint64), np.empty(w, np.uint64)),
            (np.empty(w, f), np.empty(w, f), np.empty(w, f), np.empty(w, f)),
            (np.empty(w, f), np.empty(w, f), np.empty(w, f), np.empty(w, f),
             np.empty(w, f), np.empty(w, f), np.empty(w, f), np.empty(w, f)),
            (np.empty(w, np.bool_), np.empty(w, np.bool_), np.empty(w, np.bool_)),
        )

    @_jit
    def _coords(w, like):
        """0 … W − 1 in like's dtype (the position dtype)."""
        xs = np.empty(w, like.dtype)
        for x in range(w):
            xs[x] = like.dtype.type(x)
        return xs

    @_jit
    def _clamp_bounds(like, w_in, h_in, border):
        """(lo_x, hi_x, lo_y, hi_y) in like's dtype (the position dtype)."""
        t = like.dtype.type
        lo_x, hi_x = _bounds(t(w_in), border, t(1))
        lo_y, hi_y = _bounds(t(h_in), border, t(1))
        return lo_x, hi_x, lo_y, hi_y

    @_jit(inline="always")
    def _store_offsets(off, x, x0, y0, w_in, h_in, us_w, us_h):
        """off[n][x]: the src offsets of pixel x's four neighbours, indices clamped into src
        (a neighbour outside reads there with weight 0)."""
        cx0 = np.uint64(min(max(x0, 0), w_in - 1)) * us_w
        cx1 = np.uint64(min(max(x0 + 1, 0), w_in - 1)) * us_w
        cy0 = np.uint64(min(max(y0, 0), h_in - 1)) * us_h
        cy1 = np.uint64(min(max(y0 + 1, 0), h_in - 1)) * us_h
        off[0][x] = cy0 + cx0
        off[1][x] = cy0 + cx1
        off[2][x] = cy1 + cx0
        off[3][x] = cy1 + cx1

    @_jit(inline="always")
    def _row_positions(dsx, ox, dsy, oy, xs, yf, bounds, border, w_in, h_in, s_h, s_w, scratch):
        """off, wts and finite of one output row; δ of pixel x is (dsx[ox + x], dsy[oy + x]).

        xs holds the x coordinates, yf the row's y, both in δ's dtype (the
        position dtype); s_h, s_w: src's strides.
        """
        off, wts, _, flags = scratch
        lo_x, hi_x, lo_y, hi_y = bounds
        one = xs.dtype.type(1)
        zero = one - one
        us_h = np.uint64(s_h)
        us_w = np.uint64(s_w)
        uox = np.uint64(ox)
        uoy = np.uint64(oy)
        for x in range(xs.shape[0]):
            dx = dsx[uox + np.uint64(x)]
            dy = dsy[uoy + np.uint64(x)]
            xf = xs[x]
            f = (dx - dx == zero) and (dy - dy == zero)
            # A non-finite δ samples at its own pixel with zero weights; callers write NaN.
            dx = dx if f else xf
            dy = dy if f else yf
            x0, ax, _ = _axis(xf, dx, lo_x, hi_x, border, one)
            y0, ay, _ = _axis(yf, dy, lo_y, hi_y, border, one)
            wx0 = one - ax if x0 >= 0 and x0 < w_in and f else zero
            wx1 = ax if x0 >= -1 and x0 < w_in - 1 and f else zero
            wy0 = one - ay if y0 >= 0 and y0 < h_in and f else zero
            wy1 = ay if y0 >= -1 and y0 < h_in - 1 and f else zero
            _store_offsets(off, x, x0, y0, w_in, h_in, us_w, us_h)
            wts[0][x] = wy0 * wx0
            wts[1][x] = wy0 * wx1
            wts[2][x] = wy1 * wx0
            wts[3][x] = wy1 * wx1
            flags[2][x] = f

    @_jit(inline="always")
    def _row_gradient_terms(dsx, ox, dsy, oy, xs, yf, bounds, border, w_in, h_in, s_h, s_w, scratch, alone):
        """The slopes axw and the gates of one output row (arguments as _row_positions): what ∂L/∂δ
        needs. ``alone``: also off and finite, which _row_positions has not written (∂L/∂δ without
        ∂L/∂src). A flag, not two inlined copies: each copy added 1.2 s to the backward's cold compile."""
        off, _, axw, flags = scratch
        lo_x, hi_x, lo_y, hi_y = bounds
        one = xs.dtype.type(1)
        zero = one - one
        us_h = np.uint64(s_h)
        us_w = np.uint64(s_w)
        uox = np.uint64(ox)
        uoy = np.uint64(oy)
        for x in range(xs.shape[0]):
            # _axis's gate: with border padding, δ gets no gradient where the position is on or past the edge.
            dx = dsx[uox + np.uint64(x)]
            dy = dsy[uoy + np.uint64(x)]
            flags[0][x] = (dx < xs[x] and dx > xs[x] - hi_x) if border else True
            flags[1][x] = (dy < yf and dy > yf - hi_y) if border else True
            if alone:
                flags[2][x] = (dx - dx == zero) and (dy - dy == zero)
        for x in range(xs.shape[0]):
            dx = dsx[uox + np.uint64(x)]
            dy = dsy[uoy + np.uint64(x)]
            f = (dx - dx == zero) and (dy - dy == zero)
            x0, ax, _ = _axis(xs[x], dx if f else xs[x], lo_x, hi_x, border, one)
            y0, ay, _ = _axis(yf, dy if f else yf, lo_y, hi_y, border, one)
            if alone:
                _store_offsets(off, x, x0, y0, w_in, h_in, us_w, us_h)
            vx0 = x0 >= 0 and x0 < w_in
            vx1 = x0 >= -1 and x0 < w_in - 1
            vy0 = y0 >= 0 and y0 < h_in
            vy1 = y0 >= -1 and y0 < h_in - 1
            wx0 = one - ax if vx0 and f else zero
            wx1 = ax if vx1 and f else zero
            wy0 = one - ay if vy0 and f else zero
            wy1 = ay if vy1 and f else zero
            # ∂wts[n]/∂x̂ and ∂wts[n]/∂ŷ: the slopes of the zero-filled bilinear interpolation.
            axw[0][x] = -wy0 if vx0 else zero
            axw[1][x] = wy0 if vx1 else zero
            axw[2][x] = -wy1 if vx0 else zero
            axw[3][x] = wy1 if vx1 else zero
            axw[4][x] = -wx0 if vy0 else zero
            axw[5][x] = -wx1 if vy0 else zero
            axw[6][x] = wx0 if vy1 else zero
            axw[7][x] = wx1 if vy1 else zero

    @_jit(inline="always")
    def _interpolate_row(src, base, off, wts, out, ob, os_w, w):
        """out[ob + x·os_w] = Σ_n wts[n][x] · src[base + off[n][x]]: one channel of one row."""
        for x in range(w):
            out[ob + np.uint64(x) * os_w] = (wts[0][x] * src[base + off[0][x]] + wts[1][x] * src[base + off[1][x]]) + (
                wts[2][x] * src[base + off[2][x]] + wts[3][x] * src[base + off[3][x]]
            )

    @_jit(inline="always")
    def _interpolate_rows3(src, base, s_c, off, wts, out, ob, os_c, os_w, w):
        """_interpolate_row for three channels at once: each pixel's offsets and weights are loaded once."""
        b1 = base + s_c
        b2 = b1 + s_c
        o1 = ob + os_c
        o2 = o1 + os_c
        for x in range(w):
            p0, p1, p2, p3 = off[0][x], off[1][x], off[2][x], off[3][x]
            w0, w1, w2, w3 = wts[0][x], wts[1][x], wts[2][x], wts[3][x]
            ux = np.uint64(x) * os_w
            out[ob + ux] = (w0 * src[base + p0] + w1 * src[base + p1]) + (w2 * src[base + p2] + w3 * src[base + p3])
            out[o1 + ux] = (w0 * src[b1 + p0] + w1 * src[b1 + p1]) + (w2 * src[b1 + p2] + w3 * src[b1 + p3])
            out[o2 + ux] = (w0 * src[b2 + p0] + w1 * src[b2 + p1]) + (w2 * src[b2 + p2] + w3 * src[b2 + p3])

    @_jit(inline="always")
    def _interpolate_channels(src, ss, off, wts, out, so, b, y, c_, w):
        """All channels of output row (b, y): three at a time, then the rest one by one."""
        for c in range(0, c_ - 2, 3):
            _interpolate_rows3(src, np.uint64(b * ss[0] + c * ss[1]), np.uint64(ss[1]), off, wts, out,
                               np.uint64(b * so[0] + c * so[1] + y * so[2]), np.uint64(so[1]), np.uint64(so[3]), w)
        for c in range(c_ - c_ % 3, c_):
            _interpolate_row(src, np.uint64(b * ss[0] + c * ss[1]), off, wts,
                             out, np.uint64(b * so[0] + c * so[1] + y * so[2]), np.uint64(so[3]), w)

    @_jit
    def _nan_where_not_finite(out, ob, os_c, os_w, c_, finite):
        for x in range(finite.shape[0]):
            if not finite[x]:
                for c in range(c_):
                    out[ob + c * os_c + x * os_w] = np.nan

    def _bfloat16_bits(src):
        """Whether src holds bfloat16 bit patterns (uint16): a constant of each compiled specialization."""

    @overload(_bfloat16_bits, inline="always")
    def _bfloat16_bits_typed(src):
        bits = src.dtype == _types.uint16
        return lambda src: bits

    @_jit(inline="always")
    def _position_sums(src, sb, s_c, off, axw, g, gb, g_c, g_w, c_, sums, vals, w):
        """sums[0, x] = Σ_c g·∂out/∂x̂ and sums[1, x] = Σ_c g·∂out/∂ŷ over one row (SPEC section 2).

        ∂out/∂x̂ = Σ_n axw[n][x]·v_n, ∂out/∂ŷ = Σ_n axw[4 + n][x]·v_n over the
        neighbours' values v_n; channels in order. Per channel, a scalar loop
        copies the four neighbours (and g, if strided) into vals [5, W], then a
        loop over contiguous rows does the arithmetic, which LLVM vectorizes
        (see the note above).
        """
        sums[:] = 0
        bits = vals.view(np.uint32)
        for c in range(c_):
            cb = sb + np.uint64(c) * s_c
            gp = gb + np.uint64(c) * g_c
            if _bfloat16_bits(src):  # a bfloat16 is the top half of the float32 it equals
                for x in range(w):
                    bits[0, x] = np.uint32(src[cb + off[0][x]]) << np.uint32(16)
                    bits[1, x] = np.uint32(src[cb + off[1][x]]) << np.uint32(16)
                    bits[2, x] = np.uint32(src[cb + off[2][x]]) << np.uint32(16)
                    bits[3, x] = np.uint32(src[cb + off[3][x]]) << np.uint32(16)
            else:
                for x in range(w):
                    vals[0, x] = src[cb + off[0][x]]
                    vals[1, x] = src[cb + off[1][x]]
                    vals[2, x] = src[cb + off[2][x]]
                    vals[3, x] = src[cb + off[3][x]]
            # g's row as it is when contiguous, else copied into vals[4].
            gr, go = g, gp
            if g_w != 1:
                gr, go = vals[4], np.uint64(0)
                for x in range(w):
                    gr[x] = g[gp + np.uint64(x) * g_w]
            for x in range(w):
                v00, v01, v10, v11, gv = vals[0, x], vals[1, x], vals[2, x], vals[3, x], gr[go + np.uint64(x)]
                sums[0, x] += gv * ((axw[0][x] * v00 + axw[1][x] * v01) + (axw[2][x] * v10 + axw[3][x] * v11))
                sums[1, x] += gv * ((axw[4][x] * v00 + axw[5][x] * v01) + (axw[6][x] * v10 + axw[7][x] * v11))

    @_jit(inline="always")
    def _disp_grad_row(gdisp, gd, hw, sums, flags, w):
        """One row of ∂L/∂δ (contiguous [B, 2, H, W], row offset gd): −sums where gated, NaN where δ is not finite."""
        zero = sums.dtype.type(0)
        ux = np.uint64(gd)
        uy = np.uint64(gd + hw)
        for x in range(w):
            # ∂x̂/∂δx = −1.
            gdisp[ux + np.uint64(x)] = (-sums[0, x] if flags[0][x] else zero) if flags[2][x] else np.nan
            gdisp[uy + np.uint64(x)] = (-sums[1, x] if flags[1][x] else zero) if flags[2][x] else np.nan

    @_jit(inline="always")
    def _row_field(disp, sd, b, y, w, flow, neg):
        """Where row y of batch element b of δ is read: (dsx, ox, dsy, oy), δ of pixel x being
        (dsx[ox + x], dsy[oy + x]). disp is [B, 2, H, W] with strides sd, either with contiguous
        rows (sd[3] = 1), read in place, or channels_last ((δx, δy) pairs: sd[1] = 1, sd[3] = 2),
        whose row is split into the scratch neg [2, W], which stays in cache; a flow's row is
        negated there (x + f = x − (−f), exact).
        """
        ox = b * sd[0] + y * sd[2]
        if sd[3] == 1 and not flow:
            return disp, ox, disp, ox + sd[1]
        u = np.uint64(ox)
        if sd[3] == 1:
            uy = np.uint64(ox + sd[1])
            for x in range(w):
                neg[0, x] = -disp[u + np.uint64(x)]
                neg[1, x] = -disp[uy + np.uint64(x)]
        elif flow:
            # Each pair read from one base at constant offsets: LLVM vectorizes the split.
            for x in range(w):
                neg[0, x] = -disp[u + np.uint64(2 * x)]
                neg[1, x] = -disp[u + np.uint64(2 * x + 1)]
        else:
            for x in range(w):
                neg[0, x] = disp[u + np.uint64(2 * x)]
                neg[1, x] = disp[u + np.uint64(2 * x + 1)]
        return neg[0], 0, neg[1], 0

    @_jit(_nrt=False)
    def _warp_fwd_rows(src, ss, disp, sd, out, so, mask, sizes, border, flow, want_mask, r0, r1, xs, bounds,
                       scratch, neg):
        """The rows of _warp_fwd, the caller allocating the scratch (no reference counting: see _warp_bwd_rows)."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        off, wts, _, flags = scratch
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            dsx, ox, dsy, oy = _row_field(disp, sd, b, y, w, flow, neg)
            _row_positions(dsx, ox, dsy, oy, xs, disp.dtype.type(y), bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            _interpolate_channels(src, ss, off, wts, out, so, b, y, c_, w)
            _nan_where_not_finite(out, b * so[0] + y * so[2], so[1], so[3], c_, flags[2])
            if want_mask:
                for x in range(w):
                    m = (wts[0][x] + wts[1][x]) + (wts[2][x] + wts[3][x])
                    mask[b * hw + y * w + x] = m if flags[2][x] else np.nan

    @_jit
    def _warp_fwd(src, ss, disp, sd, out, so, mask, sizes, border, flow, want_mask, r0, r1):
        """Rows r0 … r1 − 1 (over B·H) of T(src, δ), or of the warp at x + disp when ``flow``;
        disp [B, 2, H, W] with strides sd. With want_mask, mask [B, H·W] (contiguous) gets each
        pixel's weight inside src (NaN at a non-finite δ)."""
        w, h_in, w_in = sizes[3:]
        _warp_fwd_rows(src, ss, disp, sd, out, so, mask, sizes, border, flow, want_mask, r0, r1,
                       _coords(w, disp), _clamp_bounds(disp, w_in, h_in, border), _scratch(w, src),
                       np.empty((2, w), disp.dtype))

    @_jit
    def _merge_row(fa, fb, la, lb, b, y, w, hw, rows):
        """δ_a, δ_b, w_a and the merged δ of one row, float64 (rows [7, W]: dax day dbx dby wa dx dy).

        The fields are contiguous. w_a = sigmoid(l_a − l_b), as ``merge_displacements``.
        """
        od = np.uint64(b * 2 * hw + y * w)
        ol = np.uint64(b * hw + y * w)
        uhw = np.uint64(hw)
        for x in range(w):
            o = od + np.uint64(x)
            dax = np.float64(fa[o])
            day = np.float64(fa[o + uhw])
            dbx = np.float64(fb[o])
            dby = np.float64(fb[o + uhw])
            wa = 1.0 / (1.0 + np.exp(np.float64(lb[ol + np.uint64(x)]) - np.float64(la[ol + np.uint64(x)])))
            rows[0, x] = dax
            rows[1, x] = day
            rows[2, x] = dbx
            rows[3, x] = dby
            rows[4, x] = wa
            rows[5, x] = wa * dax + (1.0 - wa) * dbx
            rows[6, x] = wa * day + (1.0 - wa) * dby

    @_jit(inline="always")
    def _scatter_row(g, gb, g_c, g_w, off, wts, gsrc, base, gs_c, c0, c1, w):
        """∂L/∂src += g · wts[n] at off[n], channels c0 … c1 − 1 of one output row, pixels in order.

        Three channels at a time (each pixel's offsets and weights loaded once), then the rest.
        """
        for c in range(c0, c1 - 2, 3):
            gp = gb + np.uint64(c) * g_c
            sp = base + np.uint64(c) * gs_c
            for x in range(w):
                p0, p1, p2, p3 = off[0][x], off[1][x], off[2][x], off[3][x]
                w0, w1, w2, w3 = wts[0][x], wts[1][x], wts[2][x], wts[3][x]
                gq = gp + np.uint64(x) * g_w
                for k in range(3):
                    gv = g[gq + np.uint64(k) * g_c]
                    sk = sp + np.uint64(k) * gs_c
                    gsrc[sk + p0] += gv * w0
                    gsrc[sk + p1] += gv * w1
                    gsrc[sk + p2] += gv * w2
                    gsrc[sk + p3] += gv * w3
        for c in range(c1 - (c1 - c0) % 3, c1):
            gp = gb + np.uint64(c) * g_c
            sp = base + np.uint64(c) * gs_c
            for x in range(w):
                gv = g[gp + np.uint64(x) * g_w]
                gsrc[sp + off[0][x]] += gv * wts[0][x]
                gsrc[sp + off[1][x]] += gv * wts[1][x]
                gsrc[sp + off[2][x]] += gv * wts[2][x]
                gsrc[sp + off[3][x]] += gv * wts[3][x]

    @_jit(inline="always")
    def _unit(u, groups, need_src, c_, h):
        """Batch element, channel range and row range of backward task u.

        A task is one of ``groups`` parts of a batch element: a range of
        channels (all rows) when it scatters ∂L/∂src, so that it owns whole
        planes; otherwise a range of rows (all channels).
        """
        b = u // groups
        k = u - b * groups
        if need_src:
            return b, c_ * k // groups, c_ * (k + 1) // groups, 0, h
        return b, 0, c_, h * k // groups, h * (k + 1) // groups

    @_jit(inline="always")
    def _zero_planes(gsrc, gs, b, c0, c1, h_in, w_in):
        """Zero planes (b, c0 … c1 − 1) of gsrc (strides gs)."""
        zero = gsrc.dtype.type(0)
        step = np.uint64(gs[3])
        for c in range(c0, c1):
            for yy in range(h_in):
                row = np.uint64(b * gs[0] + c * gs[1] + yy * gs[2])
                for xx in range(w_in):
                    gsrc[row + np.uint64(xx) * step] = zero

    @_jit(_nrt=False)
    def _warp_bwd_rows(src, ss, disp, sd, g, sg, gmask, flow, want_mask, gdisp, gsrc, sizes, border, need_src,
                       need_disp, b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, neg):
        """Rows y0 … y1 − 1 of batch element b for _warp_bwd; the caller allocates the scratch.

        Compiled without numba's reference counting (_nrt=False), the arrays
        being owned by the caller: with it, each row paid an atomic
        incref/decref of every array handed to the inlined helpers, which
        numba's pruning pass leaves in a function this large (a third of
        the time of ∂L/∂δ with 64-pixel rows).
        """
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        off, wts, axw, flags = scratch
        for y in range(y0, y1):
            yf = disp.dtype.type(y)
            dsx, ox, dsy, oy = _row_field(disp, sd, b, y, w, flow, neg)
            gb = np.uint64(b * sg[0] + y * sg[2])
            if need_src:
                _row_positions(dsx, ox, dsy, oy, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch)
                _scatter_row(g, gb, np.uint64(sg[1]), np.uint64(sg[3]), off, wts,
                             gsrc, np.uint64(b * ss[0]), np.uint64(ss[1]), c0, c1, w)
            if need_disp:
                _row_gradient_terms(dsx, ox, dsy, oy, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch,
                                    not need_src)
                _position_sums(src, np.uint64(b * ss[0]), np.uint64(ss[1]), off, axw, g,
                               gb, np.uint64(sg[1]), np.uint64(sg[3]), c_, sums, vals, w)
                if want_mask:
                    # The mask is Σ_n wts[n]: its slopes are those of the weights.
                    for x in range(w):
                        gm = gmask[b * hw + y * w + x]
                        sums[0, x] += gm * ((axw[0][x] + axw[1][x]) + (axw[2][x] + axw[3][x]))
                        sums[1, x] += gm * ((axw[4][x] + axw[5][x]) + (axw[6][x] + axw[7][x]))
                if flow:
                    # ∂x̂/∂f = +1: _disp_grad_row's −sums comes out with the sign flipped, exactly.
                    for x in range(w):
                        sums[0, x] = -sums[0, x]
                        sums[1, x] = -sums[1, x]
                _disp_grad_row(gdisp, b * 2 * hw + y * w, hw, sums, flags, w)

    @_jit
    def _warp_bwd(src, ss, disp, sd, g, sg, gmask, flow, want_mask, gdisp, gsrc, sizes, border, need_src, need_disp,
                  groups, u0, u1):
        """Backward tasks u0 … u1 − 1 (see _unit): ∂L/∂src of the task's planes into gsrc (src's
        strides; zeroed first) and/or ∂L/∂δ of its rows into gdisp (contiguous [B, 2, H, W]).
        With ``flow`` the warp samples at x + disp and gdisp is ∂L/∂disp; with want_mask, ∂L/∂mask
        (gmask, contiguous [B, H·W]) adds its position gradient.

        Both at once only with one task per batch element (groups = 1): ∂L/∂δ needs every channel.
        Each plane sums its terms row by row, pixel by pixel, however the work is split. disp is
        [B, 2, H, W] with strides sd.
        """
        b_, c_, h, w, h_in, w_in = sizes
        xs = _coords(w, disp)
        bounds = _clamp_bounds(disp, w_in, h_in, border)
        # In disp's dtype, the arithmetic's: src may hold bfloat16 bits (∂L/∂δ alone).
        scratch = _scratch(w, disp)
        sums = np.empty((2, w), disp.dtype)
        vals = np.empty((5, w), disp.dtype)
        neg = np.empty((2, w), disp.dtype)
        for u in range(u0, u1):
            b, c0, c1, y0, y1 = _unit(u, groups, need_src, c_, h)
            if need_src:
                _zero_planes(gsrc, ss, b, c0, c1, h_in, w_in)
            _warp_bwd_rows(src, ss, disp, sd, g, sg, gmask, flow, want_mask, gdisp, gsrc, sizes, border, need_src,
                           need_disp, b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, neg)

    @_jit(_nrt=False)
    def _merged_bwd_rows(src, ss, fa, fb, la, lb, g, sg, grads, gsrc, sizes, border, need_src, need_fields,
                         b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, rows):
        """Rows y0 … y1 − 1 of batch element b for _merged_bwd (no reference counting: see _warp_bwd_rows)."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        gfa, gfb, gla, glb = grads
        off, wts, axw, flags = scratch
        for y in range(y0, y1):
            yf = np.float64(y)
            _merge_row(fa, fb, la, lb, b, y, w, hw, rows)
            gb = np.uint64(b * sg[0] + y * sg[2])
            if need_src:
                _row_positions(rows[5], 0, rows[6], 0, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch)
                _scatter_row(g, gb, np.uint64(sg[1]), np.uint64(sg[3]), off, wts,
                             gsrc, np.uint64(b * ss[0]), np.uint64(ss[1]), c0, c1, w)
                if not need_fields:
                    continue
                _row_gradient_terms(rows[5], 0, rows[6], 0, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch,
                                    False)
            else:  # the fields' gradient alone
                _row_gradient_terms(rows[5], 0, rows[6], 0, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch,
                                    True)
            _position_sums(src, np.uint64(b * ss[0]), np.uint64(ss[1]), off, axw, g,
                           gb, np.uint64(sg[1]), np.uint64(sg[3]), c_, sums, vals, w)
            for x in range(w):
                od = b * 2 * hw + y * w + x
                ol = b * hw + y * w + x
                if not flags[2][x]:
                    gfa[od] = gfa[od + hw] = gfb[od] = gfb[od + hw] = gla[ol] = glb[ol] = np.nan
                    continue
                gdx = -np.float64(sums[0, x]) if flags[0][x] else 0.0
                gdy = -np.float64(sums[1, x]) if flags[1][x] else 0.0
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
    def _merged_bwd(src, ss, fa, fb, la, lb, g, sg, grads, gsrc, sizes, border, need_src, need_fields,
                    groups, u0, u1):
        """As _warp_bwd for the merged δ: ∂L/∂src and/or the four fields' gradients (grads, contiguous)."""
        b_, c_, h, w, h_in, w_in = sizes
        rows = np.empty((7, w), np.float64)
        xs = _coords(w, rows)
        bounds = _clamp_bounds(rows, w_in, h_in, border)
        scratch = _scratch(w, src)
        sums = np.empty((2, w), src.dtype)
        vals = np.empty((5, w), src.dtype)
        for u in range(u0, u1):
            b, c0, c1, y0, y1 = _unit(u, groups, need_src, c_, h)
            if need_src:
                _zero_planes(gsrc, ss, b, c0, c1, h_in, w_in)
            _merged_bwd_rows(src, ss, fa, fb, la, lb, g, sg, grads, gsrc, sizes, border, need_src, need_fields,
                             b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, rows)

    @_jit(_nrt=False)
    def _merged_fwd_rows(src, ss, fa, fb, la, lb, out, so, sizes, border, r0, r1, xs, bounds, scratch, rows):
        """The rows of _merged_fwd, the caller allocating the scratch (no reference counting: see _warp_bwd_rows)."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        off, wts, _, flags = scratch
        for q in range(r0, r1):
            b = q // h
            y = q - b * h
            _merge_row(fa, fb, la, lb, b, y, w, hw, rows)
            _row_positions(rows[5], 0, rows[6], 0, xs, np.float64(y), bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            _interpolate_channels(src, ss, off, wts, out, so, b, y, c_, w)
            _nan_where_not_finite(out, b * so[0] + y * so[2], so[1], so[3], c_, flags[2])

    @_jit
    def _merged_fwd(src, ss, fa, fb, la, lb, out, so, sizes, border, r0, r1):
        """Rows r0 … r1 − 1 of T(src, merged δ); positions in float64, channel arithmetic in src's dtype."""
        w, h_in, w_in = sizes[3:]
        rows = np.empty((7, w), np.float64)
        _merged_fwd_rows(src, ss, fa, fb, la, lb, out, so, sizes, border, r0, r1, _coords(w, rows),
                         _clamp_bounds(rows, w_in, h_in, border), _scratch(w, src), rows)

    @_jit(_nrt=False)
    def _l1_fwd_rows(src, ss, disp, tgt, st, part, sizes, border, r0, r1, xs, bounds, scratch, acc):
        """The rows of _l1_fwd, the caller allocating the scratch and acc, a float64 row (no reference
        counting: see _warp_bwd_rows)."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        off, wts, _, flags = scratch
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
                    val = (wts[0][x] * src[base + off[0][x]] + wts[1][x] * src[base + off[1][x]]) + (
                        wts[2][x] * src[base + off[2][x]] + wts[3][x] * src[base + off[3][x]])
                    acc[x] += np.float64(abs(val - tgt[tb + np.uint64(x) * np.uint64(st[3])]))
            total = 0.0
            for x in range(w):
                total += acc[x] if flags[2][x] else np.nan
            part[q] = total

    @_jit
    def _l1_fwd(src, ss, disp, tgt, st, part, sizes, border, r0, r1):
        """part[q] = Σ over x, c of |T(src, δ) − target| on row q (over B·H), summed in float64."""
        w, h_in, w_in = sizes[3:]
        _l1_fwd_rows(src, ss, disp, tgt, st, part, sizes, border, r0, r1, _coords(w, disp),
                     _clamp_bounds(disp, w_in, h_in, border), _scratch(w, src), np.empty(w, np.float64))

    @_jit(_nrt=False)
    def _l1_bwd_rows(src, ss, disp, tgt, st, g_b, gdisp, gtgt, gsrc, sizes, border,
                     need_src, need_disp, need_target, b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, rowg):
        """Rows y0 … y1 − 1 of batch element b for _l1_bwd, g_b = ∂L/∂loss[b]/(C·H·W) (no reference
        counting: see _warp_bwd_rows); rowg holds ∂loss/∂out of one row, [C, W]."""
        b_, c_, h, w, h_in, w_in = sizes
        hw = h * w
        off, wts, axw, flags = scratch
        zero = src.dtype.type(0)
        for y in range(y0, y1):
            yf = disp.dtype.type(y)
            ox, oy = b * 2 * hw + y * w, b * 2 * hw + hw + y * w
            _row_positions(disp, ox, disp, oy, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch)
            for c in range(c0, c1):
                base = np.uint64(b * ss[0] + c * ss[1])
                tb = np.uint64(b * st[0] + c * st[1] + y * st[2])
                rb = np.uint64(c * w)
                for x in range(w):
                    val = (wts[0][x] * src[base + off[0][x]] + wts[1][x] * src[base + off[1][x]]) + (
                        wts[2][x] * src[base + off[2][x]] + wts[3][x] * src[base + off[3][x]])
                    diff = val - tgt[tb + np.uint64(x) * np.uint64(st[3])]
                    # Two selects, not nested branches: the sign of a difference is unpredictable.
                    gv = g_b if diff > 0 else zero
                    rowg[rb + np.uint64(x)] = -g_b if diff < 0 else gv
                if need_target:
                    ob = np.uint64(((b * c_ + c) * h + y) * w)
                    for x in range(w):
                        # |NaN − t| has no slope: NaN, as autograd gives for abs at NaN.
                        gtgt[ob + np.uint64(x)] = -rowg[rb + np.uint64(x)] if flags[2][x] else np.nan
            if need_src:
                _scatter_row(rowg, np.uint64(0), np.uint64(w), np.uint64(1), off, wts,
                             gsrc, np.uint64(b * ss[0]), np.uint64(ss[1]), c0, c1, w)
            if need_disp:
                _row_gradient_terms(disp, ox, disp, oy, xs, yf, bounds, border, w_in, h_in, ss[2], ss[3], scratch,
                                    False)
                _position_sums(src, np.uint64(b * ss[0]), np.uint64(ss[1]), off, axw, rowg,
                               np.uint64(0), np.uint64(w), np.uint64(1), c_, sums, vals, w)
                _disp_grad_row(gdisp, b * 2 * hw + y * w, hw, sums, flags, w)

    @_jit
    def _l1_bwd(src, ss, disp, tgt, st, gloss, inv_count, gdisp, gtgt, gsrc, sizes, border,
                need_src, need_disp, need_target, groups, u0, u1):
        """Backward tasks u0 … u1 − 1 (see _unit) of the loss: ∂loss[b]/∂out =
        sign(out − target)·grad_loss[b]/(C·H·W), spread onto src (gsrc, src's strides), δ (gdisp,
        contiguous) and target (gtgt, contiguous) as asked; ∂L/∂δ with need_src only if groups = 1."""
        b_, c_, h, w, h_in, w_in = sizes
        xs = _coords(w, disp)
        bounds = _clamp_bounds(disp, w_in, h_in, border)
        scratch = _scratch(w, src)
        sums = np.empty((2, w), src.dtype)
        vals = np.empty((5, w), src.dtype)
        rowg = np.empty(c_ * w, src.dtype)  # ∂loss/∂out of one row, [C, W]
        for u in range(u0, u1):
            b, c0, c1, y0, y1 = _unit(u, groups, need_src, c_, h)
            if need_src:
                _zero_planes(gsrc, ss, b, c0, c1, h_in, w_in)
            g_b = src.dtype.type(gloss[b]) * src.dtype.type(inv_count)
            _l1_bwd_rows(src, ss, disp, tgt, st, g_b, gdisp, gtgt, gsrc, sizes, border,
                         need_src, need_disp, need_target, b, c0, c1, y0, y1, xs, bounds, scratch, sums, vals, rowg)


if numba is not None:

    @_jit(inline="always")
    def _splat_corners(x, y, fx, fy, w, h, one):
        """The four corners around (x + fx, y + fy) (a finite flow): clamped flat indices,
        bilinear weights (0 outside) and their slopes along x̂ and ŷ (as _row_gradient_terms)."""
        zero = one - one
        lo = -(one + one)
        x0, ax, _ = _axis(x, -fx, lo, w + one, False, one)
        y0, ay, _ = _axis(y, -fy, lo, h + one, False, one)
        vx0 = x0 >= 0 and x0 < w
        vx1 = x0 >= -1 and x0 < w - 1
        vy0 = y0 >= 0 and y0 < h
        vy1 = y0 >= -1 and y0 < h - 1
        wx0 = one - ax if vx0 else zero
        wx1 = ax if vx1 else zero
        wy0 = one - ay if vy0 else zero
        wy1 = ay if vy1 else zero
        cx0 = min(max(x0, 0), w - 1)
        cx1 = min(max(x0 + 1, 0), w - 1)
        cy0 = min(max(y0, 0), h - 1) * w
        cy1 = min(max(y0 + 1, 0), h - 1) * w
        idx = (cy0 + cx0, cy0 + cx1, cy1 + cx0, cy1 + cx1)
        wts = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)
        dx = (-wy0 if vx0 else zero, wy0 if vx1 else zero, -wy1 if vx0 else zero, wy1 if vx1 else zero)
        dy = (-wx0 if vy0 else zero, -wx1 if vy0 else zero, wx0 if vy1 else zero, wx1 if vy1 else zero)
        return idx, wts, dx, dy

    @_jit
    def _splat_fwd(src, ss, flow, zs, num, den, sizes, normalize, u0, u1):
        """Batch elements u0 … u1 − 1 of the splat (x + flow): num [B, C, H·W] and den [B, H·W]
        (contiguous, zeroed here) receive z·w·src and z·w, pixel by pixel in order. flow is
        contiguous [B, 2, H, W], zs the importance z [B, H·W] (0 where the flow is not finite)."""
        b_, c_, h, w = sizes
        hw = h * w
        one = flow.dtype.type(1)
        for b in range(u0, u1):
            num[b * c_ * hw:(b + 1) * c_ * hw] = 0
            den[b * hw:(b + 1) * hw] = 0
            for y in range(h):
                for x in range(w):
                    p = y * w + x
                    fx = flow[b * 2 * hw + p]
                    fy = flow[b * 2 * hw + hw + p]
                    z = zs[b * hw + p]
                    if not (fx - fx == 0 and fy - fy == 0) or z == 0:
                        continue  # a non-finite flow sends nothing
                    idx, wts, _, _ = _splat_corners(flow.dtype.type(x), flow.dtype.type(y), fx, fy, w, h, one)
                    # As the kernels: each weight rounded once, then times z, then times the value.
                    for n in range(4):
                        wn = wts[n] * z
                        if wn == 0:
                            continue
                        q = idx[n]
                        if normalize:
                            den[b * hw + q] += wn
                        for c in range(c_):
                            num[(b * c_ + c) * hw + q] += wn * src[b * ss[0] + c * ss[1] + y * ss[2] + x * ss[3]]

    @_jit
    def _splat_bwd(src, ss, flow, zs, gn, sg, gd, gsrc, gflow, gz, sizes, need_src, normalize, r0, r1):
        """Rows r0 … r1 − 1 (over B·H) of the splat's backward, a gather at x + flow: gsrc [B, C, H·W]
        = z·(∂L/∂num sampled), gflow [B, 2, H·W] = z·slopes, gz [B, H·W] = ∂L/∂z (all contiguous;
        zeros where the flow is not finite). gn: ∂L/∂num (strides sg); gd: ∂L/∂den [B, H·W]."""
        b_, c_, h, w = sizes
        hw = h * w
        one = flow.dtype.type(1)
        zero = one - one
        for r in range(r0, r1):
            b = r // h
            y = r - b * h
            for x in range(w):
                p = y * w + x
                fx = flow[b * 2 * hw + p]
                fy = flow[b * 2 * hw + hw + p]
                z = zs[b * hw + p]
                if not (fx - fx == 0 and fy - fy == 0):
                    if need_src:
                        for c in range(c_):
                            gsrc[(b * c_ + c) * hw + p] = zero
                    gflow[b * 2 * hw + p] = zero
                    gflow[b * 2 * hw + hw + p] = zero
                    gz[b * hw + p] = zero
                    continue
                idx, wts, dx, dy = _splat_corners(flow.dtype.type(x), flow.dtype.type(y), fx, fy, w, h, one)
                acc_z = zero
                sx = zero
                sy = zero
                # The corners' offsets in ∂L/∂num (any strides).
                o0 = (idx[0] // w) * sg[2] + (idx[0] % w) * sg[3]
                o1 = (idx[1] // w) * sg[2] + (idx[1] % w) * sg[3]
                o2 = (idx[2] // w) * sg[2] + (idx[2] % w) * sg[3]
                o3 = (idx[3] // w) * sg[2] + (idx[3] % w) * sg[3]
                for c in range(c_):
                    gb = b * sg[0] + c * sg[1]
                    v0 = gn[gb + o0]
                    v1 = gn[gb + o1]
                    v2 = gn[gb + o2]
                    v3 = gn[gb + o3]
                    sampled = (wts[0] * v0 + wts[1] * v1) + (wts[2] * v2 + wts[3] * v3)
                    if need_src:
                        gsrc[(b * c_ + c) * hw + p] = z * sampled
                    sv = src[b * ss[0] + c * ss[1] + y * ss[2] + x * ss[3]]
                    acc_z += sv * sampled
                    sx += sv * ((dx[0] * v0 + dx[1] * v1) + (dx[2] * v2 + dx[3] * v3))
                    sy += sv * ((dy[0] * v0 + dy[1] * v1) + (dy[2] * v2 + dy[3] * v3))
                if normalize:
                    d0 = gd[b * hw + idx[0]]
                    d1 = gd[b * hw + idx[1]]
                    d2 = gd[b * hw + idx[2]]
                    d3 = gd[b * hw + idx[3]]
                    acc_z += (wts[0] * d0 + wts[1] * d1) + (wts[2] * d2 + wts[3] * d3)
                    sx += (dx[0] * d0 + dx[1] * d1) + (dx[2] * d2 + dx[3] * d3)
                    sy += (dy[0] * d0 + dy[1] * d1) + (dy[2] * d2 + dy[3] * d3)
                # ∂(x + f)/∂f = +1.
                gflow[b * 2 * hw + p] = z * sx
                gflow[b * 2 * hw + hw + p] = z * sy
                gz[b * hw + p] = acc_z


if numba is not None:
    # Drivers: one kernel's ranges (cuts[k] … cuts[k + 1]) on numba's threads, one range each.
    # numba cannot hand a tuple of arrays to a parallel loop, hence one driver per kernel.

    def _pjit(fn):
        """A driver compiled with parallel=True, cached like the kernels."""
        return _jit(fn, parallel=True)

    @_pjit
    def _warp_fwd_par(src, ss, disp, sd, out, so, mask, sizes, border, flow, want_mask, cuts):
        for k in prange(len(cuts) - 1):
            _warp_fwd(src, ss, disp, sd, out, so, mask, sizes, border, flow, want_mask, cuts[k], cuts[k + 1])

    @_pjit
    def _warp_bwd_par(src, ss, disp, sd, g, sg, gmask, flow, want_mask, gdisp, gsrc, sizes, border, need_src,
                      need_disp, groups, cuts):
        for k in prange(len(cuts) - 1):
            _warp_bwd(src, ss, disp, sd, g, sg, gmask, flow, want_mask, gdisp, gsrc, sizes, border, need_src,
                      need_disp, groups, cuts[k], cuts[k + 1])

    @_pjit
    def _merged_fwd_par(src, ss, fa, fb, la, lb, out, so, sizes, border, cuts):
        for k in prange(len(cuts) - 1):
            _merged_fwd(src, ss, fa, fb, la, lb, out, so, sizes, border, cuts[k], cuts[k + 1])

    @_pjit
    def _merged_bwd_par(src, ss, fa, fb, la, lb, g, sg, grads, gsrc, sizes, border, need_src, need_fields,
                        groups, cuts):
        for k in prange(len(cuts) - 1):
            _merged_bwd(src, ss, fa, fb, la, lb, g, sg, grads, gsrc, sizes, border, need_src, need_fields,
                        groups, cuts[k], cuts[k + 1])

    @_pjit
    def _l1_fwd_par(src, ss, disp, tgt, st, part, sizes, border, cuts):
        for k in prange(len(cuts) - 1):
            _l1_fwd(src, ss, disp, tgt, st, part, sizes, border, cuts[k], cuts[k + 1])

    @_pjit
    def _l1_bwd_par(src, ss, disp, tgt, st, gloss, inv_count, gdisp, gtgt, gsrc, sizes, border,
                    need_src, need_disp, need_target, groups, cuts):
        for k in prange(len(cuts) - 1):
            _l1_bwd(src, ss, disp, tgt, st, gloss, inv_count, gdisp, gtgt, gsrc, sizes, border,
                    need_src, need_disp, need_target, groups, cuts[k], cuts[k + 1])

    @_pjit
    def _splat_fwd_par(src, ss, flow, zs, num, den, sizes, normalize, cuts):
        for k in prange(len(cuts) - 1):
            _splat_fwd(src, ss, flow, zs, num, den, sizes, normalize, cuts[k], cuts[k + 1])

    @_pjit
    def _splat_bwd_par(src, ss, flow, zs, gn, sg, gd, gsrc, gflow, gz, sizes, need_src, normalize, cuts):
        for k in prange(len(cuts) - 1):
            _splat_bwd(src, ss, flow, zs, gn, sg, gd, gsrc, gflow, gz, sizes, need_src, normalize,
                       cuts[k], cuts[k + 1])

    # kernel → its driver (cpu3d adds its own)
    DRIVERS = {_warp_fwd: _warp_fwd_par, _warp_bwd: _warp_bwd_par, _merged_fwd: _merged_fwd_par,
               _merged_bwd: _merged_bwd_par, _l1_fwd: _l1_fwd_par, _l1_bwd: _l1_bwd_par,
               _splat_fwd: _splat_fwd_par, _splat_bwd: _splat_bwd_par}
else:
    DRIVERS = {}


# Below this many output values a call runs on the calling thread only: numba's threads
# add ~5-15 µs a call to start and join (2×3×64×64 and 2×32×32×32 gain from two), a pool
# thread tens of µs, more on a busy machine: the pool takes POOL_COST times as many.
PARALLEL_MIN_VALUES = 1 << 13
POOL_COST = 8
# numba's threads serve the process that first launched them, when its threading layer
# is safe for calls from several Python threads at once (OpenMP or TBB, not workqueue),
# and never a forked child of it: GNU OpenMP's threads do not survive a fork.
_layer_pid = -1
_layer_safe = False
_layer_lock = threading.Lock()
# A driver compiles the kernel it calls once more (2-6 s from a cold cache), too long for a
# first call, and numba compiles one function at a time in a process. So the first
# COMPILE_AFTER calls of a driver's kind run on the pool; then a thread compiles the driver
# (or loads it from the disk cache) while the calls go on on the pool. By then a training
# loop has called (and compiled) its kernels, whose first call the compile would delay.
COMPILE_AFTER = 8
_seen: dict[tuple, int] = {}  # (driver, pid, the arrays' dtypes and other arguments' types) → calls; -1: compiled
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1


def _compile(driver, types: tuple, key: tuple) -> None:
    """Compile (or load from the disk cache) driver for these argument types, then mark key compiled."""
    driver.compile(types)
    _seen[key] = -1


def _on_numba_threads(driver, args: tuple, cuts: np.ndarray) -> bool:
    """driver(*args, cuts) on numba's threads (True), or False where it did not run: numba's
    threads are not safe to use, or the driver is not compiled for these types yet."""
    global _layer_pid, _layer_safe
    pid = os.getpid()
    if _layer_pid != -1 and (_layer_pid != pid or not _layer_safe):
        return False
    args = (*args, cuts)
    key = (driver, pid, *(a.dtype if isinstance(a, np.ndarray) else type(a) for a in args))
    seen = _seen.get(key, 0)
    if seen >= 0:
        _seen[key] = seen + 1
        if seen == COMPILE_AFTER:
            types = tuple(numba.typeof(a) for a in args)
            # Not a daemon: a process that ends sooner waits for it, so that the disk cache gets the driver.
            threading.Thread(target=_compile, args=(driver, types, key), name="tcae_kernels compile").start()
        return False
    if _layer_pid == -1:
        with _layer_lock:  # the first launch picks the layer: one caller at a time, even for workqueue
            numba.set_num_threads(len(cuts) - 1)
            driver(*args)
            if _layer_pid == -1:
                _layer_safe = numba.threading_layer() in ("omp", "tbb")
                _layer_pid = pid
        return True
    numba.set_num_threads(len(cuts) - 1)  # per Python thread: its caller's torch threads
    driver(*args)
    return True


def _run(kernel, args: tuple, n: int, values: int) -> None:
    """kernel(*args, lo, hi) over [0, n) in contiguous ranges, one per torch thread (at most;
    see PARALLEL_MIN_VALUES).

    The ranges run on numba's threads (OpenMP: they wait for work spinning, so
    a call starts them in a few µs), else on a pool of Python threads (the
    kernels release the GIL; a sleeping one starts 20-150 µs after it is handed
    work). Each range's result does not depend on how [0, n) is split, so any
    thread count gives the same bits.
    """
    global _pool, _pool_pid
    threads = min(torch.get_num_threads(), n, max(1, values // PARALLEL_MIN_VALUES))
    if threads <= 1:
        kernel(*args, 0, n)
        return
    driver = DRIVERS.get(kernel)
    if driver is not None:
        parts = min(threads, numba.config.NUMBA_NUM_THREADS)
        if _on_numba_threads(driver, args, np.array([n * k // parts for k in range(parts + 1)], np.int64)):
            return
    threads = min(threads, values // (PARALLEL_MIN_VALUES * POOL_COST))
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

    t: on the CPU, float32 or float64 (or int16, bfloat16's bits). An empty t gives a one-element dummy
    the kernels never read.
    """
    if t.requires_grad:  # numpy() refuses a tensor that requires grad; a detached view costs ~0.3 µs
        t = t.detach()
    if t.is_contiguous():  # the common case, and the cheapest view
        return t.numpy().ravel(), t.stride()
    if t.numel() == 0:
        return np.zeros(1, dtype=np.float64 if t.dtype == torch.float64 else np.float32), (0,) * t.dim()
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,)).numpy(), t.stride()


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, strides kept where they can be (a copy only for another dtype, detached; _flat detaches the rest)."""
    return t if t.dtype == dtype else t.detach().to(dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A result computed in the arithmetic dtype, in the dtype asked for."""
    return t if t.dtype == dtype else t.to(dtype)


def _source(
    src: torch.Tensor, acc: torch.dtype, like: torch.Tensor | None = None, bits: bool = False
) -> tuple[np.ndarray, tuple[int, ...], int, int]:
    """src for the kernels: (flat array, strides, H_in, W_in).

    With ``like`` (the ∂L/∂src buffer) src gets like's strides, copied if it
    has others (a sliced or expanded src): the scatter reuses src's offsets.
    With ``bits``, for a kernel that widens bfloat16 in its loads, a bfloat16
    src comes as its bit patterns (uint16), in place: no float32 copy.
    A source without pixels becomes one zero pixel: every sample then reads 0,
    as every neighbour of an empty source is outside it.
    """
    b, c, h_in, w_in = src.shape
    if h_in * w_in == 0:
        return *_flat(torch.zeros(b, c, 1, 1, dtype=acc)), 1, 1
    if bits and src.dtype == torch.bfloat16:
        s, ss = _flat(src.view(torch.int16))
        return s.view(np.uint16), ss, h_in, w_in
    s = _to(src, acc)
    if like is not None and s.stride() != like.stride():
        s = s.contiguous(memory_format=_memory_format(src))
    return *_flat(s), h_in, w_in


def _field(t: torch.Tensor, acc: torch.dtype) -> np.ndarray:
    """A per-pixel field (δ, logits), contiguous in the arithmetic dtype (a copy only if it is not), flat."""
    return _flat(_to(t, acc).contiguous())[0]


def _displacement(disp: torch.Tensor, acc: torch.dtype) -> tuple[np.ndarray, tuple[int, ...]]:
    """δ [B, 2, H, W] for the warp's kernels, flat, and its strides: as it comes when its rows
    are contiguous or it is channels_last (see _row_field), else a contiguous copy."""
    d = _to(disp, acc)
    s = d.stride()
    if s[3] != 1 and not (s[1] == 1 and s[3] == 2):
        d = d.clone(memory_format=torch.contiguous_format)
    return _flat(d)


# Empty arrays standing for a gradient that is not asked for (never written: they have no elements).
_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _none(acc: torch.dtype) -> np.ndarray:
    """An empty array standing for a gradient that is not asked for."""
    return _NONE[acc]


def _parts(b: int, n: int) -> int:
    """Into how many parts (of n channels or rows) to cut each batch element: enough for torch's threads."""
    threads = torch.get_num_threads()
    return 1 if b >= threads else max(1, min(n, -(-threads // b)))


def _backward(kernel, head: tuple, gsrc: np.ndarray, sizes: tuple[int, ...], padding: str,
              need_src: bool, needs: tuple[bool, ...]) -> None:
    """Run a backward kernel over its tasks (see _unit); sizes (B, C, H, W, H_in, W_in).

    needs[0] is the gradient that needs every channel of a pixel (δ, the
    fields); with ∂L/∂src split by channels it gets a pass of its own.
    """
    b, c, h, w = sizes[:4]
    if b * h * w == 0:
        return
    values = b * max(c, 1) * h * w
    border = padding == "border"
    parts = _parts(b, c if need_src else h)
    if not need_src or parts == 1 or not needs[0]:
        _run(kernel, (*head, gsrc, sizes, border, need_src, *needs, parts), b * parts, values)
        return
    _run(kernel, (*head, gsrc, sizes, border, True, False, *needs[1:], parts), b * parts, values)
    rest = (True,) + (False,) * (len(needs) - 1)
    parts = _parts(b, h)
    _run(kernel, (*head, gsrc, sizes, border, False, *rest, parts), b * parts, values)


def warp_forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """T(src, δ): src [B, C, H_in, W_in], disp [B, 2, H, W] in pixels → [B, C, H, W] in src's dtype."""
    return warp_variant_forward(src, disp, padding, False, False)[0]


def warp_variant_forward(
    src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, mask or None): src sampled at x − disp, or at x + disp when ``flow`` (pixels); mask
    [B, 1, H, W] in src's dtype, the bilinear weight inside src (NaN at a non-finite disp)."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    out = torch.empty(b, c, h, w, dtype=acc, memory_format=_memory_format(src))  # ints: parsed faster than a tuple
    mask = torch.empty(b, 1, h, w, dtype=acc) if with_mask else None
    if b * h * w and (c or with_mask):
        s, ss, h_in, w_in = _source(src, acc)
        sizes = (b, c, h, w, h_in, w_in)
        args = (s, ss, *_displacement(disp, acc), *_flat(out), _flat(mask)[0] if with_mask else _none(acc), sizes,
                padding == "border", flow, with_mask)
        _run(_warp_fwd, args, b * h, max(out.numel(), b * h * w))
        if with_mask and src.shape[2] * src.shape[3] == 0:
            # _source stood in a zero pixel for the empty src; no weight falls inside nothing.
            mask = torch.zeros_like(mask).masked_fill(~torch.isfinite(disp).all(dim=1, keepdim=True), float("nan"))
    return _as(out, src.dtype), _as(mask, src.dtype) if with_mask else None


def _grad_src(src: torch.Tensor, acc: torch.dtype, need: bool, h: int, w: int) -> tuple[torch.Tensor | None, bool]:
    """(the ∂L/∂src buffer or None, whether a kernel fills it): zeros when nothing reaches src."""
    if not need:
        return None, False
    grad_src = torch.empty(*src.shape, dtype=acc, memory_format=_memory_format(src))
    scatter = grad_src.numel() > 0 and h * w > 0
    if not scatter:
        grad_src.zero_()
    return grad_src, scatter


def warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, need_src: bool, need_disp: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂src in src's dtype and memory format | None, ∂L/∂δ contiguous in disp's dtype | None)."""
    return warp_variant_backward(grad_out, None, src, disp, padding, need_src, need_disp, False)


def warp_variant_backward(
    grad_out: torch.Tensor, grad_mask: torch.Tensor | None, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, flow: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """warp_backward for warp_variant_forward: grad_mask is ∂L/∂mask [B, 1, H, W] or None;
    with ``flow`` the second gradient is ∂L/∂disp of the warp at x + disp."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp.shape[2:]
    grad_src, scatter = _grad_src(src, acc, need_src, h, w)
    grad_disp = torch.empty(*disp.shape, dtype=acc) if need_disp else None
    if scatter or need_disp:
        # ∂L/∂δ alone reads src only in _position_sums's gathers, which widen bfloat16 bits themselves.
        s, ss, h_in, w_in = _source(src, acc, grad_src if scatter else None, bits=not scatter)
        # An empty src's mask is 0 wherever δ is: no gradient (the kernel's stand-in pixel would give one).
        want_mask = grad_mask is not None and src.shape[2] * src.shape[3] > 0
        gmask = _field(grad_mask, acc) if want_mask else _none(acc)
        head = (s, ss, *_displacement(disp, acc), *_flat(_to(grad_out, acc)), gmask, flow, want_mask,
                _flat(grad_disp)[0] if need_disp else _none(acc))
        gs = _flat(grad_src)[0] if scatter else _none(acc)
        _backward(_warp_bwd, head, gs, (b, c, h, w, h_in, w_in), padding, scatter, (need_disp,))
    return (
        _as(grad_src, src.dtype) if need_src else None,
        _as(grad_disp, disp.dtype) if need_disp else None,
    )


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
        fields = [_field(f, acc) for f in (disp_a, disp_b, logit_a, logit_b)]
        _run(_merged_fwd, (s, ss, *fields, *_flat(out), (b, c, h, w, h_in, w_in), padding == "border"),
             b * h, out.numel())
    return _as(out, src.dtype)


def merged_warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str, need_src: bool, need_fields: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """(∂L/∂src | None, [∂L/∂disp_a, ∂L/∂disp_b, ∂L/∂logit_a, ∂L/∂logit_b] (contiguous, fields' dtype) | None)."""
    acc = _acc(src.dtype)
    b, c, _, _ = src.shape
    h, w = disp_a.shape[2:]
    inputs = (disp_a, disp_b, logit_a, logit_b)
    grad_src, scatter = _grad_src(src, acc, need_src, h, w)
    grads = [torch.empty(f.shape, dtype=acc) for f in inputs] if need_fields else None
    if scatter or need_fields:
        s, ss, h_in, w_in = _source(src, acc, grad_src if scatter else None)
        head = (s, ss, *[_field(f, acc) for f in inputs], *_flat(_to(grad_out, acc)),
                tuple(_flat(t)[0] for t in grads) if need_fields else (_none(acc),) * 4)
        gs = _flat(grad_src)[0] if scatter else _none(acc)
        _backward(_merged_bwd, head, gs, (b, c, h, w, h_in, w_in), padding, scatter, (need_fields,))
    return (
        _as(grad_src, src.dtype) if need_src else None,
        [_as(t, f.dtype) for t, f in zip(grads, inputs)] if need_fields else None,
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
        args = (s, ss, _field(disp, acc), *_flat(_to(target, acc)), part, (b, c, h, w, h_in, w_in),
                padding == "border")
        _run(_l1_fwd, args, b * h, b * count)
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
    grad_src, scatter = _grad_src(src, acc, need_src, h, w)
    grad_disp = torch.zeros(disp.shape, dtype=acc) if need_disp else None
    grad_target = torch.zeros(target.shape, dtype=acc) if need_target else None
    if count and (scatter or need_disp or need_target):
        s, ss, h_in, w_in = _source(src, acc, grad_src if scatter else None)
        head = (s, ss, _field(disp, acc), *_flat(_to(target, acc)), _field(grad_loss, acc),
                1.0 / count, _flat(grad_disp)[0] if need_disp else _none(acc),
                _flat(grad_target)[0] if need_target else _none(acc))
        gs = _flat(grad_src)[0] if scatter else _none(acc)
        _backward(_l1_bwd, head, gs, (b, c, h, w, h_in, w_in), padding, scatter, (need_disp, need_target))
    return (
        _as(grad_src, src.dtype) if need_src else None,
        _as(grad_disp, disp.dtype) if need_disp else None,
        _as(grad_target, target.dtype) if need_target else None,
    )


def _splat_importance(flow: torch.Tensor, metric: torch.Tensor, mode: str, acc: torch.dtype) -> torch.Tensor:
    """z per source pixel, contiguous [B, H·W] in acc: 1, metric or exp(metric − max); 0 at a non-finite flow."""
    b, _, h, w = flow.shape
    return splat_importance(metric, mode, torch.isfinite(flow).all(dim=1).reshape(b, h * w), acc).contiguous()


def splat_forward(
    src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.splat's (out, den) (x + flow, pixels): out in src's dtype and memory format, den
    [B, 1, H, W] in the arithmetic dtype for the normalized modes (empty for "sum")."""
    acc = _acc(src.dtype)
    b, c, h, w = src.shape
    normalize = mode != "sum"
    num = torch.zeros((b, c, h, w), dtype=acc)
    den = torch.zeros((b, 1, h, w), dtype=acc)
    if b * h * w:
        s, ss, _, _ = _source(src, acc)
        z = _splat_importance(flow, metric, mode, acc)
        args = (s, ss, _field(flow, acc), z.numpy().reshape(-1), num.numpy().reshape(-1), den.numpy().reshape(-1),
                (b, c, h, w), normalize)
        _run(_splat_fwd, args, b, num.numel())
    fmt = _memory_format(src)
    if not normalize:
        return _as(num, src.dtype).contiguous(memory_format=fmt), torch.empty(0, dtype=acc)
    out = torch.where(den != 0, num / den, 0.0)
    return _as(out, src.dtype).contiguous(memory_format=fmt), den


def splat_backward(
    grad_out: torch.Tensor, src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, out: torch.Tensor,
    den: torch.Tensor, mode: str, need_src: bool, need_flow: bool, need_metric: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂src, ∂L/∂flow, ∂L/∂metric) of splat_forward, each None when not asked for."""
    acc = _acc(src.dtype)
    b, c, h, w = src.shape
    grad_src = torch.zeros((b, c, h, w), dtype=acc)
    grad_flow = torch.zeros((b, 2, h, w), dtype=acc)
    gz = torch.zeros((b, 1, h, w), dtype=acc)
    z = _splat_importance(flow, metric, mode, acc)
    if b * h * w and (need_src or need_flow or need_metric):
        gn, gd = splat_output_grads(grad_out, out, den, mode)
        s, ss, _, _ = _source(src, acc)
        g, sg = _flat(gn)
        d = gd.contiguous().numpy().reshape(-1) if gd is not None else _none(acc)
        args = (s, ss, _field(flow, acc), z.numpy().reshape(-1), g, sg, d, grad_src.numpy().reshape(-1),
                grad_flow.numpy().reshape(-1), gz.numpy().reshape(-1), (b, c, h, w), need_src, gd is not None)
        _run(_splat_bwd, args, b * h, b * max(c, 1) * h * w)
    if mode == "softmax":
        gz = gz * z.view(b, 1, h, w)  # ∂z/∂metric = z
    return (
        _as(grad_src, src.dtype).contiguous(memory_format=_memory_format(src)) if need_src else None,
        _as(grad_flow, flow.dtype) if need_flow else None,
        _as(gz, metric.dtype) if need_metric else None,
    )


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, disp, padding):
        ctx.save_for_backward(src, disp)
        ctx.padding = padding
        return warp_forward(src, disp, padding)

    @staticmethod
    def backward(ctx, grad_out):
        src, disp = ctx.saved_tensors
        return (*warp_backward(grad_out, src, disp, ctx.padding, *ctx.needs_input_grad[:2]), None)


def warp(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """The warp (x − δ, pixels) through these kernels behind autograd, on CPU tensors, whatever
    the op's dispatch would pick: what the benchmark times and gradcheck checks. Needs numba."""
    return _Warp.apply(src, disp, padding)
