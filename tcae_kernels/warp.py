"""The displacement warp T(S, δ): fused Triton kernels and their autograd Function.

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
"""

from __future__ import annotations

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


if triton is not None:

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
        inside = (t >= lo) & (t <= hi)
        tc = tl.minimum(tl.maximum(t, lo), hi)
        i0 = tl.floor(tc)
        a = tl.where(inside, (coord - i0) - d, tc - i0)
        # t was rounded: it may sit on the integer just above its true floor.
        below = a < 0
        i0 = tl.where(below, i0 - 1.0, i0)
        a = tl.where(below, a + 1.0, a)
        if BORDER:
            gate = (t > 0) & (t < hi)
        else:
            gate = inside | True
        return i0, a, gate

    @triton.jit
    def _sample_setup(
        pid, disp_ptr, N, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Everything one block of output pixels needs, shared by forward and backward.

        Returns the pixel coordinates, their mask, δ's finiteness, the weights
        (ax, ay) of the right and lower neighbours, the gradient gates, and for
        the neighbours 00, 01, 10, 11 (y, x) a validity mask and the element
        offset of channel 0 in src (given src's strides later, so this returns
        the integer coordinates instead).
        """
        if IDX64:
            p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        else:
            p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < N
        x = p % W
        q = p // W
        y = q % H
        b = q // H
        d_off = b * sd_b + y * sd_h + x * sd_w
        dx = tl.load(disp_ptr + d_off, mask=pmask, other=0.0)
        dy = tl.load(disp_ptr + d_off + sd_c, mask=pmask, other=0.0)
        if F64:
            dx = dx.to(tl.float64)
            dy = dy.to(tl.float64)
            xf = x.to(tl.float64)
            yf = y.to(tl.float64)
        else:
            dx = dx.to(tl.float32)
            dy = dy.to(tl.float32)
            xf = x.to(tl.float32)
            yf = y.to(tl.float32)
        finite = (tl.abs(dx) < float("inf")) & (tl.abs(dy) < float("inf"))
        # A non-finite δ has no position: sample at the pixel itself, and
        # overwrite the results with NaN at the end.
        dx = tl.where(finite, dx, xf)
        dy = tl.where(finite, dy, yf)
        x0f, ax, gate_x = _axis(xf, dx, W_in, BORDER)
        y0f, ay, gate_y = _axis(yf, dy, H_in, BORDER)
        if IDX64:
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
        else:
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
        return b, y, x, pmask, finite, x0, y0, ax, ay, gate_x, gate_y

    @triton.jit
    def _neighbour_masks(x0, y0, H_in, W_in, pmask):
        vx0 = (x0 >= 0) & (x0 < W_in)
        vx1 = (x0 >= -1) & (x0 < W_in - 1)
        vy0 = (y0 >= 0) & (y0 < H_in) & pmask
        vy1 = (y0 >= -1) & (y0 < H_in - 1) & pmask
        return vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1

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
        b, y, x, pmask, finite, x0, y0, ax, ay, _gx, _gy = _sample_setup(
            tl.program_id(0), disp_ptr, N, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w,
            BORDER, F64, IDX64, BLOCK_P,
        )
        m00, m01, m10, m11 = _neighbour_masks(x0, y0, H_in, W_in, pmask)
        w00 = ((1 - ax) * (1 - ay))[:, None]
        w01 = (ax * (1 - ay))[:, None]
        w10 = ((1 - ax) * ay)[:, None]
        w11 = (ax * ay)[:, None]
        base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        out_base = (b * so_b + y * so_h + x * so_w)[:, None]
        nan_rows = (~finite)[:, None]
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            if IDX64:
                c = c.to(tl.int64)
            cm = (c < C)[None, :]
            s = src_ptr + base + (c * ss_c)[None, :]
            v00 = tl.load(s, mask=m00[:, None] & cm, other=0.0)
            v01 = tl.load(s + ss_w, mask=m01[:, None] & cm, other=0.0)
            v10 = tl.load(s + ss_h, mask=m10[:, None] & cm, other=0.0)
            v11 = tl.load(s + ss_h + ss_w, mask=m11[:, None] & cm, other=0.0)
            acc = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            acc = tl.where(nan_rows, float("nan"), acc)
            tl.store(
                out_ptr + out_base + (c * so_c)[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=pmask[:, None] & cm,
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
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask, finite, x0, y0, ax, ay, gate_x, gate_y = _sample_setup(
            tl.program_id(0), disp_ptr, N, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w,
            BORDER, F64, IDX64, BLOCK_P,
        )
        m00, m01, m10, m11 = _neighbour_masks(x0, y0, H_in, W_in, pmask)
        # Non-finite pixels have no position, so they send nothing to src.
        m00_s = m00 & finite
        m01_s = m01 & finite
        m10_s = m10 & finite
        m11_s = m11 & finite
        axc = ax[:, None]
        ayc = ay[:, None]
        base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        gs_base = (b * sgs_b + y0 * sgs_h + x0 * sgs_w)[:, None]
        g_base = (b * sg_b + y * sg_h + x * sg_w)[:, None]
        acc_x = tl.zeros_like(ax)
        acc_y = tl.zeros_like(ay)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            if IDX64:
                c = c.to(tl.int64)
            cm = (c < C)[None, :]
            g = tl.load(gout_ptr + g_base + (c * sg_c)[None, :], mask=pmask[:, None] & cm, other=0.0)
            g = g.to(ax.dtype)
            if NEED_DISP:
                s = src_ptr + base + (c * ss_c)[None, :]
                v00 = tl.load(s, mask=m00[:, None] & cm, other=0.0).to(ax.dtype)
                v01 = tl.load(s + ss_w, mask=m01[:, None] & cm, other=0.0).to(ax.dtype)
                v10 = tl.load(s + ss_h, mask=m10[:, None] & cm, other=0.0).to(ax.dtype)
                v11 = tl.load(s + ss_h + ss_w, mask=m11[:, None] & cm, other=0.0).to(ax.dtype)
                acc_x += tl.sum(g * ((1 - ayc) * (v01 - v00) + ayc * (v11 - v10)), axis=1)
                acc_y += tl.sum(g * ((1 - axc) * (v10 - v00) + axc * (v11 - v01)), axis=1)
            if NEED_SRC:
                gs = gsrc_ptr + gs_base + (c * sgs_c)[None, :]
                tl.atomic_add(gs, g * ((1 - axc) * (1 - ayc)), mask=m00_s[:, None] & cm)
                tl.atomic_add(gs + sgs_w, g * (axc * (1 - ayc)), mask=m01_s[:, None] & cm)
                tl.atomic_add(gs + sgs_h, g * ((1 - axc) * ayc), mask=m10_s[:, None] & cm)
                tl.atomic_add(gs + sgs_h + sgs_w, g * (axc * ayc), mask=m11_s[:, None] & cm)
        if NEED_DISP:
            # ∂x̂/∂δx = −1.
            gdx = tl.where(gate_x, -acc_x, 0.0)
            gdy = tl.where(gate_y, -acc_y, 0.0)
            gdx = tl.where(finite, gdx, float("nan"))
            gdy = tl.where(finite, gdy, float("nan"))
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def _launch_config(c: int) -> tuple[int, int, int]:
    """(BLOCK_P pixels, BLOCK_C channels, num_warps) per program."""
    block_c = min(triton.next_power_of_2(max(c, 1)), 32)
    # The interpreter pays per program, the GPU per register: more pixels there.
    budget = 8192 if INTERPRET else 1024
    block_p = max(32, min(1024, budget // block_c))
    return block_p, block_c, 4


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset, or the pixel count, can pass 2**31 − 1."""
    limit = 2**31 - 1
    for t in tensors:
        if sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0) > limit // 2:
            return True
        if t.numel() > limit // 2:
            return True
    return False


def _empty_like_src(src: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new [B, C, H, W] tensor in src's memory format (channels_last stays channels_last)."""
    channels_last = src.dim() == 4 and src.is_contiguous(memory_format=torch.channels_last) and not src.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=src.device, memory_format=fmt)


def _forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    out = _empty_like_src(src, (b, c, h, w), src.dtype)
    n = b * h * w
    if n == 0 or c == 0:
        return out
    block_p, block_c, num_warps = _launch_config(c)
    _warp_fwd_kernel[(triton.cdiv(n, block_p),)](
        src, disp, out,
        n, c, h, w, h_in, w_in,
        *src.stride(), *disp.stride(), *out.stride(),
        BORDER=padding == "border", F64=src.dtype == torch.float64,
        IDX64=_needs_int64(src, disp, out),
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = fallback.acc_dtype(src)
    # Atomics accumulate in the arithmetic dtype; half and bfloat16 are cast once at the end.
    grad_src = _empty_like_src(src, tuple(src.shape), acc).zero_() if need_src else None
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else None
    n = b * h * w
    if n == 0 or not (need_src or need_disp):
        return grad_src, grad_disp
    dummy = disp  # stands in for a buffer the launch does not touch
    gs = grad_src if grad_src is not None else dummy
    gd = grad_disp if grad_disp is not None else dummy
    block_p, block_c, num_warps = _launch_config(c)
    _warp_bwd_kernel[(triton.cdiv(n, block_p),)](
        src, disp, grad_out, gs, gd,
        n, c, h, w, h_in, w_in,
        *src.stride(), *disp.stride(), *grad_out.stride(), *gs.stride(), *gd.stride(),
        NEED_SRC=need_src, NEED_DISP=need_disp,
        BORDER=padding == "border", F64=src.dtype == torch.float64,
        IDX64=_needs_int64(src, disp, grad_out, gs),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
    if grad_src is not None:
        grad_src = grad_src.to(src.dtype)
    return grad_src, grad_disp


class WarpFunction(torch.autograd.Function):
    """T(src, disp) with the kernels (``use_triton``) or the PyTorch fallback."""

    @staticmethod
    def forward(ctx, src, disp, padding, use_triton):
        ctx.save_for_backward(src, disp)
        ctx.padding = padding
        ctx.use_triton = use_triton
        return (_forward if use_triton else fallback.warp_forward)(src, disp, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        src, disp = ctx.saved_tensors
        impl = _backward if ctx.use_triton else fallback.warp_backward
        grad_src, grad_disp = impl(
            grad_out, src, disp, ctx.padding, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_src, grad_disp, None, None


def warp(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
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

    Returns:
        [B, C, H, W] in src's dtype (channels_last if src is). Arithmetic is in
        float32 (float64 for float64). A non-finite δ gives NaN at that pixel,
        in every channel and in its δ gradient.

    CUDA tensors run the fused Triton kernels; CPU tensors run them under
    ``TRITON_INTERPRET=1`` and otherwise the PyTorch fallback (:func:`warp_torch`).
    """
    padding = check_warp_args(src, disp, padding)
    return WarpFunction.apply(src, disp, padding, uses_triton(src))


def warp_torch(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """:func:`warp` through the PyTorch fallback on any device (no Triton)."""
    padding = check_warp_args(src, disp, padding)
    return WarpFunction.apply(src, disp, padding, False)
