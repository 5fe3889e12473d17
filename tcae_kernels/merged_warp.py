"""TCAE's attention merge fused with the warp: one forward and one backward kernel.

    w_a = e^{l_a} / (e^{l_a} + e^{l_b}),   δ = w_a·δ_a + (1 − w_a)·δ_b,   out = T(src, δ)

(SPEC section 6). The merged δ lives only in registers: the kernels read the
two displacements and two logits once per pixel and never write δ.
"""

from __future__ import annotations

import torch

from .checks import check_field, check_tensor, check_warp_args
from .warp import (
    backward_channels,
    disp_grad,
    empty_like_src,
    finish_grad_src,
    grad_out_bound,
    grad_src_buffer,
    launch_config,
    load_pair,
    needs_int64,
    pixels,
    position,
    resolve_deterministic,
    triton,
    uses_triton,
    warp_channels,
    warp_torch,
)

if triton is not None:
    import triton.language as tl

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
        la = tl.load(la_ptr + b * hw + pix, mask=pmask, other=0.0).to(dax.dtype)
        lb = tl.load(lb_ptr + b * hw + pix, mask=pmask, other=0.0).to(dax.dtype)
        # Subtracting the larger logit keeps exp finite for any finite logits.
        m = tl.maximum(la, lb)
        ea = tl.exp(la - m)
        eb = tl.exp(lb - m)
        wa = ea / (ea + eb)
        return dax, day, dbx, dby, wa, wa * dax + (1 - wa) * dbx, wa * day + (1 - wa) * dby

    @triton.jit
    def _arithmetic(ax, ay, F64: tl.constexpr):
        """Per-channel arithmetic runs in float32 unless src is float64."""
        if F64:
            return ax, ay
        return ax.to(tl.float32), ay.to(tl.float32)

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
        N, C, H, W, H_in, W_in,
        ss_b, ss_c, ss_h, ss_w,
        so_b, so_c, so_h, so_w,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask = pixels(tl.program_id(0), N, H, W, IDX64, BLOCK_P)
        _, _, _, _, _, dx, dy = _merge(da_ptr, db_ptr, la_ptr, lb_ptr, b, y, x, H, W, pmask)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(
            b, y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        ax, ay = _arithmetic(ax, ay, F64)
        warp_channels(
            src_ptr, out_ptr, b, y, x, y0, x0, C, ss_b, ss_c, ss_h, ss_w, so_b, so_c, so_h, so_w,
            finite, ax, ay, m00, m01, m10, m11, pmask, IDX64, BLOCK_C,
        )

    @triton.jit
    def _merged_bwd_kernel(
        src_ptr, da_ptr, db_ptr, la_ptr, lb_ptr, gout_ptr,
        gsrc_ptr, gda_ptr, gdb_ptr, gla_ptr, glb_ptr,
        N, C, H, W, H_in, W_in,
        ss_b, ss_c, ss_h, ss_w,
        sg_b, sg_c, sg_h, sg_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        fixed_scale,
        NEED_SRC: tl.constexpr, NEED_FIELDS: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, y, x, pmask = pixels(tl.program_id(0), N, H, W, IDX64, BLOCK_P)
        dax, day, dbx, dby, wa, dx, dy = _merge(da_ptr, db_ptr, la_ptr, lb_ptr, b, y, x, H, W, pmask)
        finite, x0, y0, ax, ay, gate_x, gate_y, m00, m01, m10, m11 = position(
            b, y, x, dx, dy, H_in, W_in, pmask, BORDER, IDX64
        )
        ax, ay = _arithmetic(ax, ay, F64)
        sum_x, sum_y = backward_channels(
            src_ptr, gout_ptr, gsrc_ptr, b, y, x, y0, x0, C,
            ss_b, ss_c, ss_h, ss_w, sg_b, sg_c, sg_h, sg_w, sgs_b, sgs_c, sgs_h, sgs_w,
            finite, ax, ay, m00, m01, m10, m11, pmask, fixed_scale,
            NEED_SRC, NEED_FIELDS, DETERMINISTIC, IDX64, BLOCK_C,
        )
        if NEED_FIELDS:
            gdx, gdy = disp_grad(sum_x, sum_y, gate_x, gate_y, finite)
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


def _launch_args(src, fields):
    b, c, h_in, w_in = src.shape
    _, _, h, w_ = fields[0].shape
    block_p, block_c, num_warps = launch_config(c)
    n = b * h * w_
    meta = dict(F64=src.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return n, (triton.cdiv(n, block_p),), (n, c, h, w_, h_in, w_in), meta


@torch.library.custom_op("tcae_kernels::merged_warp", mutates_args=())
def _merged_warp_op(
    src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str, deterministic: bool,
) -> torch.Tensor:
    fields = [t.contiguous() for t in (disp_a, disp_b, logit_a, logit_b)]
    b, c = src.shape[:2]
    out = empty_like_src(src, (b, c, disp_a.shape[2], disp_a.shape[3]), src.dtype)
    n, grid, sizes, meta = _launch_args(src, fields)
    if n and c:
        _merged_fwd_kernel[grid](
            src, *fields, out, *sizes, *src.stride(), *out.stride(),
            BORDER=padding == "border", IDX64=needs_int64(src, out, *fields), **meta,
        )
    return out


@_merged_warp_op.register_fake
def _(src, disp_a, disp_b, logit_a, logit_b, padding, deterministic):
    return empty_like_src(src, (src.shape[0], src.shape[1], disp_a.shape[2], disp_a.shape[3]), src.dtype)


@torch.library.custom_op("tcae_kernels::merged_warp_backward", mutates_args=())
def _merged_warp_backward_op(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str,
    need_src: bool, need_fields: bool, deterministic: bool,
) -> list[torch.Tensor]:
    fields = [t.contiguous() for t in (disp_a, disp_b, logit_a, logit_b)]
    bound = grad_out_bound(grad_out) if deterministic and need_src else None
    gs, scale = grad_src_buffer(src, bound) if need_src else (None, 0.0)
    grads = [torch.empty_like(f) for f in fields] if need_fields else []
    n, grid, sizes, meta = _launch_args(src, fields)
    if n and (need_src or need_fields):
        gs_arg = gs if gs is not None else src
        _merged_bwd_kernel[grid](
            src, *fields, grad_out, gs_arg, *(grads or fields),
            *sizes, *src.stride(), *grad_out.stride(), *gs_arg.stride(), scale,
            NEED_SRC=need_src, NEED_FIELDS=need_fields, DETERMINISTIC=scale != 0.0,
            BORDER=padding == "border", IDX64=needs_int64(src, grad_out, gs_arg, *fields), **meta,
        )
    grad_src = finish_grad_src(gs, scale, src, bound) if gs is not None else src.new_empty(0)
    return [grad_src, *grads]


@_merged_warp_backward_op.register_fake
def _(grad_out, src, disp_a, disp_b, logit_a, logit_b, padding, need_src, need_fields, deterministic):
    grad_src = empty_like_src(src, tuple(src.shape), src.dtype) if need_src else src.new_empty(0)
    grads = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in (disp_a, disp_b, logit_a, logit_b)]
    return [grad_src, *(grads if need_fields else [])]


def _setup_context(ctx, inputs, output):
    src, disp_a, disp_b, logit_a, logit_b, padding, deterministic = inputs
    ctx.save_for_backward(src, disp_a, disp_b, logit_a, logit_b)
    ctx.padding = padding
    ctx.deterministic = deterministic


def _backward_rule(ctx, grad_out):
    src, *fields = ctx.saved_tensors
    need_src = ctx.needs_input_grad[0]
    need_fields = any(ctx.needs_input_grad[1:5])
    grad_src, *grads = _merged_warp_backward_op(
        grad_out, src, *fields, ctx.padding, need_src, need_fields, ctx.deterministic
    )
    grads = grads if need_fields else [None] * 4
    return (grad_src if need_src else None, *grads, None, None)


_merged_warp_op.register_autograd(_backward_rule, setup_context=_setup_context)


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

    Args:
        src: [B, C, H_in, W_in].
        disp_a, disp_b: [B, 2, H, W] displacements in pixels (δx, δy).
        logit_a, logit_b: [B, 1, H, W] attention logits; the weight of δ_a is
            the per-pixel softmax of the two.
        padding, deterministic: as for :func:`tcae_kernels.warp`.

    Returns [B, C, H, W] in src's dtype, with gradients for all five inputs.
    The four fields share one dtype (src's, or float32 beside half/bfloat16).
    Without Triton (CPU without the interpreter) the unfused composition runs.
    """
    padding = check_warp_args(src, disp_a, padding, disp_name="disp_a")
    check_field("disp_b", disp_b, src, disp_a, 2)
    check_field("logit_a", logit_a, src, disp_a, 1)
    check_field("logit_b", logit_b, src, disp_a, 1)
    if not uses_triton(src):
        # In float64, as the kernels merge: a float32 merge rounds δ by ~1e-7 of its size.
        fields = (t.double() for t in (disp_a, disp_b, logit_a, logit_b))
        return warp_torch(src.double(), merge_displacements(*fields), padding).to(src.dtype)
    return _merged_warp_op(src, disp_a, disp_b, logit_a, logit_b, padding, resolve_deterministic(deterministic))
