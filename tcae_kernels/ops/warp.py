"""The displacement warp T(S, δ): Triton kernels, launchers and custom op.

Convention: x − δ. For each output pixel (x, y) the source is sampled
bilinearly at (x − δx, y − δy), in pixels (SPEC section 1). The forward reads
δ once per pixel, forms the four neighbours and weights once and covers every
channel; the backward computes ∂L/∂δ (a per-pixel reduction over channels, no
atomics) and, only when src needs it, ∂L/∂src (a scatter-add), in one launch.
No grid tensor is ever built.

At an integer position the neighbours are still ⌊x̂⌋ and ⌊x̂⌋ + 1, so the
derivative there is the right-sided one, as in ``grid_sample``. With
``border`` padding, δ receives no gradient along an axis where the position is
on or beyond the border (again as ``grid_sample``).
"""

from __future__ import annotations

import torch

from .. import fallback
from ..checks import check_position_range, check_warp_args
from .launch import (
    GradSrc,
    call,
    compiled_cpu,
    define_op,
    empty_like_src,
    grad_out_bound,
    needs_int64,
    or_empty,
    register_autograd,
    resolve_deterministic,
    row_launches,
    triton,
)

if triton is not None:
    import triton.language as tl

    from .sampling import backward_channels, disp_grad, load_pair, position, row_block, warp_channels

    @triton.jit
    def _warp_fwd_kernel(
        src_ptr, disp_ptr, out_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        so_b, so_c, so_h, so_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64)
        warp_channels(
            src_ptr, out_ptr, b * ss_b + y0 * ss_h + x0 * ss_w, b * so_b + y * so_h + x * so_w, C,
            ss_c, ss_h, ss_w, so_c, finite, ax, ay, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
        )

    @triton.jit
    def _warp_bwd_kernel(
        src_ptr, disp_ptr, gout_ptr, gsrc_ptr, gdisp_ptr, scale_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        sg_b, sg_c, sg_h, sg_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_h, sgd_w,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        sum_x, sum_y = backward_channels(
            src_ptr, gout_ptr, gsrc_ptr,
            b * ss_b + y0 * ss_h + x0 * ss_w, b * sg_b + y * sg_h + x * sg_w, b * sgs_b + y0 * sgs_h + x0 * sgs_w,
            C, ss_c, ss_h, ss_w, sg_c, sgs_c, sgs_h, sgs_w,
            finite, ax, ay, m00, m01, m10, m11, pmask, scale_ptr, b,
            NEED_SRC, NEED_DISP, DETERMINISTIC, IDX64, BLOCK_C,
        )
        if NEED_DISP:
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def _forward(src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    out = empty_like_src(src, (b, c, h, w))
    if out.numel() == 0:
        return out
    launches, meta = row_launches(src, b, h, w)
    for grid, yb_base, b_base in launches:
        _warp_fwd_kernel[grid](
            src, disp, out,
            c, h, w, h_in, w_in, yb_base, b_base,
            *src.stride(), *disp.stride(), *out.stride(),
            BORDER=padding == "border", F64=src.dtype == torch.float64, IDX64=needs_int64(src, disp, out), **meta,
        )
    return out


def _backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    gs = GradSrc(src, grad_out_bound(grad_out) if deterministic else None) if need_src else None
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else None
    if b * h * w and (need_src or need_disp):
        launches, meta = row_launches(src, b, h, w)
        # src and disp stand in for buffers this launch does not touch.
        gs_buf = gs.buf if gs is not None else src
        gd_buf = grad_disp if grad_disp is not None else disp
        for grid, yb_base, b_base in launches:
            _warp_bwd_kernel[grid](
                src, disp, grad_out, gs_buf, gd_buf, gs.scale if gs is not None else disp,
                c, h, w, h_in, w_in, yb_base, b_base,
                *src.stride(), *disp.stride(), *grad_out.stride(), *gs_buf.stride(), *gd_buf.stride(),
                NEED_SRC=need_src, NEED_DISP=need_disp, DETERMINISTIC=gs is not None and gs.deterministic,
                BORDER=padding == "border", F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, disp, grad_out, gs_buf), **meta,
            )
    return or_empty(gs.finish() if gs is not None else None, src), or_empty(grad_disp, disp)


def _forward_fake(src, disp, padding, deterministic):
    return empty_like_src(src, (src.shape[0], src.shape[1], disp.shape[2], disp.shape[3]))


def _backward_fake(grad_out, src, disp, padding, need_src, need_disp, deterministic):
    grad_src = empty_like_src(src, tuple(src.shape)) if need_src else src.new_empty(0)
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else disp.new_empty(0)
    return grad_src, grad_disp


def _cpu_forward(src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool) -> torch.Tensor:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_forward(src, disp, padding, deterministic)
    return compiled.warp_forward(src, disp, padding)


def _cpu_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_backward(grad_out, src, disp, padding, need_src, need_disp, deterministic)
    grad_src, grad_disp = compiled.warp_backward(grad_out, src, disp, padding, need_src, need_disp)
    return or_empty(grad_src, src), or_empty(grad_disp, disp)


_warp_op = define_op("warp", _forward, _cpu_forward, fallback.warp_forward, _forward_fake)
_warp_backward_op = define_op("warp_backward", _backward, _cpu_backward, fallback.warp_backward, _backward_fake)


def _backward_rule(ctx, grad_out):
    src, disp = ctx.saved_tensors
    need_src, need_disp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_src, grad_disp = _warp_backward_op(grad_out, src, disp, ctx.padding, need_src, need_disp, ctx.deterministic)
    return (grad_src if need_src else None, grad_disp if need_disp else None, None, None)


register_autograd(_warp_op, _backward_rule, 2, fallback.warp_forward)


def warp(
    src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None
) -> torch.Tensor:
    """Warp ``src`` by the displacement field ``disp`` (bilinear, differentiable).

    out[b, c, y, x] = src sampled at (x − disp[b, 0, y, x], y − disp[b, 1, y, x])
    — the x − δ convention of TCAE; an optical flow f (x + f) is disp = −f.

    Args:
        src: [B, C, H_in, W_in] image or feature map; float16, bfloat16,
            float32 or float64; any strides (NCHW and channels_last run natively).
        disp: [B, 2, H, W] displacement in **pixels**; channel 0 is δx (along W),
            channel 1 is δy (along H). Same dtype as src, or float32 beside a
            float16/bfloat16 src. H, W may differ from src's: the output takes
            disp's size.
        padding: ``"zeros"`` (neighbours outside src count as 0) or
            ``"border"`` (the position is clamped into src first).
        deterministic: accumulate the src gradient in fixed point, bitwise
            reproducible from run to run. None follows
            ``torch.use_deterministic_algorithms``.

    Returns:
        [B, C, H, W] in src's dtype (channels_last if src is). Arithmetic is in
        float32 (float64 for float64). A non-finite δ gives NaN at that pixel,
        in every channel and in its δ gradient.

    Raises ValueError past 2**24 pixels along any axis of src or disp unless
    src is float64: positions are float32, whose integers are exact only up
    to 2**24, and a pixel would be sampled one or more pixels off.

    Autograd: first-order reverse mode runs the kernels. Forward mode
    (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``), torch.func's
    reverse transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``) and double
    backward (``create_graph=True``) run the eager PyTorch composite of the same
    op (``fallback.warp_forward``), slower, with the same gradients; there
    ``deterministic`` is torch's own (``torch.use_deterministic_algorithms``).

    Implementation by device (:func:`tcae_kernels.implementation`): CUDA
    tensors run the fused Triton kernels; CPU tensors run them under
    ``TRITON_INTERPRET=1``, otherwise compiled CPU loops (numba), or the eager
    PyTorch fallback when numba is not installed; other devices run the
    fallback.
    """
    padding = check_warp_args(src, disp, padding)
    check_position_range(src, disp)
    return call(_warp_op, src, disp, padding, resolve_deterministic(deterministic))
