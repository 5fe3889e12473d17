"""The ``@triton.jit`` helpers every warp kernel is built from (SPEC sections 1–2).

A program owns BLOCK_X consecutive output pixels of one row (b, y) on a GPU
(of ROWS rows under the interpreter), named by its program ids: no division
anywhere. Each pixel's position, neighbours and weights are formed once,
then a loop walks the channels. With
BLOCK_C == 1 (NCHW) every value is a [BLOCK_X] vector, a few pixels per
thread; with BLOCK_C > 1 (channels_last) a [BLOCK_X, BLOCK_C] tile, whose
channel loads are contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_block(W, H, yb_base, b_base, IDX64: tl.constexpr, BLOCK_X: tl.constexpr, ROWS: tl.constexpr):
    """(b, y, x, mask) of this program: BLOCK_X pixels of ROWS output rows of batch element b.

    The grid is (x blocks, row blocks, batch), so no program divides: b and
    the row come straight from the program ids (plus the bases of a launch
    split at CUDA's 65,535 limit on grid y and z). GPUs run ROWS = 1, where y
    is one scalar per program; the interpreter, which pays per program, takes
    several rows at once (a power-of-two split of a flat range: shifts, not
    divisions).
    """
    xb = tl.program_id(0)
    yb = tl.program_id(1) + yb_base
    b = tl.program_id(2) + b_base
    if IDX64:
        xb = xb.to(tl.int64)
        yb = yb.to(tl.int64)
        b = b.to(tl.int64)
    if ROWS == 1:
        x = xb * BLOCK_X + tl.arange(0, BLOCK_X)
        y = yb
        mask = x < W
    else:
        p = tl.arange(0, ROWS * BLOCK_X)
        x = xb * BLOCK_X + p % BLOCK_X
        y = yb * ROWS + p // BLOCK_X
        mask = (x < W) & (y < H)
    return b, y, x, mask


@triton.jit
def load_pair(ptr, off, stride_c, mask, F64: tl.constexpr):
    """Channels 0 and 1 of a per-pixel field (δ) in the arithmetic dtype."""
    a = tl.load(ptr + off, mask=mask, other=0.0)
    b = tl.load(ptr + off + stride_c, mask=mask, other=0.0)
    if F64:
        a = a.to(tl.float64)
        b = b.to(tl.float64)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _axis(coord, d, size, BORDER: tl.constexpr):
    """One axis of the position coord − d: left neighbour i0, right weight a, gradient gate.

    The weight is (coord − i0) − d, not (coord − d) − i0: both subtractions
    are exact for δ of a few pixels, so a float32 position keeps full
    precision however far it lies from the origin. Positions are clamped in
    floating point before any integer is formed, so no δ can overflow into
    an in-bounds index.
    """
    t = coord - d
    if BORDER:
        hi = size - 1.0
        i0 = tl.floor(tl.minimum(tl.maximum(t, 0.0), hi))
        # Bounds are tested on d, exactly: t itself may have rounded onto one.
        inside = (d >= coord - hi) & (d <= coord)
        a = tl.where(inside, (coord - i0) - d, tl.minimum(tl.maximum(t, 0.0), hi) - i0)
        gate = (d < coord) & (d > coord - hi)
    else:
        # Two pixels out every neighbour is outside, so the clamp changes no value;
        # there the weight is finite but meaningless, and multiplies zeros only.
        i0 = tl.floor(tl.minimum(tl.maximum(t, -2.0), size + 1.0))
        a = (coord - i0) - d
        gate = tl.full(t.shape, 1, tl.int1)
    # t was rounded: it may sit on the integer just above its true floor.
    below = a < 0
    i0 = tl.where(below, i0 - 1.0, i0)
    a = tl.where(below, a + 1.0, a)
    return i0, a, gate


@triton.jit
def position(y, x, dx, dy, H_in, W_in, pmask, BORDER: tl.constexpr, IDX64: tl.constexpr):
    """Where each pixel samples: neighbour validity, weights, gates and δ's finiteness.

    Returns (finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11):
    (x0, y0) is the upper-left neighbour, ax and ay the weights of the right
    and lower ones (in δ's dtype), mYX whether neighbour (y0 + Y, x0 + X) lies
    in src. A non-finite δ samples at the pixel itself; callers overwrite its
    results with NaN.
    """
    xf = x.to(dx.dtype)
    yf = y.to(dy.dtype)
    finite = (tl.abs(dx) < float("inf")) & (tl.abs(dy) < float("inf"))
    x0f, ax, gate_x = _axis(xf, tl.where(finite, dx, xf), W_in, BORDER)
    y0f, ay, gate_y = _axis(yf, tl.where(finite, dy, yf), H_in, BORDER)
    if IDX64:
        x0 = x0f.to(tl.int64)
        y0 = y0f.to(tl.int64)
        unsigned: tl.constexpr = tl.uint64
    else:
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        unsigned: tl.constexpr = tl.uint32
    # One unsigned compare tests both ends: a negative index wraps past any size.
    vx0 = x0.to(unsigned, bitcast=True) < W_in
    vx1 = (x0 + 1).to(unsigned, bitcast=True) < W_in
    vy0 = (y0.to(unsigned, bitcast=True) < H_in) & pmask
    vy1 = ((y0 + 1).to(unsigned, bitcast=True) < H_in) & pmask
    return finite, x0, y0, ax, ay, gate_x, gate_y, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def channel_offsets(pix, c0, stride_c, IDX64: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets of channels c0 … c0 + BLOCK_C − 1 at per-pixel offsets ``pix``.

    BLOCK_C == 1 keeps [BLOCK_X] vectors; otherwise a [BLOCK_X, BLOCK_C] tile.
    """
    if BLOCK_C == 1:
        if IDX64:
            off = pix + tl.cast(c0, tl.int64) * stride_c
        else:
            off = pix + c0 * stride_c
    else:
        c = c0 + tl.arange(0, BLOCK_C)
        if IDX64:
            c = c.to(tl.int64)
        off = pix[:, None] + (c * stride_c)[None, :]
    return off


@triton.jit
def channel_mask(c0, C, mask, BLOCK_C: tl.constexpr):
    """Which elements of a channel tile exist (the loop bound already masks BLOCK_C == 1)."""
    if BLOCK_C == 1:
        m = mask
    else:
        m = mask[:, None] & ((c0 + tl.arange(0, BLOCK_C)) < C)[None, :]
    return m


@triton.jit
def per_channel(v, BLOCK_C: tl.constexpr):
    """A per-pixel vector shaped to combine with a channel tile."""
    if BLOCK_C == 1:
        return v
    else:
        return v[:, None]


@triton.jit
def sum_channels(v, BLOCK_C: tl.constexpr):
    """A channel tile summed over its channels, per pixel."""
    if BLOCK_C == 1:
        return v
    else:
        return tl.sum(v, axis=1)


@triton.jit
def load_neighbours(ptr, off, s_h, s_w, m00, m01, m10, m11, cm, dtype: tl.constexpr, BLOCK_C: tl.constexpr):
    """src at the four neighbours of one channel tile, in ``dtype`` (0 outside src)."""
    v00 = tl.load(ptr + off, mask=per_channel(m00, BLOCK_C) & cm, other=0.0).to(dtype)
    v01 = tl.load(ptr + off + s_w, mask=per_channel(m01, BLOCK_C) & cm, other=0.0).to(dtype)
    v10 = tl.load(ptr + off + s_h, mask=per_channel(m10, BLOCK_C) & cm, other=0.0).to(dtype)
    v11 = tl.load(ptr + off + s_h + s_w, mask=per_channel(m11, BLOCK_C) & cm, other=0.0).to(dtype)
    return v00, v01, v10, v11


@triton.jit
def interpolate(v00, v01, v10, v11, ax, ay):
    top = v00 + ax * (v01 - v00)
    bottom = v10 + ax * (v11 - v10)
    return top + ay * (bottom - top)


@triton.jit
def position_grad(g, v00, v01, v10, v11, ax, ay, BLOCK_C: tl.constexpr):
    """Σ_c g · ∂out/∂x̂ and Σ_c g · ∂out/∂ŷ per pixel (SPEC section 2)."""
    top = v01 - v00
    bottom = v11 - v10
    gx = sum_channels(g * (top + ay * (bottom - top)), BLOCK_C)
    left = v10 - v00
    right = v11 - v01
    gy = sum_channels(g * (left + ax * (right - left)), BLOCK_C)
    return gx, gy


@triton.jit
def disp_grad(sum_x, sum_y, gate_x, gate_y, finite):
    """∂L/∂δ from the position sums: ∂x̂/∂δx = −1, gated, NaN for a non-finite δ."""
    gdx = tl.where(finite, tl.where(gate_x, -sum_x, 0.0), float("nan"))
    gdy = tl.where(finite, tl.where(gate_y, -sum_y, 0.0), float("nan"))
    return gdx, gdy


@triton.jit
def inside_mass(ax, ay, m00, m01, m10, m11, finite):
    """The validity mask: the bilinear weight that falls on neighbours inside src, in [0, 1]
    (what warping a plane of ones gives); NaN for a non-finite δ."""
    mass = interpolate(m00.to(ax.dtype), m01.to(ax.dtype), m10.to(ax.dtype), m11.to(ax.dtype), ax, ay)
    return tl.where(finite, mass, float("nan"))


@triton.jit
def inside_mass_grad(gm, ax, ay, m00, m01, m10, m11):
    """gm · ∂mask/∂x̂ and gm · ∂mask/∂ŷ per pixel: the position gradient of a plane of ones."""
    return position_grad(gm, m00.to(ax.dtype), m01.to(ax.dtype), m10.to(ax.dtype), m11.to(ax.dtype), ax, ay, 1)


@triton.jit
def fixed_point_scale(scale_ptr, b, c0, C, BLOCK_C: tl.constexpr):
    """The fixed-point scale of planes (b, c0 …) as two factors, each within float32's
    range, whose product may not be (deterministic mode; see launch.GradSrc)."""
    if BLOCK_C == 1:
        p = scale_ptr + (b * C + c0) * 2
        s0 = tl.load(p)
        s1 = tl.load(p + 1)
    else:
        c = c0 + tl.arange(0, BLOCK_C)
        p = scale_ptr + (b * C + c) * 2
        s0 = tl.load(p, mask=c < C, other=1.0)[None, :]
        s1 = tl.load(p + 1, mask=c < C, other=1.0)[None, :]
    return s0, s1


@triton.jit
def _scatter_one(ptr, v, mask, s0, s1, DETERMINISTIC: tl.constexpr):
    # Relaxed: the adds need no ordering, and acq_rel would fence every one.
    if DETERMINISTIC:
        # Integer addition is associative: the sum is the same in any order.
        tl.atomic_add(ptr, tl.floor(v * s0 * s1 + 0.5).to(tl.int64), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, v, mask=mask, sem="relaxed")


@triton.jit
def scatter_neighbours(
    ptr, off, s_h, s_w, g, ax, ay, m00, m01, m10, m11, cm, scale_ptr, b, c0, C,
    DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """∂L/∂src += g · weight at each in-bounds neighbour (one channel tile of batch element b)."""
    s0 = 1.0
    s1 = 1.0
    if DETERMINISTIC:
        s0, s1 = fixed_point_scale(scale_ptr, b, c0, C, BLOCK_C)
    gb = g * (1 - ay)
    gt = g - gb
    _scatter_one(ptr + off, gb - gb * ax, per_channel(m00, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_w, gb * ax, per_channel(m01, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_h, gt - gt * ax, per_channel(m10, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_h + s_w, gt * ax, per_channel(m11, BLOCK_C) & cm, s0, s1, DETERMINISTIC)


@triton.jit
def bilinear_weights(ax, ay):
    """The four neighbours' weights (00, 01, 10, 11), each within a few ulp of itself.

    scatter_neighbours forms g·ay as g − g·(1 − ay), exact to an ulp of g: fine
    for a gradient, but a normalized splat divides what landed by the weight
    that landed, and where that weight is tiny the two must be rounded alike.
    """
    bx = 1.0 - ax
    by = 1.0 - ay
    return bx * by, ax * by, bx * ay, ax * ay


@triton.jit
def scatter_weighted(
    ptr, off, s_h, s_w, v, w00, w01, w10, w11, m00, m01, m10, m11, cm, scale_ptr, b, c0, C,
    DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ptr += v · w_n at each in-bounds neighbour n (one channel tile of batch element b); the
    weights come shaped for the tile."""
    s0 = 1.0
    s1 = 1.0
    if DETERMINISTIC:
        s0, s1 = fixed_point_scale(scale_ptr, b, c0, C, BLOCK_C)
    _scatter_one(ptr + off, v * w00, per_channel(m00, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_w, v * w01, per_channel(m01, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_h, v * w10, per_channel(m10, BLOCK_C) & cm, s0, s1, DETERMINISTIC)
    _scatter_one(ptr + off + s_h + s_w, v * w11, per_channel(m11, BLOCK_C) & cm, s0, s1, DETERMINISTIC)


@triton.jit
def warp_channels(
    src_ptr, out_ptr, src_pix, out_pix, C, ss_c, ss_h, ss_w, so_c,
    finite, ax, ay, m00, m01, m10, m11, pmask,
    IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out at one block of pixels whose positions are known: every forward's channel loop."""
    if BLOCK_C == 1:
        # A NaN weight makes every channel of a non-finite δ's pixel NaN (NaN · 0 too), at
        # one select per pixel; a tile keeps its select per channel (fewer registers).
        axc = tl.where(finite, ax, float("nan"))
    else:
        axc = ax[:, None]
        bad = (finite == 0)[:, None]
    ayc = per_channel(ay, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        s_off = channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C)
        cm = channel_mask(c0, C, pmask, BLOCK_C)
        o_off = channel_offsets(out_pix, c0, so_c, IDX64, BLOCK_C)
        v00, v01, v10, v11 = load_neighbours(src_ptr, s_off, ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype, BLOCK_C)
        val = interpolate(v00, v01, v10, v11, axc, ayc)
        if BLOCK_C > 1:
            val = tl.where(bad, float("nan"), val)
        tl.store(out_ptr + o_off, val.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def backward_channels(
    src_ptr, gout_ptr, gsrc_ptr, src_pix, gout_pix, gsrc_pix, C,
    ss_c, ss_h, ss_w, sg_c, sgs_c, sgs_h, sgs_w,
    finite, ax, ay, m00, m01, m10, m11, pmask, scale_ptr, b,
    NEED_SRC: tl.constexpr, NEED_POS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The channel loop of a backward from ∂L/∂out (g), for pixels of batch element b.

    Scatters ∂L/∂src when NEED_SRC; returns Σ_c g·∂out/∂x̂ and Σ_c g·∂out/∂ŷ
    per pixel (zeros unless NEED_POS).
    """
    axc = per_channel(ax, BLOCK_C)
    ayc = per_channel(ay, BLOCK_C)
    sum_x = tl.zeros_like(ax)
    sum_y = tl.zeros_like(ay)
    # A non-finite δ has no position, so it sends nothing to src.
    s00 = m00 & finite
    s01 = m01 & finite
    s10 = m10 & finite
    s11 = m11 & finite
    for c0 in range(0, C, BLOCK_C):
        g_off = channel_offsets(gout_pix, c0, sg_c, IDX64, BLOCK_C)
        cm = channel_mask(c0, C, pmask, BLOCK_C)
        g = tl.load(gout_ptr + g_off, mask=cm, other=0.0).to(ax.dtype)
        if NEED_POS:
            s_off = channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C)
            v00, v01, v10, v11 = load_neighbours(
                src_ptr, s_off, ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype, BLOCK_C
            )
            px, py = position_grad(g, v00, v01, v10, v11, axc, ayc, BLOCK_C)
            sum_x += px
            sum_y += py
        if NEED_SRC:
            gs_off = channel_offsets(gsrc_pix, c0, sgs_c, IDX64, BLOCK_C)
            scatter_neighbours(
                gsrc_ptr, gs_off, sgs_h, sgs_w, g, axc, ayc, s00, s01, s10, s11, cm,
                scale_ptr, b, c0, C, DETERMINISTIC, BLOCK_C,
            )
    return sum_x, sum_y
