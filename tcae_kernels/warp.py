"""The displacement warp T(S, δ): fused Triton kernels, launchers and custom op.

For each output pixel (x, y) the source is sampled bilinearly at
(x − δx, y − δy), in pixels (SPEC section 1). One forward launch reads δ once
per pixel, forms the four neighbours and weights once and covers every
channel; one backward launch computes ∂L/∂δ (a per-pixel reduction over
channels, no atomics) and, only when src needs it, ∂L/∂src (a scatter-add).
No grid tensor is ever built.

At an integer position the neighbours are still ⌊x̂⌋ and ⌊x̂⌋ + 1, so the
derivative there is the right-sided one, as in ``grid_sample``. With
``border`` padding, δ receives no gradient along an axis where the position is
on or beyond the border (again as ``grid_sample``).

The jit helpers here (pixel indexing, sample positions, neighbour loads,
scatter) are shared by the fused TCAE ops in ``merged_warp.py`` and
``warp_l1.py``.
"""

from __future__ import annotations

import math
import os

import torch

from . import fallback
from .checks import check_warp_args

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel for this platform: the fallback serves
    triton = None

# Triton reads this when a kernel is decorated, so it is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the kernels; CPU tensors only under the interpreter."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


def implementation(device: torch.device | str) -> str:
    """What runs the warp ops for tensors on ``device``: "triton", "triton-interpreter" or "pytorch"."""
    device = torch.device(device)
    if triton is not None and device.type == "cuda":
        return "triton"
    if triton is not None and device.type == "cpu" and INTERPRET:
        return "triton-interpreter"
    return "pytorch"


if triton is not None:

    @triton.jit
    def pixels(pid, N, H, W, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
        """The block of output pixels this program owns: (b, y, x) and the in-range mask."""
        if IDX64:
            p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        else:
            p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        x = p % W
        q = p // W
        return q // H, q % H, x, p < N

    @triton.jit
    def load_pair(ptr, off, stride_c, mask, F64: tl.constexpr):
        """Channels 0 and 1 of a per-pixel field (δ), in the arithmetic dtype."""
        a = tl.load(ptr + off, mask=mask, other=0.0)
        b = tl.load(ptr + off + stride_c, mask=mask, other=0.0)
        if F64:
            return a.to(tl.float64), b.to(tl.float64)
        return a.to(tl.float32), b.to(tl.float32)

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
            lo = 0.0
            hi = size - 1.0
        else:
            lo = -2.0
            hi = size + 1.0
        # Bounds are tested on d, exactly: t itself may have rounded onto one.
        inside = (d >= coord - hi) & (d <= coord - lo)
        tc = tl.minimum(tl.maximum(t, lo), hi)
        i0 = tl.floor(tc)
        a = tl.where(inside, (coord - i0) - d, tc - i0)
        # t was rounded: it may sit on the integer just above its true floor.
        below = a < 0
        i0 = tl.where(below, i0 - 1.0, i0)
        a = tl.where(below, a + 1.0, a)
        if BORDER:
            gate = (d < coord) & (d > coord - hi)
        else:
            gate = inside | True
        return i0, a, gate

    @triton.jit
    def position(b, y, x, dx, dy, H_in, W_in, pmask, BORDER: tl.constexpr, IDX64: tl.constexpr):
        """Where each pixel samples: neighbour validity, weights, gates and δ's finiteness.

        Returns (finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11):
        (x0, y0) is the upper-left neighbour, ax and ay the weights of the
        right and lower ones, mYX whether neighbour (y0 + Y, x0 + X) lies in
        src. A non-finite δ samples at the pixel itself; callers overwrite
        its results with NaN.
        """
        xf = x.to(dx.dtype)
        yf = y.to(dy.dtype)
        finite = (tl.abs(dx) < float("inf")) & (tl.abs(dy) < float("inf"))
        x0f, ax, gate_x = _axis(xf, tl.where(finite, dx, xf), W_in, BORDER)
        y0f, ay, gate_y = _axis(yf, tl.where(finite, dy, yf), H_in, BORDER)
        if IDX64:
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
        else:
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
        vx0 = (x0 >= 0) & (x0 < W_in)
        vx1 = (x0 >= -1) & (x0 < W_in - 1)
        vy0 = (y0 >= 0) & (y0 < H_in) & pmask
        vy1 = (y0 >= -1) & (y0 < H_in - 1) & pmask
        return finite, x0, y0, ax, ay, gate_x, gate_y, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1

    @triton.jit
    def channel_block(c0, C, IDX64: tl.constexpr, BLOCK_C: tl.constexpr):
        c = c0 + tl.arange(0, BLOCK_C)
        if IDX64:
            c = c.to(tl.int64)
        return c, (c < C)[None, :]

    @triton.jit
    def load_neighbours(ptr, s_h, s_w, m00, m01, m10, m11, cm, dtype: tl.constexpr):
        """src at the four neighbours for one channel block ([P, C] each, 0 outside)."""
        v00 = tl.load(ptr, mask=m00[:, None] & cm, other=0.0).to(dtype)
        v01 = tl.load(ptr + s_w, mask=m01[:, None] & cm, other=0.0).to(dtype)
        v10 = tl.load(ptr + s_h, mask=m10[:, None] & cm, other=0.0).to(dtype)
        v11 = tl.load(ptr + s_h + s_w, mask=m11[:, None] & cm, other=0.0).to(dtype)
        return v00, v01, v10, v11

    @triton.jit
    def interpolate(v00, v01, v10, v11, ax, ay):
        axc = ax[:, None]
        ayc = ay[:, None]
        return (1 - ayc) * ((1 - axc) * v00 + axc * v01) + ayc * ((1 - axc) * v10 + axc * v11)

    @triton.jit
    def position_grad(g, v00, v01, v10, v11, ax, ay):
        """Σ_c g · ∂out/∂x̂ and Σ_c g · ∂out/∂ŷ per pixel (SPEC section 2)."""
        axc = ax[:, None]
        ayc = ay[:, None]
        gx = tl.sum(g * ((1 - ayc) * (v01 - v00) + ayc * (v11 - v10)), axis=1)
        gy = tl.sum(g * ((1 - axc) * (v10 - v00) + axc * (v11 - v01)), axis=1)
        return gx, gy

    @triton.jit
    def disp_grad(sum_x, sum_y, gate_x, gate_y, finite):
        """∂L/∂δ from the position sums: ∂x̂/∂δx = −1, gated, NaN for a non-finite δ."""
        gdx = tl.where(finite, tl.where(gate_x, -sum_x, 0.0), float("nan"))
        gdy = tl.where(finite, tl.where(gate_y, -sum_y, 0.0), float("nan"))
        return gdx, gdy

    @triton.jit
    def _scatter_one(ptr, v, mask, fixed_scale, DETERMINISTIC: tl.constexpr):
        if DETERMINISTIC:
            # Integer addition is associative: the sum is the same in any order.
            tl.atomic_add(ptr, tl.floor(v * fixed_scale + 0.5).to(tl.int64), mask=mask)
        else:
            tl.atomic_add(ptr, v, mask=mask)

    @triton.jit
    def scatter_neighbours(
        ptr, s_h, s_w, g, ax, ay, m00, m01, m10, m11, cm, fixed_scale, DETERMINISTIC: tl.constexpr
    ):
        """∂L/∂src += g · weight at each in-bounds neighbour (one channel block)."""
        axc = ax[:, None]
        ayc = ay[:, None]
        _scatter_one(ptr, g * ((1 - axc) * (1 - ayc)), m00[:, None] & cm, fixed_scale, DETERMINISTIC)
        _scatter_one(ptr + s_w, g * (axc * (1 - ayc)), m01[:, None] & cm, fixed_scale, DETERMINISTIC)
        _scatter_one(ptr + s_h, g * ((1 - axc) * ayc), m10[:, None] & cm, fixed_scale, DETERMINISTIC)
        _scatter_one(ptr + s_h + s_w, g * (axc * ayc), m11[:, None] & cm, fixed_scale, DETERMINISTIC)

    @triton.jit
    def warp_channels(
        src_ptr, out_ptr, b, y, x, y0, x0, C,
        ss_b, ss_c, ss_h, ss_w, so_b, so_c, so_h, so_w,
        finite, ax, ay, m00, m01, m10, m11, pmask,
        IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """out[b, :, y, x] for one block of pixels whose positions are known: every forward's channel loop."""
        src_base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        out_base = (b * so_b + y * so_h + x * so_w)[:, None]
        for c0 in range(0, C, BLOCK_C):
            c, cm = channel_block(c0, C, IDX64, BLOCK_C)
            v00, v01, v10, v11 = load_neighbours(
                src_ptr + src_base + (c * ss_c)[None, :], ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype
            )
            val = tl.where(finite[:, None], interpolate(v00, v01, v10, v11, ax, ay), float("nan"))
            tl.store(
                out_ptr + out_base + (c * so_c)[None, :],
                val.to(out_ptr.dtype.element_ty),
                mask=pmask[:, None] & cm,
            )

    @triton.jit
    def backward_channels(
        src_ptr, gout_ptr, gsrc_ptr, b, y, x, y0, x0, C,
        ss_b, ss_c, ss_h, ss_w, sg_b, sg_c, sg_h, sg_w, sgs_b, sgs_c, sgs_h, sgs_w,
        finite, ax, ay, m00, m01, m10, m11, pmask, fixed_scale,
        NEED_SRC: tl.constexpr, NEED_POS: tl.constexpr, DETERMINISTIC: tl.constexpr,
        IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """The channel loop of a backward from a loaded ∂L/∂out (g).

        Scatters ∂L/∂src when NEED_SRC; returns Σ_c g·∂out/∂x̂ and Σ_c g·∂out/∂ŷ
        per pixel (zeros unless NEED_POS).
        """
        src_base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        gsrc_base = (b * sgs_b + y0 * sgs_h + x0 * sgs_w)[:, None]
        gout_base = (b * sg_b + y * sg_h + x * sg_w)[:, None]
        sum_x = tl.zeros_like(ax)
        sum_y = tl.zeros_like(ay)
        for c0 in range(0, C, BLOCK_C):
            c, cm = channel_block(c0, C, IDX64, BLOCK_C)
            g = tl.load(gout_ptr + gout_base + (c * sg_c)[None, :], mask=pmask[:, None] & cm, other=0.0)
            g = g.to(ax.dtype)
            if NEED_POS:
                v00, v01, v10, v11 = load_neighbours(
                    src_ptr + src_base + (c * ss_c)[None, :], ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype
                )
                px, py = position_grad(g, v00, v01, v10, v11, ax, ay)
                sum_x += px
                sum_y += py
            if NEED_SRC:
                # A non-finite δ has no position, so it sends nothing to src.
                scatter_neighbours(
                    gsrc_ptr + gsrc_base + (c * sgs_c)[None, :], sgs_h, sgs_w, g, ax, ay,
                    m00 & finite, m01 & finite, m10 & finite, m11 & finite, cm,
                    fixed_scale, DETERMINISTIC,
                )
        return sum_x, sum_y

    @triton.jit
    def _warp_fwd_kernel(
        src_ptr, disp_ptr, out_ptr,
        N, C, H, W, H_in, W_in,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        so_b, so_c, so_h, so_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask = pixels(tl.program_id(0), N, H, W, IDX64, BLOCK_P)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(
            b, y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        warp_channels(
            src_ptr, out_ptr, b, y, x, y0, x0, C, ss_b, ss_c, ss_h, ss_w, so_b, so_c, so_h, so_w,
            finite, ax, ay, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
        )

    @triton.jit
    def _warp_bwd_kernel(
        src_ptr, disp_ptr, gout_ptr, gsrc_ptr, gdisp_ptr,
        N, C, H, W, H_in, W_in,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        sg_b, sg_c, sg_h, sg_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_h, sgd_w,
        fixed_scale,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask = pixels(tl.program_id(0), N, H, W, IDX64, BLOCK_P)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            b, y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        sum_x, sum_y = backward_channels(
            src_ptr, gout_ptr, gsrc_ptr, b, y, x, y0, x0, C,
            ss_b, ss_c, ss_h, ss_w, sg_b, sg_c, sg_h, sg_w, sgs_b, sgs_c, sgs_h, sgs_w,
            finite, ax, ay, m00, m01, m10, m11, pmask, fixed_scale,
            NEED_SRC, NEED_DISP, DETERMINISTIC, IDX64, BLOCK_C,
        )
        if NEED_DISP:
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def launch_config(c: int) -> tuple[int, int, int]:
    """(BLOCK_P pixels, BLOCK_C channels, num_warps) per program."""
    block_c = min(triton.next_power_of_2(max(c, 1)), 32)
    # The interpreter pays per program, the GPU per register: more pixels there.
    budget = 8192 if INTERPRET else 1024
    block_p = max(32, min(1024, budget // block_c))
    return block_p, block_c, 4


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset (with a neighbour's step of slack) can pass 2**31 − 1."""
    limit = (2**31 - 1) // 2
    for t in tensors:
        if t.numel() > limit or sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0) > limit:
            return True
    return False


def memory_format_of(src: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last src, else contiguous: the format of every [B, C, H, W] result."""
    channels_last = src.is_contiguous(memory_format=torch.channels_last) and not src.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def empty_like_src(src: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new [B, C, H, W] tensor in src's memory format (channels_last stays channels_last)."""
    return torch.empty(shape, dtype=dtype, device=src.device, memory_format=memory_format_of(src))


def grad_out_bound(grad_out: torch.Tensor) -> float:
    """The largest Σ|grad_out| over the pixels of one (b, c): what one src element can receive."""
    return grad_out.detach().abs().double().sum(dim=(2, 3)).amax().item() if grad_out.numel() else 0.0


def grad_src_buffer(src: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, float]:
    """The zeroed accumulator for ∂L/∂src and its fixed-point scale (0 for float atomics).

    ``bound`` None means float atomics, in the arithmetic dtype (half and
    bfloat16 are cast once at the end). Otherwise (deterministic mode) the
    accumulator holds int64 multiples of 1/scale, with scale the power of two
    that keeps a sum of magnitude ``bound`` within 2**62: each contribution is
    rounded to bound · 2**-62, and integer addition gives the same bits in any
    order.
    """
    if bound is None:
        return empty_like_src(src, tuple(src.shape), fallback.acc_dtype(src)).zero_(), 0.0
    exponent = 62 - math.ceil(math.log2(bound)) if 0 < bound < math.inf else 0
    return empty_like_src(src, tuple(src.shape), torch.int64).zero_(), 2.0 ** max(-100, min(100, exponent))


def finish_grad_src(buf: torch.Tensor, scale: float, src: torch.Tensor, bound: float | None) -> torch.Tensor:
    """The accumulator as ∂L/∂src in src's dtype."""
    if scale == 0.0:
        return buf.to(src.dtype)
    if not math.isfinite(bound):
        return torch.full_like(src, float("nan"))  # integers cannot carry NaN or ±Inf
    return (buf.to(fallback.acc_dtype(src)) / scale).to(src.dtype)


def _forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    out = empty_like_src(src, (b, c, h, w), src.dtype)
    n = b * h * w
    if n == 0 or c == 0:
        return out
    block_p, block_c, num_warps = launch_config(c)
    _warp_fwd_kernel[(triton.cdiv(n, block_p),)](
        src, disp, out,
        n, c, h, w, h_in, w_in,
        *src.stride(), *disp.stride(), *out.stride(),
        BORDER=padding == "border", F64=src.dtype == torch.float64,
        IDX64=needs_int64(src, disp, out),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _backward(
    grad_out: torch.Tensor,
    src: torch.Tensor,
    disp: torch.Tensor,
    padding: str,
    need_src: bool,
    need_disp: bool,
    deterministic: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    bound = grad_out_bound(grad_out) if deterministic and need_src else None
    gs, scale = grad_src_buffer(src, bound) if need_src else (None, 0.0)
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else None
    n = b * h * w
    if n > 0 and (need_src or need_disp):
        block_p, block_c, num_warps = launch_config(c)
        # disp stands in for a buffer this launch does not touch.
        gs_arg = gs if gs is not None else disp
        gd_arg = grad_disp if grad_disp is not None else disp
        _warp_bwd_kernel[(triton.cdiv(n, block_p),)](
            src, disp, grad_out, gs_arg, gd_arg,
            n, c, h, w, h_in, w_in,
            *src.stride(), *disp.stride(), *grad_out.stride(), *gs_arg.stride(), *gd_arg.stride(),
            scale,
            NEED_SRC=need_src, NEED_DISP=need_disp, DETERMINISTIC=scale != 0.0,
            BORDER=padding == "border", F64=src.dtype == torch.float64,
            IDX64=needs_int64(src, disp, grad_out, gs_arg),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
        )
    grad_src = finish_grad_src(gs, scale, src, bound) if gs is not None else None
    return grad_src, grad_disp


@torch.library.custom_op("tcae_kernels::warp", mutates_args=())
def _warp_op(
    src: torch.Tensor, disp: torch.Tensor, padding: str, use_triton: bool, deterministic: bool
) -> torch.Tensor:
    if use_triton:
        return _forward(src, disp, padding)
    return fallback.warp_forward(src, disp, padding).contiguous(memory_format=memory_format_of(src))


@_warp_op.register_fake
def _(src, disp, padding, use_triton, deterministic):
    return empty_like_src(src, (src.shape[0], src.shape[1], disp.shape[2], disp.shape[3]), src.dtype)


@torch.library.custom_op("tcae_kernels::warp_backward", mutates_args=())
def _warp_backward_op(
    grad_out: torch.Tensor,
    src: torch.Tensor,
    disp: torch.Tensor,
    padding: str,
    use_triton: bool,
    need_src: bool,
    need_disp: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton:
        grad_src, grad_disp = _backward(grad_out, src, disp, padding, need_src, need_disp, deterministic)
    else:
        grad_src, grad_disp = fallback.warp_backward(grad_out, src, disp, padding, need_src, need_disp)
        if grad_src is not None:
            grad_src = grad_src.contiguous(memory_format=memory_format_of(src))
    # An op returns tensors, never None: an empty one stands for "not needed".
    return (
        grad_src if grad_src is not None else src.new_empty(0),
        grad_disp.contiguous() if grad_disp is not None else disp.new_empty(0),
    )


@_warp_backward_op.register_fake
def _(grad_out, src, disp, padding, use_triton, need_src, need_disp, deterministic):
    grad_src = empty_like_src(src, tuple(src.shape), src.dtype) if need_src else src.new_empty(0)
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else disp.new_empty(0)
    return grad_src, grad_disp


def _setup_context(ctx, inputs, output):
    src, disp, padding, use_triton, deterministic = inputs
    ctx.save_for_backward(src, disp)
    ctx.padding = padding
    ctx.use_triton = use_triton
    ctx.deterministic = deterministic


def _backward_rule(ctx, grad_out):
    src, disp = ctx.saved_tensors
    need_src, need_disp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_src, grad_disp = _warp_backward_op(
        grad_out, src, disp, ctx.padding, ctx.use_triton, need_src, need_disp, ctx.deterministic
    )
    return (grad_src if need_src else None, grad_disp if need_disp else None, None, None, None)


_warp_op.register_autograd(_backward_rule, setup_context=_setup_context)


def resolve_deterministic(deterministic: bool | None) -> bool:
    """An explicit choice wins; otherwise torch's global deterministic mode decides."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


def warp(
    src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None
) -> torch.Tensor:
    """Warp ``src`` by the displacement field ``disp`` (bilinear, differentiable).

    out[b, c, y, x] = src sampled at (x − disp[b, 0, y, x], y − disp[b, 1, y, x]).

    Args:
        src: [B, C, H_in, W_in] image or feature map; float16, bfloat16,
            float32 or float64; any strides (NCHW and channels_last run natively).
        disp: [B, 2, H, W] displacement in **pixels**; channel 0 is δx (along W),
            channel 1 is δy (along H). Same dtype as src, or float32 beside a
            float16/bfloat16 src.
        padding: ``"zeros"`` (neighbours outside src count as 0) or
            ``"border"`` (the position is clamped into src first).
        deterministic: accumulate the src gradient in fixed point, bitwise
            reproducible from run to run. None follows
            ``torch.use_deterministic_algorithms``.

    Returns:
        [B, C, H, W] in src's dtype (channels_last if src is). Arithmetic is in
        float32 (float64 for float64). A non-finite δ gives NaN at that pixel,
        in every channel and in its δ gradient.

    CUDA tensors run
    the fused Triton kernels; CPU tensors run them under ``TRITON_INTERPRET=1``
    and otherwise the PyTorch fallback (:func:`warp_torch`).
    """
    padding = check_warp_args(src, disp, padding)
    return _warp_op(src, disp, padding, uses_triton(src), resolve_deterministic(deterministic))


def warp_torch(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """:func:`warp` through the PyTorch fallback on any device (no Triton).

    Its src gradient is a ``scatter_add_``: deterministic on CPU.
    """
    padding = check_warp_args(src, disp, padding)
    return _warp_op(src, disp, padding, False, False)
