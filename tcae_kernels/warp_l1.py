"""The warp fused with TCAE's per-sample L1 reconstruction loss.

    loss[b] = mean over (c, y, x) of |T(src, δ)[b, c, y, x] − target[b, c, y, x]|

The warped image is never written: the forward kernel reduces |out − target|
per program (one batch element per program row, partial sums in a small
buffer, summed afterwards in a fixed order, so the loss is deterministic), and
the backward kernel recomputes the four neighbours it needs anyway for ∂L/∂δ.
"""

from __future__ import annotations

import torch

from .checks import check_tensor, check_warp_args
from .fallback import acc_dtype
from .warp import (
    channel_block,
    disp_grad,
    empty_like_src,
    finish_grad_src,
    grad_src_buffer,
    interpolate,
    launch_config,
    load_neighbours,
    load_pair,
    needs_int64,
    pixels,
    position,
    position_grad,
    resolve_deterministic,
    scatter_neighbours,
    triton,
    uses_triton,
    warp_torch,
)

REDUCTIONS = ("none", "mean")

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _setup(disp_ptr, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w,
               BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (p, b) owns pixel block p of batch element b."""
        _, y, x, pmask = pixels(tl.program_id(0), H * W, H, W, IDX64, BLOCK_P)
        b = tl.program_id(1)
        if IDX64:
            b = b.to(tl.int64)
        dx, dy = load_pair(disp_ptr, b * sd_b + y * sd_h + x * sd_w, sd_c, pmask, F64)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            b, y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        return b, y, x, pmask, finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11

    @triton.jit
    def _warp_l1_fwd_kernel(
        src_ptr, disp_ptr, tgt_ptr, part_ptr,
        C, H, W, H_in, W_in,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        st_b, st_c, st_h, st_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask, finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = _setup(
            disp_ptr, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w, BORDER, F64, IDX64, BLOCK_P
        )
        src_base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        tgt_base = (b * st_b + y * st_h + x * st_w)[:, None]
        total = tl.zeros_like(ax)
        for c0 in range(0, C, BLOCK_C):
            c, cm = channel_block(c0, C, IDX64, BLOCK_C)
            v00, v01, v10, v11 = load_neighbours(
                src_ptr + src_base + (c * ss_c)[None, :], ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype
            )
            m = pmask[:, None] & cm
            t = tl.load(tgt_ptr + tgt_base + (c * st_c)[None, :], mask=m, other=0.0).to(ax.dtype)
            val = tl.where(finite[:, None], interpolate(v00, v01, v10, v11, ax, ay), float("nan"))
            total += tl.sum(tl.where(m, tl.abs(val - t), 0.0), axis=1)
        tl.store(part_ptr + b * tl.num_programs(0) + tl.program_id(0), tl.sum(total, axis=0))

    @triton.jit
    def _warp_l1_bwd_kernel(
        src_ptr, disp_ptr, tgt_ptr, gloss_ptr, gsrc_ptr, gdisp_ptr, gtgt_ptr,
        C, H, W, H_in, W_in, inv_count,
        ss_b, ss_c, ss_h, ss_w,
        sd_b, sd_c, sd_h, sd_w,
        st_b, st_c, st_h, st_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_h, sgd_w,
        sgt_b, sgt_c, sgt_h, sgt_w,
        fixed_scale,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, NEED_TARGET: tl.constexpr,
        DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask, finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = _setup(
            disp_ptr, H, W, H_in, W_in, sd_b, sd_c, sd_h, sd_w, BORDER, F64, IDX64, BLOCK_P
        )
        # ∂loss[b]/∂out = sign(out − target) / (C·H·W).
        g_b = tl.load(gloss_ptr + b).to(ax.dtype) * inv_count
        src_base = (b * ss_b + y0 * ss_h + x0 * ss_w)[:, None]
        gsrc_base = (b * sgs_b + y0 * sgs_h + x0 * sgs_w)[:, None]
        tgt_base = (b * st_b + y * st_h + x * st_w)[:, None]
        sum_x = tl.zeros_like(ax)
        sum_y = tl.zeros_like(ay)
        for c0 in range(0, C, BLOCK_C):
            c, cm = channel_block(c0, C, IDX64, BLOCK_C)
            m = pmask[:, None] & cm
            v00, v01, v10, v11 = load_neighbours(
                src_ptr + src_base + (c * ss_c)[None, :], ss_h, ss_w, m00, m01, m10, m11, cm, ax.dtype
            )
            t = tl.load(tgt_ptr + tgt_base + (c * st_c)[None, :], mask=m, other=0.0).to(ax.dtype)
            diff = interpolate(v00, v01, v10, v11, ax, ay) - t
            g = tl.where(diff > 0, g_b, tl.where(diff < 0, -g_b, 0.0))
            g = tl.where(m, g, 0.0)
            if NEED_DISP:
                px, py = position_grad(g, v00, v01, v10, v11, ax, ay)
                sum_x += px
                sum_y += py
            if NEED_SRC:
                scatter_neighbours(
                    gsrc_ptr + gsrc_base + (c * sgs_c)[None, :], sgs_h, sgs_w, g, ax, ay,
                    m00 & finite, m01 & finite, m10 & finite, m11 & finite, cm,
                    fixed_scale, DETERMINISTIC,
                )
            if NEED_TARGET:
                # |NaN − t| has no slope: NaN, as autograd gives for abs at NaN.
                gt = tl.where(finite[:, None], -g, float("nan"))
                gt_ptr = gtgt_ptr + (b * sgt_b + y * sgt_h + x * sgt_w)[:, None] + (c * sgt_c)[None, :]
                tl.store(gt_ptr, gt.to(gtgt_ptr.dtype.element_ty), mask=m)
        if NEED_DISP:
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
            gd = gdisp_ptr + b * sgd_b + y * sgd_h + x * sgd_w
            tl.store(gd, gdx.to(gdisp_ptr.dtype.element_ty), mask=pmask)
            tl.store(gd + sgd_c, gdy.to(gdisp_ptr.dtype.element_ty), mask=pmask)


def _grid(src: torch.Tensor, disp: torch.Tensor) -> tuple[tuple[int, int], dict]:
    block_p, block_c, num_warps = launch_config(src.shape[1])
    h, w = disp.shape[2:]
    meta = dict(F64=src.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return (triton.cdiv(h * w, block_p), src.shape[0]), meta


@torch.library.custom_op("tcae_kernels::warp_l1", mutates_args=())
def _warp_l1_op(
    src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str, deterministic: bool
) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    h, w = disp.shape[2:]
    grid, meta = _grid(src, disp)
    if b * c * h * w == 0:
        return torch.full((b,), float("nan"), dtype=acc_dtype(src), device=src.device)
    partials = torch.empty(b, grid[0], dtype=acc_dtype(src), device=src.device)
    _warp_l1_fwd_kernel[grid](
        src, disp, target, partials,
        c, h, w, h_in, w_in,
        *src.stride(), *disp.stride(), *target.stride(),
        BORDER=padding == "border", IDX64=needs_int64(src, disp, target), **meta,
    )
    return partials.sum(dim=1) / (c * h * w)


@_warp_l1_op.register_fake
def _(src, disp, target, padding, deterministic):
    return src.new_empty(src.shape[0], dtype=acc_dtype(src))


@torch.library.custom_op("tcae_kernels::warp_l1_backward", mutates_args=())
def _warp_l1_backward_op(
    grad_loss: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, need_target: bool, deterministic: bool,
) -> list[torch.Tensor]:
    b, c, h_in, w_in = src.shape
    h, w = disp.shape[2:]
    count = c * h * w
    # Each src element receives at most Σ over its (b, c) of |∂loss/∂out| = |grad_loss[b]| / C.
    bound = grad_loss.detach().abs().double().amax().item() / max(c, 1) if deterministic and b else None
    gs, scale = grad_src_buffer(src, bound) if need_src else (None, 0.0)
    # Every element is written by the kernel, unless there is nothing to launch over.
    new = torch.empty_like if count else torch.zeros_like
    grad_disp = new(disp, memory_format=torch.contiguous_format) if need_disp else None
    grad_target = new(target, memory_format=torch.contiguous_format) if need_target else None
    if count and (need_src or need_disp or need_target):
        grid, meta = _grid(src, disp)
        gs_arg = gs if gs is not None else src
        gd_arg = grad_disp if grad_disp is not None else disp
        gt_arg = grad_target if grad_target is not None else target
        _warp_l1_bwd_kernel[grid](
            src, disp, target, grad_loss.contiguous(), gs_arg, gd_arg, gt_arg,
            c, h, w, h_in, w_in, 1.0 / count,
            *src.stride(), *disp.stride(), *target.stride(),
            *gs_arg.stride(), *gd_arg.stride(), *gt_arg.stride(),
            scale,
            NEED_SRC=need_src, NEED_DISP=need_disp, NEED_TARGET=need_target, DETERMINISTIC=scale != 0.0,
            BORDER=padding == "border", IDX64=needs_int64(src, disp, target, gs_arg), **meta,
        )
    return [
        finish_grad_src(gs, scale, src, bound) if gs is not None else src.new_empty(0),
        grad_disp if grad_disp is not None else disp.new_empty(0),
        grad_target if grad_target is not None else target.new_empty(0),
    ]


@_warp_l1_backward_op.register_fake
def _(grad_loss, src, disp, target, padding, need_src, need_disp, need_target, deterministic):
    return [
        empty_like_src(src, tuple(src.shape), src.dtype) if need_src else src.new_empty(0),
        torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else disp.new_empty(0),
        torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0),
    ]


def _setup_context(ctx, inputs, output):
    src, disp, target, padding, deterministic = inputs
    ctx.save_for_backward(src, disp, target)
    ctx.padding = padding
    ctx.deterministic = deterministic


def _backward_rule(ctx, grad_loss):
    src, disp, target = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = _warp_l1_backward_op(grad_loss, src, disp, target, ctx.padding, *need, ctx.deterministic)
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


_warp_l1_op.register_autograd(_backward_rule, setup_context=_setup_context)


def warp_l1(
    src: torch.Tensor,
    disp: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "none",
    padding: str = "zeros",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Mean |warp(src, disp, padding) − target| per sample, without writing the warped image.

    Args:
        src: [B, C, H_in, W_in]; disp: [B, 2, H, W] in pixels (δx, δy);
        target: [B, C, H, W], src's dtype.
        reduction: ``"none"`` gives [B] (the mean over C·H·W of each sample);
            ``"mean"`` averages those over the batch to a scalar.
        padding, deterministic: as for :func:`tcae_kernels.warp`.

    Returns float32 (float64 for float64 inputs), with gradients for src,
    disp and target. An empty sample gives NaN, as ``torch.mean`` of nothing.
    Without Triton (CPU without the interpreter) the unfused composition runs.
    """
    padding = check_warp_args(src, disp, padding)
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
    if uses_triton(src):
        loss = _warp_l1_op(src, disp, target, padding, resolve_deterministic(deterministic))
    else:
        # Warp in the arithmetic dtype, as the kernel does: a bfloat16 image
        # rounded before the difference would flip the sign of small residuals.
        acc = acc_dtype(src)
        loss = (warp_torch(src.to(acc), disp.to(acc), padding) - target.to(acc)).abs().flatten(1).mean(dim=1)
    return loss.mean() if reduction == "mean" else loss
