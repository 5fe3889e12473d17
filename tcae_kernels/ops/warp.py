"""The displacement warp T(S, δ) and the flow warp: Triton kernels, launchers and custom ops.

Convention: ``warp`` samples at x − δ: for each output pixel (x, y) the source
is sampled bilinearly at (x − δx, y − δy), in pixels (SPEC section 1).
``flow_warp`` samples at x + flow: the same kernels, the sign a compile-time
constant (FLOW), so a flow is never copied to negate it. Either can also write
the validity mask (MASK) in the same launch. The forward reads
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

    from .sampling import (
        backward_channels,
        disp_grad,
        inside_mass,
        inside_mass_grad,
        load_pair,
        position,
        row_block,
        warp_channels,
    )

    @triton.jit
    def _warp_fwd_kernel(
        src_ptr, disp_ptr, out_ptr, mask_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        so_b, so_c, so_h, so_w,
        sm_b, sm_h, sm_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        FLOW: tl.constexpr, MASK: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        if FLOW:
            # x + f is x − (−f) exactly: negation is exact in IEEE arithmetic.
            dx = -dx
            dy = -dy
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64)
        warp_channels(
            src_ptr, out_ptr, b * ss_b + y0 * ss_h + x0 * ss_w, b * so_b + y * so_h + x * so_w, C,
            ss_c, ss_h, ss_w, so_c, finite, ax, ay, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
        )
        if MASK:
            mass = inside_mass(ax, ay, m00, m01, m10, m11, finite)
            tl.store(mask_ptr + b * sm_b + y * sm_h + x * sm_w, mass.to(mask_ptr.dtype.element_ty), mask=pmask)

    @triton.jit
    def _warp_bwd_kernel(
        src_ptr, disp_ptr, gout_ptr, gmask_ptr, gsrc_ptr, gdisp_ptr, scale_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        sg_b, sg_c, sg_h, sg_w,
        sgm_b, sgm_h, sgm_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_h, sgd_w,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        FLOW: tl.constexpr, MASK: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        if FLOW:
            dx = -dx
            dy = -dy
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
            if MASK:
                # The mask depends on the position only: its gradient joins the channels' sums.
                gm = tl.load(gmask_ptr + b * sgm_b + y * sgm_h + x * sgm_w, mask=pmask, other=0.0).to(ax.dtype)
                mx, my = inside_mass_grad(gm, ax, ay, m00, m01, m10, m11)
                sum_x += mx
                sum_y += my
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
            if FLOW:
                # ∂x̂/∂f = +1: the sign of ∂L/∂δ flips, exactly.
                gdx = -gdx
                gdy = -gdy
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def _launch_forward(
    src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, mask or None): src sampled at x − disp, or at x + disp when ``flow``."""
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    out = empty_like_src(src, (b, c, h, w))
    mask = src.new_empty((b, 1, h, w)) if with_mask else None
    if b * h * w == 0 or (c == 0 and not with_mask):
        return out, mask
    # out stands in for the mask this launch does not write.
    mask_buf = mask if mask is not None else out
    launches, meta = row_launches(src, b, h, w)
    for grid, yb_base, b_base in launches:
        _warp_fwd_kernel[grid](
            src, disp, out, mask_buf,
            c, h, w, h_in, w_in, yb_base, b_base,
            *src.stride(), *disp.stride(), *out.stride(), mask_buf.stride(0), mask_buf.stride(2), mask_buf.stride(3),
            BORDER=padding == "border", F64=src.dtype == torch.float64, IDX64=needs_int64(src, disp, out),
            FLOW=flow, MASK=with_mask, **meta,
        )
    return out, mask


def _forward(src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool) -> torch.Tensor:
    return _launch_forward(src, disp, padding, False, False)[0]


def _launch_backward(
    grad_out: torch.Tensor, grad_mask: torch.Tensor | None, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool, flow: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂src, ∂L/∂disp), empty where not needed; grad_mask: ∂L/∂mask [B, 1, H, W] or None."""
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    gs = GradSrc(src, grad_out_bound(grad_out) if deterministic else None) if need_src else None
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else None
    if b * h * w and (need_src or need_disp):
        launches, meta = row_launches(src, b, h, w)
        # src, disp and grad_out stand in for buffers this launch does not touch.
        gs_buf = gs.buf if gs is not None else src
        gd_buf = grad_disp if grad_disp is not None else disp
        gm_buf = grad_mask if grad_mask is not None else grad_out
        for grid, yb_base, b_base in launches:
            _warp_bwd_kernel[grid](
                src, disp, grad_out, gm_buf, gs_buf, gd_buf, gs.scale if gs is not None else disp,
                c, h, w, h_in, w_in, yb_base, b_base,
                *src.stride(), *disp.stride(), *grad_out.stride(),
                gm_buf.stride(0), gm_buf.stride(2), gm_buf.stride(3), *gs_buf.stride(), *gd_buf.stride(),
                NEED_SRC=need_src, NEED_DISP=need_disp, DETERMINISTIC=gs is not None and gs.deterministic,
                BORDER=padding == "border", F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, disp, grad_out, gs_buf, gm_buf), FLOW=flow, MASK=grad_mask is not None,
                **meta,
            )
    return or_empty(gs.finish() if gs is not None else None, src), or_empty(grad_disp, disp)


def _backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, None, src, disp, padding, need_src, need_disp, deterministic, False)


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
    src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        return_mask: also return the validity mask (see :func:`flow_warp`).

    Returns:
        [B, C, H, W] in src's dtype (channels_last if src is). Arithmetic is in
        float32 (float64 for float64). A non-finite δ gives NaN at that pixel,
        in every channel and in its δ gradient. With ``return_mask``, the pair
        (out, mask), mask [B, 1, H, W].

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
    if return_mask:
        return tuple(call(_variant_op, src, disp, padding, resolve_deterministic(deterministic), False, True))
    return call(_warp_op, src, disp, padding, resolve_deterministic(deterministic))


def _variant_forward(
    src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool, flow: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, mask = _launch_forward(src, disp, padding, flow, with_mask)
    return out, or_empty(mask, src)


def _variant_backward(
    grad_out: torch.Tensor, grad_mask: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool, flow: bool, with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(
        grad_out, grad_mask if with_mask else None, src, disp, padding, need_src, need_disp, deterministic, flow
    )


def _variant_forward_fake(src, disp, padding, deterministic, flow, with_mask):
    mask = src.new_empty((src.shape[0], 1, disp.shape[2], disp.shape[3])) if with_mask else src.new_empty(0)
    return _forward_fake(src, disp, padding, deterministic), mask


def _variant_backward_fake(grad_out, grad_mask, src, disp, padding, need_src, need_disp, deterministic, flow,
                           with_mask):
    return _backward_fake(grad_out, src, disp, padding, need_src, need_disp, deterministic)


def _cpu_variant_forward(
    src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool, flow: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_variant_forward(src, disp, padding, deterministic, flow, with_mask)
    out, mask = compiled.warp_variant_forward(src, disp, padding, flow, with_mask)
    return out, or_empty(mask, src)


def _cpu_variant_backward(
    grad_out: torch.Tensor, grad_mask: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool, flow: bool, with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_variant_backward(
            grad_out, grad_mask, src, disp, padding, need_src, need_disp, deterministic, flow, with_mask
        )
    grad_src, grad_disp = compiled.warp_variant_backward(
        grad_out, grad_mask if with_mask else None, src, disp, padding, need_src, need_disp, flow
    )
    return or_empty(grad_src, src), or_empty(grad_disp, disp)


_variant_op = define_op(
    "warp_variant", _variant_forward, _cpu_variant_forward, fallback.warp_variant_forward, _variant_forward_fake
)
_variant_backward_op = define_op(
    "warp_variant_backward", _variant_backward, _cpu_variant_backward, fallback.warp_variant_backward,
    _variant_backward_fake,
)


def _variant_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.arguments = tuple(inputs[2:])
    ctx.padding, ctx.deterministic, ctx.flow, ctx.with_mask = inputs[2:]


def _variant_backward_rule(ctx, grad_out, grad_mask):
    src, disp = ctx.saved_tensors
    need_src, need_disp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_mask is None or not ctx.with_mask:
        grad_mask = grad_out.new_empty(0)
    grad_src, grad_disp = _variant_backward_op(
        grad_out, grad_mask, src, disp, ctx.padding, need_src, need_disp, ctx.deterministic, ctx.flow, ctx.with_mask
    )
    return (grad_src if need_src else None, grad_disp if need_disp else None, None, None, None, None)


register_autograd(_variant_op, _variant_backward_rule, 2, fallback.warp_variant_forward, _variant_setup)


def flow_warp(
    src: torch.Tensor, flow: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``src`` by an optical flow (bilinear, differentiable): the x + flow convention.

    out[b, c, y, x] = src sampled at (x + flow[b, 0, y, x], y + flow[b, 1, y, x])
    — the convention of RAFT, PWC-Net, GMFlow, RIFE, VoxelMorph and MONAI's
    Warp: a flow from frame 1 to frame 2 warps frame 2 onto frame 1. It is
    :func:`warp` with δ = −flow, bit for bit (x − (−f) is x + f exactly), run by
    the same kernels with the sign fixed at compile time: no negated copy of
    the flow on the GPU. Equal to ``grid_sample(src, grid, align_corners=True)``
    on the normalized grid of x + flow.

    Args:
        src: [B, C, H_in, W_in]; float16, bfloat16, float32 or float64; any strides.
        flow: [B, 2, H, W] in **pixels**; channel 0 along W (x), channel 1
            along H (y). Same dtype as src, or float32 beside a float16/bfloat16
            src. The output takes flow's size.
        padding: ``"zeros"`` or ``"border"``, as :func:`warp`.
        deterministic: as :func:`warp`.
        return_mask: also return the validity mask, computed in the same
            launch: [B, 1, H, W] in src's dtype, the bilinear weight that fell on
            pixels inside src, in [0, 1] (1 inside, falling to 0 across the
            last pixel at the border; always 1 with ``"border"``). PWC-Net gets
            it by warping a plane of ones. Differentiable in the flow; NaN at a
            non-finite flow.

    Returns:
        [B, C, H, W] in src's dtype, or (out, mask) with ``return_mask``.
    """
    padding = check_warp_args(src, flow, padding, "flow")
    check_position_range(src, flow, "flow")
    out, mask = call(_variant_op, src, flow, padding, resolve_deterministic(deterministic), True, bool(return_mask))
    return (out, mask) if return_mask else out
