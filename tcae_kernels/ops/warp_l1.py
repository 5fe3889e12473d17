"""The warp fused with TCAE's per-sample L1 reconstruction loss.

    loss[b] = mean over (c, y, x) of |T(src, δ)[b, c, y, x] − target[b, c, y, x]|

(sampling at x − δ, pixels). The warped image is never written: each forward
program reduces |out − target| over its pixels into one partial sum, and the
partials are summed afterwards in a fixed order, so the loss is
deterministic. The backward recomputes the four neighbours it needs anyway
for ∂L/∂δ.
"""

from __future__ import annotations

import torch

from .. import fallback
from ..checks import check_position_range, check_tensor, check_warp_args
from .launch import (
    GradSrc,
    acc_dtype,
    call,
    compiled_cpu,
    define_op,
    empty_like_src,
    needs_int64,
    or_empty,
    register_autograd,
    resolve_deterministic,
    row_launches,
    triton,
)

REDUCTIONS = ("none", "mean")

if triton is not None:
    import triton.language as tl

    from .sampling import (
        channel_mask,
        channel_offsets,
        disp_grad,
        interpolate,
        load_neighbours,
        load_pair,
        per_channel,
        position,
        position_grad,
        row_block,
        scatter_neighbours,
        sum_channels,
    )

    @triton.jit
    def _residual(
        src_ptr, tgt_ptr, src_pix, tgt_pix, c0, C, ss_c, ss_h, ss_w, st_c,
        axc, ayc, m00, m01, m10, m11, pmask, IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One channel tile: the four neighbours, T(src, δ) − target, and the tile's mask."""
        s_off = channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C)
        cm = channel_mask(c0, C, pmask, BLOCK_C)
        t_off = channel_offsets(tgt_pix, c0, st_c, IDX64, BLOCK_C)
        v00, v01, v10, v11 = load_neighbours(src_ptr, s_off, ss_h, ss_w, m00, m01, m10, m11, cm, axc.dtype, BLOCK_C)
        t = tl.load(tgt_ptr + t_off, mask=cm, other=0.0).to(axc.dtype)
        return v00, v01, v10, v11, interpolate(v00, v01, v10, v11, axc, ayc) - t, cm

    @triton.jit
    def _warp_l1_fwd_kernel(
        src_ptr, disp_ptr, tgt_ptr, part_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        st_b, st_c, st_h, st_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64)
        src_pix = b * ss_b + y0 * ss_h + x0 * ss_w
        tgt_pix = b * st_b + y * st_h + x * st_w
        axc = per_channel(ax, BLOCK_C)
        ayc = per_channel(ay, BLOCK_C)
        bad = per_channel(finite == 0, BLOCK_C)
        total = tl.zeros_like(ax)
        for c0 in range(0, C, BLOCK_C):
            v00, v01, v10, v11, diff, cm = _residual(
                src_ptr, tgt_ptr, src_pix, tgt_pix, c0, C, ss_c, ss_h, ss_w, st_c,
                axc, ayc, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
            )
            diff = tl.where(bad, float("nan"), diff)
            total += sum_channels(tl.where(cm, tl.abs(diff), 0.0), BLOCK_C)
        n_xb = tl.num_programs(0)
        yb = tl.program_id(1) + yb_base
        tl.store(part_ptr + (b * tl.cdiv(H, ROWS) + yb) * n_xb + tl.program_id(0), tl.sum(total, axis=0))

    @triton.jit
    def _warp_l1_bwd_kernel(
        src_ptr, disp_ptr, tgt_ptr, gloss_ptr, gsrc_ptr, gdisp_ptr, gtgt_ptr, scale_ptr,
        C, H, W, H_in, W_in, yb_base, b_base, inv_count,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        st_b, st_c, st_h, st_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_h, sgd_w,
        sgt_b, sgt_c, sgt_h, sgt_w,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, NEED_TARGET: tl.constexpr,
        DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        # ∂loss[b]/∂out = sign(out − target) / (C·H·W).
        g_b = tl.load(gloss_ptr + b).to(ax.dtype) * inv_count
        src_pix = b * ss_b + y0 * ss_h + x0 * ss_w
        gsrc_pix = b * sgs_b + y0 * sgs_h + x0 * sgs_w
        tgt_pix = b * st_b + y * st_h + x * st_w
        gtgt_pix = b * sgt_b + y * sgt_h + x * sgt_w
        axc = per_channel(ax, BLOCK_C)
        ayc = per_channel(ay, BLOCK_C)
        bad = per_channel(finite == 0, BLOCK_C)
        sum_x = tl.zeros_like(ax)
        sum_y = tl.zeros_like(ay)
        for c0 in range(0, C, BLOCK_C):
            v00, v01, v10, v11, diff, cm = _residual(
                src_ptr, tgt_ptr, src_pix, tgt_pix, c0, C, ss_c, ss_h, ss_w, st_c,
                axc, ayc, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
            )
            g = tl.where(diff > 0, g_b, tl.where(diff < 0, -g_b, 0.0))
            g = tl.where(cm, g, 0.0)
            if NEED_DISP:
                px, py = position_grad(g, v00, v01, v10, v11, axc, ayc, BLOCK_C)
                sum_x += px
                sum_y += py
            if NEED_SRC:
                gs_off = channel_offsets(gsrc_pix, c0, sgs_c, IDX64, BLOCK_C)
                # A non-finite δ has no position, so it sends nothing to src.
                scatter_neighbours(
                    gsrc_ptr, gs_off, sgs_h, sgs_w, g, axc, ayc,
                    m00 & finite, m01 & finite, m10 & finite, m11 & finite, cm,
                    scale_ptr, b, c0, C, DETERMINISTIC, BLOCK_C,
                )
            if NEED_TARGET:
                gt_off = channel_offsets(gtgt_pix, c0, sgt_c, IDX64, BLOCK_C)
                # |NaN − t| has no slope: NaN, as autograd gives for abs at NaN.
                gt = tl.where(bad, float("nan"), -g)
                tl.store(gtgt_ptr + gt_off, gt.to(gtgt_ptr.dtype.element_ty), mask=cm)
        if NEED_DISP:
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def _forward(src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str, deterministic: bool) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    h, w = disp.shape[2:]
    if b * c * h * w == 0:
        return torch.full((b,), float("nan"), dtype=acc_dtype(src), device=src.device)
    launches, meta = row_launches(src, b, h, w)
    n_xb, n_yb = launches[0][0][0], triton.cdiv(h, meta["ROWS"])
    partials = torch.empty(b, n_yb * n_xb, dtype=acc_dtype(src), device=src.device)
    for grid, yb_base, b_base in launches:
        _warp_l1_fwd_kernel[grid](
            src, disp, target, partials,
            c, h, w, h_in, w_in, yb_base, b_base,
            *src.stride(), *disp.stride(), *target.stride(),
            BORDER=padding == "border", F64=src.dtype == torch.float64,
            IDX64=needs_int64(src, disp, target, partials), **meta,
        )
    return partials.sum(dim=1) / (c * h * w)


def _backward(
    grad_loss: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, need_target: bool, deterministic: bool,
) -> list[torch.Tensor]:
    b, c, h_in, w_in = src.shape
    h, w = disp.shape[2:]
    count = c * h * w
    # Each src element receives at most Σ over its (b, c) of |∂loss/∂out| = |grad_loss[b]| / C.
    bound = (grad_loss.detach().abs() / max(c, 1))[:, None].expand(b, c) if deterministic else None
    gs = GradSrc(src, bound) if need_src else None
    # Every element is written by the kernel, unless there is nothing to launch over.
    new = torch.empty_like if count else torch.zeros_like
    grad_disp = new(disp, memory_format=torch.contiguous_format) if need_disp else None
    grad_target = new(target, memory_format=torch.contiguous_format) if need_target else None
    if count and (need_src or need_disp or need_target):
        launches, meta = row_launches(src, b, h, w)
        # src, disp and target stand in for buffers this launch does not touch.
        gs_buf = gs.buf if gs is not None else src
        gd_buf = grad_disp if grad_disp is not None else disp
        gt_buf = grad_target if grad_target is not None else target
        for grid, yb_base, b_base in launches:
            _warp_l1_bwd_kernel[grid](
                src, disp, target, grad_loss.contiguous(), gs_buf, gd_buf, gt_buf, gs.scale if gs is not None else src,
                c, h, w, h_in, w_in, yb_base, b_base, 1.0 / count,
                *src.stride(), *disp.stride(), *target.stride(),
                *gs_buf.stride(), *gd_buf.stride(), *gt_buf.stride(),
                NEED_SRC=need_src, NEED_DISP=need_disp, NEED_TARGET=need_target,
                DETERMINISTIC=gs is not None and gs.deterministic,
                BORDER=padding == "border", F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, disp, target, gs_buf), **meta,
            )
    return [
        or_empty(gs.finish() if gs is not None else None, src),
        or_empty(grad_disp, disp),
        or_empty(grad_target, target),
    ]


def _forward_fake(src, disp, target, padding, deterministic):
    return src.new_empty(src.shape[0], dtype=acc_dtype(src))


def _backward_fake(grad_loss, src, disp, target, padding, need_src, need_disp, need_target, deterministic):
    return [
        empty_like_src(src, tuple(src.shape)) if need_src else src.new_empty(0),
        torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else disp.new_empty(0),
        torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0),
    ]


def _cpu_forward(
    src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str, deterministic: bool
) -> torch.Tensor:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_l1_forward(src, disp, target, padding, deterministic)
    return compiled.warp_l1_forward(src, disp, target, padding)


def _cpu_backward(
    grad_loss: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, need_target: bool, deterministic: bool,
) -> list[torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.warp_l1_backward(
            grad_loss, src, disp, target, padding, need_src, need_disp, need_target, deterministic
        )
    grads = compiled.warp_l1_backward(grad_loss, src, disp, target, padding, need_src, need_disp, need_target)
    return [or_empty(g, like) for g, like in zip(grads, (src, disp, target))]


_warp_l1_op = define_op("warp_l1", _forward, _cpu_forward, fallback.warp_l1_forward, _forward_fake)
_warp_l1_backward_op = define_op(
    "warp_l1_backward", _backward, _cpu_backward, fallback.warp_l1_backward, _backward_fake
)


def _backward_rule(ctx, grad_loss):
    src, disp, target = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = _warp_l1_backward_op(grad_loss, src, disp, target, ctx.padding, *need, ctx.deterministic)
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


register_autograd(_warp_l1_op, _backward_rule, 3, fallback.warp_l1_forward)


def warp_l1(
    src: torch.Tensor,
    disp: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "none",
    padding: str = "zeros",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Mean |warp(src, disp, padding) − target| per sample, without writing the warped image.

    Samples at x − δ (pixels), like :func:`tcae_kernels.warp`.

    Args:
        src: [B, C, H_in, W_in]; disp: [B, 2, H, W] in pixels (δx, δy);
        target: [B, C, H, W], src's dtype.
        reduction: ``"none"`` gives [B] (the mean over C·H·W of each sample);
            ``"mean"`` averages those over the batch to a scalar.
        padding, deterministic: as for :func:`tcae_kernels.warp`.

    Returns float32 (float64 for float64 inputs), with gradients for src,
    disp and target. An empty sample gives NaN, as ``torch.mean`` of nothing.
    The size limit (2**24 pixels per axis unless src is float64), autograd
    modes and implementation by device are those of :func:`tcae_kernels.warp`
    (the composite: ``fallback.warp_l1_forward``).
    """
    padding = check_warp_args(src, disp, padding)
    check_position_range(src, disp)
    check_tensor("target", target)
    expected = (src.shape[0], src.shape[1], disp.shape[2], disp.shape[3])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} ([B, C] of src, [H, W] of disp), got {tuple(target.shape)}")
    if target.device != src.device:
        raise ValueError(f"target must be on {src.device} (src's device), got {target.device}")
    if target.dtype != src.dtype:
        raise TypeError(f"target dtype must be {src.dtype} (src's dtype), got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    loss = call(_warp_l1_op, src, disp, target, padding, resolve_deterministic(deterministic))
    return loss.mean() if reduction == "mean" else loss
