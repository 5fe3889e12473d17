"""TCAE's attention merge fused with the warp: one forward and one backward kernel.

    w_a = e^{l_a} / (e^{l_a} + e^{l_b}),   δ = w_a·δ_a + (1 − w_a)·δ_b,   out = T(src, δ)

(SPEC section 6; sampling at x − δ, pixels). The merged δ lives only in
registers: the kernels read the two displacements and two logits once per
pixel and never write δ.
"""

from __future__ import annotations

import torch

from .. import fallback
from ..checks import check_field, check_tensor, check_warp_args
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
        load_pair,
        position,
        row_block,
        warp_channels,
    )

    @triton.jit
    def _merge(da_ptr, db_ptr, la_ptr, lb_ptr, b, y, x, H, W, pmask):
        """Load both displacements and logits of a pixel block and merge them, in float64.

        The fields are contiguous: δ is [B, 2, H, W], the logits [B, 1, H, W].
        Merging in float32 would round δ by ~1e-7 of its size (pixels), which
        at TCAE's displacements of up to half the image is more than the
        warp's own error; per pixel, float64 costs next to nothing.
        """
        hw = H * W
        pix = y * W + x
        dax, day = load_pair(da_ptr, b * 2 * hw + pix, hw, pmask, True)
        dbx, dby = load_pair(db_ptr, b * 2 * hw + pix, hw, pmask, True)
        la = tl.load(la_ptr + b * hw + pix, mask=pmask, other=0.0).to(tl.float64)
        lb = tl.load(lb_ptr + b * hw + pix, mask=pmask, other=0.0).to(tl.float64)
        # The softmax of two as a sigmoid: exp may overflow to inf (weight 0), and an
        # infinite logit takes its limit (weight 1 or 0), as torch.sigmoid does.
        wa = 1.0 / (1.0 + tl.exp(lb - la))
        return dax, day, dbx, dby, wa, wa * dax + (1 - wa) * dbx, wa * day + (1 - wa) * dby

    @triton.jit
    def _arithmetic(v, F64: tl.constexpr):
        """Per-channel arithmetic runs in float32 unless src is float64."""
        if F64:
            r = v
        else:
            r = v.to(tl.float32)
        return r

    @triton.jit
    def _store_field(ptr, v, mask, F64: tl.constexpr):
        """Store a float64 per-pixel gradient; through float32 unless the fields are float64
        (the Triton interpreter turns float64 → bfloat16 into zeros)."""
        if F64:
            tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ptr, v.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merged_fwd_kernel(
        src_ptr, da_ptr, db_ptr, la_ptr, lb_ptr, out_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        so_b, so_c, so_h, so_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        _, _, _, _, _, dx, dy = _merge(da_ptr, db_ptr, la_ptr, lb_ptr, b, y, x, H, W, pmask)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64)
        warp_channels(
            src_ptr, out_ptr, b * ss_b + y0 * ss_h + x0 * ss_w, b * so_b + y * so_h + x * so_w, C,
            ss_c, ss_h, ss_w, so_c, finite, _arithmetic(ax, F64), _arithmetic(ay, F64),
            m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
        )

    @triton.jit
    def _merged_bwd_kernel(
        src_ptr, da_ptr, db_ptr, la_ptr, lb_ptr, gout_ptr,
        gsrc_ptr, gda_ptr, gdb_ptr, gla_ptr, glb_ptr, scale_ptr,
        C, H, W, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sg_b, sg_c, sg_h, sg_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        NEED_SRC: tl.constexpr, NEED_FIELDS: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dax, day, dbx, dby, wa, dx, dy = _merge(da_ptr, db_ptr, la_ptr, lb_ptr, b, y, x, H, W, pmask)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        sum_x, sum_y = backward_channels(
            src_ptr, gout_ptr, gsrc_ptr,
            b * ss_b + y0 * ss_h + x0 * ss_w, b * sg_b + y * sg_h + x * sg_w, b * sgs_b + y0 * sgs_h + x0 * sgs_w,
            C, ss_c, ss_h, ss_w, sg_c, sgs_c, sgs_h, sgs_w,
            finite, _arithmetic(ax, F64), _arithmetic(ay, F64), m00, m01, m10, m11, pmask, scale_ptr, b,
            NEED_SRC, NEED_FIELDS, DETERMINISTIC, IDX64, BLOCK_C,
        )
        if NEED_FIELDS:
            gdx, gdy = disp_grad(sum_x.to(tl.float64), sum_y.to(tl.float64), gate_x, gate_y, finite)
            # δ = w_a·δ_a + w_b·δ_b with ∂w_a/∂l_a = w_a·w_b = −∂w_a/∂l_b.
            wb = 1 - wa
            gl = wa * wb * (gdx * (dax - dbx) + gdy * (day - dby))
            hw = H * W
            pix = y * W + x
            d_off = b * 2 * hw + pix
            l_off = b * hw + pix
            _store_field(gda_ptr + d_off, wa * gdx, pmask, F64)
            _store_field(gda_ptr + d_off + hw, wa * gdy, pmask, F64)
            _store_field(gdb_ptr + d_off, wb * gdx, pmask, F64)
            _store_field(gdb_ptr + d_off + hw, wb * gdy, pmask, F64)
            _store_field(gla_ptr + l_off, gl, pmask, F64)
            _store_field(glb_ptr + l_off, -gl, pmask, F64)


def _forward(
    src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor, logit_a: torch.Tensor, logit_b: torch.Tensor,
    padding: str, deterministic: bool,
) -> torch.Tensor:
    fields = [t.contiguous() for t in (disp_a, disp_b, logit_a, logit_b)]
    b, c, h_in, w_in = src.shape
    h, w = disp_a.shape[2:]
    out = empty_like_src(src, (b, c, h, w))
    if out.numel() == 0:
        return out
    launches, meta = row_launches(src, b, h, w)
    for grid, yb_base, b_base in launches:
        _merged_fwd_kernel[grid](
            src, *fields, out, c, h, w, h_in, w_in, yb_base, b_base, *src.stride(), *out.stride(),
            BORDER=padding == "border", F64=src.dtype == torch.float64,
            IDX64=needs_int64(src, out, *fields), **meta,
        )
    return out


def _backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str,
    need_src: bool, need_fields: bool, deterministic: bool,
) -> list[torch.Tensor]:
    fields = [t.contiguous() for t in (disp_a, disp_b, logit_a, logit_b)]
    b, c, h_in, w_in = src.shape
    h, w = disp_a.shape[2:]
    gs = GradSrc(src, grad_out_bound(grad_out) if deterministic else None) if need_src else None
    grads = [torch.empty_like(f) for f in fields] if need_fields else []
    if b * h * w and (need_src or need_fields):
        launches, meta = row_launches(src, b, h, w)
        # src and the fields stand in for buffers this launch does not touch.
        gs_buf = gs.buf if gs is not None else src
        for grid, yb_base, b_base in launches:
            _merged_bwd_kernel[grid](
                src, *fields, grad_out, gs_buf, *(grads or fields), gs.scale if gs is not None else src,
                c, h, w, h_in, w_in, yb_base, b_base,
                *src.stride(), *grad_out.stride(), *gs_buf.stride(),
                NEED_SRC=need_src, NEED_FIELDS=need_fields, DETERMINISTIC=gs is not None and gs.deterministic,
                BORDER=padding == "border", F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, grad_out, gs_buf, *fields), **meta,
            )
    return [or_empty(gs.finish() if gs is not None else None, src), *grads]


def _forward_fake(src, disp_a, disp_b, logit_a, logit_b, padding, deterministic):
    return empty_like_src(src, (src.shape[0], src.shape[1], disp_a.shape[2], disp_a.shape[3]))


def _backward_fake(grad_out, src, disp_a, disp_b, logit_a, logit_b, padding, need_src, need_fields, deterministic):
    grad_src = empty_like_src(src, tuple(src.shape)) if need_src else src.new_empty(0)
    grads = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in (disp_a, disp_b, logit_a, logit_b)]
    return [grad_src, *(grads if need_fields else [])]


def _cpu_forward(
    src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor, logit_a: torch.Tensor, logit_b: torch.Tensor,
    padding: str, deterministic: bool,
) -> torch.Tensor:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.merged_warp_forward(src, disp_a, disp_b, logit_a, logit_b, padding, deterministic)
    return compiled.merged_warp_forward(src, disp_a, disp_b, logit_a, logit_b, padding)


def _cpu_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str,
    need_src: bool, need_fields: bool, deterministic: bool,
) -> list[torch.Tensor]:
    fields = (disp_a, disp_b, logit_a, logit_b)
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.merged_warp_backward(grad_out, src, *fields, padding, need_src, need_fields, deterministic)
    grad_src, grads = compiled.merged_warp_backward(grad_out, src, *fields, padding, need_src, need_fields)
    return [or_empty(grad_src, src), *(grads or [])]


_merged_warp_op = define_op("merged_warp", _forward, _cpu_forward, fallback.merged_warp_forward, _forward_fake)
_merged_warp_backward_op = define_op(
    "merged_warp_backward", _backward, _cpu_backward, fallback.merged_warp_backward, _backward_fake
)


def _backward_rule(ctx, grad_out):
    src, *fields = ctx.saved_tensors
    need_src = ctx.needs_input_grad[0]
    need_fields = any(ctx.needs_input_grad[1:5])
    grad_src, *grads = _merged_warp_backward_op(
        grad_out, src, *fields, ctx.padding, need_src, need_fields, ctx.deterministic
    )
    grads = grads if need_fields else [None] * 4
    return (grad_src if need_src else None, *grads, None, None)


register_autograd(_merged_warp_op, _backward_rule, 5, fallback.merged_warp_forward)


def merge_displacements(
    disp_a: torch.Tensor, disp_b: torch.Tensor, logit_a: torch.Tensor, logit_b: torch.Tensor
) -> torch.Tensor:
    """δ = (e^{l_a}·δ_a + e^{l_b}·δ_b) / (e^{l_a} + e^{l_b}) per pixel, in plain PyTorch.

    disp_a, disp_b: [B, 2, H, W] pixels; logit_a, logit_b: [B, 1, H, W].
    Returns [B, 2, H, W] pixels. The unfused reference of :func:`merged_warp`.
    """
    check_tensor("disp_a", disp_a)
    if disp_a.shape[1] != 2:
        raise ValueError(f"disp_a must have 2 channels (dx, dy) in dim 1, got shape {tuple(disp_a.shape)}")
    check_field("disp_b", disp_b, disp_a, disp_a, 2)
    check_field("logit_a", logit_a, disp_a, disp_a, 1)
    check_field("logit_b", logit_b, disp_a, disp_a, 1)
    w_a = torch.sigmoid(logit_a - logit_b)
    return w_a * disp_a + (1 - w_a) * disp_b


def merged_warp(
    src: torch.Tensor,
    disp_a: torch.Tensor,
    disp_b: torch.Tensor,
    logit_a: torch.Tensor,
    logit_b: torch.Tensor,
    padding: str = "zeros",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """``warp(src, merge_displacements(disp_a, disp_b, logit_a, logit_b), padding)``, fused.

    Samples at x − δ (pixels), like :func:`tcae_kernels.warp`.

    Args:
        src: [B, C, H_in, W_in].
        disp_a, disp_b: [B, 2, H, W] displacements in pixels (δx, δy).
        logit_a, logit_b: [B, 1, H, W] attention logits; the weight of δ_a is
            the per-pixel softmax of the two.
        padding, deterministic: as for :func:`tcae_kernels.warp`.

    Returns [B, C, H, W] in src's dtype, with gradients for all five inputs.
    The four fields share one dtype (src's, or float32 beside half/bfloat16).
    The merge, and so every sample position, is computed in float64 on every
    path: no size limit, unlike :func:`tcae_kernels.warp`'s 2**24 pixels.
    Autograd modes and the implementation by device are those of
    :func:`tcae_kernels.warp` (the composite: ``fallback.merged_warp_forward``).
    """
    padding = check_warp_args(src, disp_a, padding, disp_name="disp_a")
    check_field("disp_b", disp_b, src, disp_a, 2)
    check_field("logit_a", logit_a, src, disp_a, 1)
    check_field("logit_b", logit_b, src, disp_a, 1)
    return call(_merged_warp_op, src, disp_a, disp_b, logit_a, logit_b, padding, resolve_deterministic(deterministic))
