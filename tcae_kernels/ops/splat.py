"""Forward warping (splatting) after Niklaus & Liu, *Softmax Splatting for Video Frame
Interpolation* (CVPR 2020): Triton kernels, launchers, custom op and autograd.

Convention: x + flow. Each source pixel p = (x, y) sends its value to the
position p + flow(p) (pixels), split bilinearly over the four pixels around it;
what lands outside the image is dropped. With z(p) the importance of p,

    num[c, q] = Σ_p Σ_n w_n(p, q) · z(p) · src[c, p]      den[q] = Σ_p Σ_n w_n(p, q) · z(p)

    "sum":     out = num, z = 1          "average": out = num / den, z = 1
    "linear":  out = num / den, z = metric
    "softmax": out = num / den, z = exp(metric − max_b metric)

The softmax weights subtract each sample's largest metric first: the ratio is
unchanged (mathematically identical to exp(metric)), but a metric of 100 no
longer overflows. Where den is 0 (nothing landed) the output is 0.

The forward scatters (float atomics, or the int64 fixed-point accumulation of
``launch.GradSrc``: bitwise reproducible); the backward is a gather at p + flow
with no atomics: ∂L/∂src[c, p] = z · Σ_n w_n ĝ[c, q_n] with ĝ = ∂L/∂num, and
the flow and metric gradients come from the same samples. A non-finite flow
sends nothing and receives zero gradients.
"""

from __future__ import annotations

import torch

from .. import fallback
from ..checks import check_disp_dtype, check_position_range, check_tensor
from ..fallback import softmax_shift
from .launch import (
    GradSrc,
    acc_dtype,
    call,
    compiled_cpu,
    define_op,
    empty_like_src,
    memory_format_of,
    needs_int64,
    or_empty,
    register_autograd,
    resolve_deterministic,
    row_launches,
    triton,
)

MODES = ("sum", "average", "linear", "softmax")
# The kernels' METRIC constexpr: no metric, z = metric, z = exp(metric − shift).
_METRIC = {"sum": 0, "average": 0, "linear": 1, "softmax": 2}

if triton is not None:
    import triton.language as tl

    from .sampling import (
        bilinear_weights,
        channel_mask,
        channel_offsets,
        interpolate,
        load_neighbours,
        load_pair,
        per_channel,
        position,
        position_grad,
        row_block,
        scatter_weighted,
        sum_channels,
    )

    @triton.jit
    def _importance(metric_ptr, shift_ptr, b, off, pmask, finite, dtype: tl.constexpr, METRIC: tl.constexpr):
        """z of each pixel (0 where its flow is not finite: it sends nothing)."""
        if METRIC == 0:
            z = tl.full(finite.shape, 1.0, dtype)
        else:
            z = tl.load(metric_ptr + off, mask=pmask, other=0.0).to(dtype)
            if METRIC == 2:
                z = tl.exp(z - tl.load(shift_ptr + b).to(dtype))
        return tl.where(finite, z, 0.0)

    @triton.jit
    def _splat_fwd_kernel(
        src_ptr, flow_ptr, metric_ptr, shift_ptr, num_ptr, den_ptr, num_scale_ptr, den_scale_ptr,
        C, H, W, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sf_b, sf_c, sf_h, sf_w,
        sm_b, sm_h, sm_w,
        sn_b, sn_c, sn_h, sn_w,
        sd_b, sd_h, sd_w,
        METRIC: tl.constexpr, NORMALIZE: tl.constexpr, DETERMINISTIC: tl.constexpr,
        F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        fx, fy = load_pair(flow_ptr, b * sf_b + y * sf_h + x * sf_w, sf_c, pmask, F64)
        # x + f is x − (−f) exactly.
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, -fx, -fy, H, W, pmask, False, IDX64)
        z = _importance(metric_ptr, shift_ptr, b, b * sm_b + y * sm_h + x * sm_w, pmask, finite, ax.dtype, METRIC)
        s00 = m00 & finite
        s01 = m01 & finite
        s10 = m10 & finite
        s11 = m11 & finite
        # z folded into the weights: num and den then round each contribution alike.
        w00, w01, w10, w11 = bilinear_weights(ax, ay)
        w00 = w00 * z
        w01 = w01 * z
        w10 = w10 * z
        w11 = w11 * z
        c00 = per_channel(w00, BLOCK_C)
        c01 = per_channel(w01, BLOCK_C)
        c10 = per_channel(w10, BLOCK_C)
        c11 = per_channel(w11, BLOCK_C)
        src_pix = b * ss_b + y * ss_h + x * ss_w
        num_pix = b * sn_b + y0 * sn_h + x0 * sn_w
        for c0 in range(0, C, BLOCK_C):
            cm = channel_mask(c0, C, pmask, BLOCK_C)
            v = tl.load(src_ptr + channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C), mask=cm, other=0.0)
            scatter_weighted(
                num_ptr, channel_offsets(num_pix, c0, sn_c, IDX64, BLOCK_C), sn_h, sn_w, v.to(ax.dtype),
                c00, c01, c10, c11, s00, s01, s10, s11, cm, num_scale_ptr, b, c0, C, DETERMINISTIC, BLOCK_C,
            )
        if NORMALIZE:
            scatter_weighted(
                den_ptr, b * sd_b + y0 * sd_h + x0 * sd_w, sd_h, sd_w, 1.0, w00, w01, w10, w11,
                s00, s01, s10, s11, pmask, den_scale_ptr, b, 0, 1, DETERMINISTIC, 1,
            )

    @triton.jit
    def _splat_bwd_kernel(
        src_ptr, flow_ptr, metric_ptr, shift_ptr, gn_ptr, gd_ptr, gsrc_ptr, gflow_ptr, gmetric_ptr,
        C, H, W, yb_base, b_base,
        ss_b, ss_c, ss_h, ss_w,
        sf_b, sf_c, sf_h, sf_w,
        sm_b, sm_h, sm_w,
        sn_b, sn_c, sn_h, sn_w,
        sd_b, sd_h, sd_w,
        sgs_b, sgs_c, sgs_h, sgs_w,
        NEED_SRC: tl.constexpr, NEED_FLOW: tl.constexpr, NEED_METRIC: tl.constexpr,
        METRIC: tl.constexpr, NORMALIZE: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, y, x, pmask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        fx, fy = load_pair(flow_ptr, b * sf_b + y * sf_h + x * sf_w, sf_c, pmask, F64)
        finite, x0, y0, ax, ay, _, _, m00, m01, m10, m11 = position(y, x, -fx, -fy, H, W, pmask, False, IDX64)
        m_off = b * sm_b + y * sm_h + x * sm_w
        z = _importance(metric_ptr, shift_ptr, b, m_off, pmask, finite, ax.dtype, METRIC)
        zc = per_channel(z, BLOCK_C)
        axc = per_channel(ax, BLOCK_C)
        ayc = per_channel(ay, BLOCK_C)
        # Σ_c src·ĝ sampled (∂L/∂z) and the position sums (∂L/∂(p + f) / z).
        acc_z = tl.zeros_like(ax)
        sum_x = tl.zeros_like(ax)
        sum_y = tl.zeros_like(ay)
        src_pix = b * ss_b + y * ss_h + x * ss_w
        gn_pix = b * sn_b + y0 * sn_h + x0 * sn_w
        gs_pix = b * sgs_b + y * sgs_h + x * sgs_w
        for c0 in range(0, C, BLOCK_C):
            cm = channel_mask(c0, C, pmask, BLOCK_C)
            v00, v01, v10, v11 = load_neighbours(
                gn_ptr, channel_offsets(gn_pix, c0, sn_c, IDX64, BLOCK_C), sn_h, sn_w, m00, m01, m10, m11, cm,
                ax.dtype, BLOCK_C,
            )
            sampled = interpolate(v00, v01, v10, v11, axc, ayc)
            if NEED_SRC:
                gs = gsrc_ptr + channel_offsets(gs_pix, c0, sgs_c, IDX64, BLOCK_C)
                tl.store(gs, (zc * sampled).to(gsrc_ptr.dtype.element_ty), mask=cm)
            if NEED_FLOW or NEED_METRIC:
                s = tl.load(src_ptr + channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C), mask=cm, other=0.0)
                s = s.to(ax.dtype)
                if NEED_METRIC:
                    acc_z += sum_channels(s * sampled, BLOCK_C)
                if NEED_FLOW:
                    px, py = position_grad(s, v00, v01, v10, v11, axc, ayc, BLOCK_C)
                    sum_x += px
                    sum_y += py
        if NORMALIZE and (NEED_FLOW or NEED_METRIC):
            d00, d01, d10, d11 = load_neighbours(
                gd_ptr, b * sd_b + y0 * sd_h + x0 * sd_w, sd_h, sd_w, m00, m01, m10, m11, pmask, ax.dtype, 1
            )
            if NEED_METRIC:
                acc_z += interpolate(d00, d01, d10, d11, ax, ay)
            if NEED_FLOW:
                px, py = position_grad(1.0, d00, d01, d10, d11, ax, ay, 1)
                sum_x += px
                sum_y += py
        if NEED_FLOW:
            # ∂(x + f)/∂f = +1.
            gf = gflow_ptr + b * 2 * H * W + y * W + x
            tl.store(gf, tl.where(finite, z * sum_x, 0.0).to(gflow_ptr.dtype.element_ty), mask=pmask)
            tl.store(gf + H * W, tl.where(finite, z * sum_y, 0.0).to(gflow_ptr.dtype.element_ty), mask=pmask)
        if NEED_METRIC:
            # ∂z/∂metric: 1 (linear) or z (softmax).
            if METRIC == 2:
                acc_z = acc_z * z
            gm = tl.where(finite, acc_z, 0.0)
            tl.store(gmetric_ptr + b * H * W + y * W + x, gm.to(gmetric_ptr.dtype.element_ty), mask=pmask)


def _bounds(src: torch.Tensor, metric: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What one element of num's plane (b, c), [B, C], and of den's, [B, 1], can receive at most:
    the sums of |z·src| and |z| over the sample (a pixel's four weights sum to 1)."""
    acc = acc_dtype(src)
    if _METRIC[mode] == 0:
        z = torch.ones_like(src[:, :1], dtype=acc)
    elif _METRIC[mode] == 1:
        z = metric.to(acc)
    else:
        z = torch.exp(metric.to(acc) - softmax_shift(metric).to(acc).view(-1, 1, 1, 1))
    z = z.abs()
    return torch.linalg.vector_norm(src.to(acc) * z, ord=1, dim=(2, 3)), z.sum(dim=(2, 3))


def _forward(
    src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, mode: str, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = src.shape
    acc = acc_dtype(src)
    normalize = mode != "sum"
    bound_num, bound_den = _bounds(src, metric, mode) if deterministic else (None, None)
    num = GradSrc(empty_like_src(src, (b, c, h, w), acc), bound_num)
    den = GradSrc(src.new_empty((b, 1, h, w), dtype=acc), bound_den) if normalize else None
    metric_buf = metric if metric.numel() else flow
    shift = softmax_shift(metric) if mode == "softmax" else flow
    if b * h * w:
        den_buf = den.buf if den is not None else num.buf
        launches, meta = row_launches(src, b, h, w)
        for grid, yb_base, b_base in launches:
            _splat_fwd_kernel[grid](
                src, flow, metric_buf, shift, num.buf, den_buf, num.scale, den.scale if den is not None else num.scale,
                c, h, w, yb_base, b_base,
                *src.stride(), *flow.stride(), metric_buf.stride(0), metric_buf.stride(2), metric_buf.stride(3),
                *num.buf.stride(), den_buf.stride(0), den_buf.stride(2), den_buf.stride(3),
                METRIC=_METRIC[mode], NORMALIZE=normalize, DETERMINISTIC=num.deterministic,
                F64=src.dtype == torch.float64, IDX64=needs_int64(src, flow, num.buf), **meta,
            )
    total = num.finish()
    fmt = memory_format_of(src)
    if not normalize:
        return total.to(src.dtype).contiguous(memory_format=fmt), src.new_empty(0, dtype=acc)
    d = den.finish()
    out = torch.where(d != 0, total / d, 0.0)
    return out.to(src.dtype).contiguous(memory_format=fmt), d


def _backward(
    grad_out: torch.Tensor, src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, out: torch.Tensor,
    den: torch.Tensor, mode: str, need_src: bool, need_flow: bool, need_metric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, h, w = src.shape
    grad_num, grad_den = fallback.splat_output_grads(grad_out, out, den, mode)
    grad_src = empty_like_src(src, (b, c, h, w)) if need_src else None
    grad_flow = torch.empty_like(flow, memory_format=torch.contiguous_format) if need_flow else None
    grad_metric = torch.empty_like(metric, memory_format=torch.contiguous_format) if need_metric else None
    metric_buf = metric if metric.numel() else flow
    shift = softmax_shift(metric) if mode == "softmax" else flow
    if b * h * w and (need_src or need_flow or need_metric):
        gd = grad_den if grad_den is not None else grad_num
        gs = grad_src if grad_src is not None else src
        launches, meta = row_launches(src, b, h, w)
        for grid, yb_base, b_base in launches:
            _splat_bwd_kernel[grid](
                src, flow, metric_buf, shift, grad_num, gd, gs,
                grad_flow if grad_flow is not None else flow, grad_metric if grad_metric is not None else metric_buf,
                c, h, w, yb_base, b_base,
                *src.stride(), *flow.stride(), metric_buf.stride(0), metric_buf.stride(2), metric_buf.stride(3),
                *grad_num.stride(), gd.stride(0), gd.stride(2), gd.stride(3), *gs.stride(),
                NEED_SRC=need_src, NEED_FLOW=need_flow, NEED_METRIC=need_metric,
                METRIC=_METRIC[mode], NORMALIZE=mode != "sum", F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, flow, grad_num, gs), **meta,
            )
    return or_empty(grad_src, src), or_empty(grad_flow, flow), or_empty(grad_metric, metric)


def _forward_fake(src, flow, metric, mode, deterministic):
    b, c, h, w = src.shape
    den = src.new_empty((b, 1, h, w) if mode != "sum" else (0,), dtype=acc_dtype(src))
    return empty_like_src(src, (b, c, h, w)), den


def _backward_fake(grad_out, src, flow, metric, out, den, mode, need_src, need_flow, need_metric):
    return (
        empty_like_src(src, tuple(src.shape)) if need_src else src.new_empty(0),
        torch.empty_like(flow, memory_format=torch.contiguous_format) if need_flow else flow.new_empty(0),
        torch.empty_like(metric, memory_format=torch.contiguous_format) if need_metric else metric.new_empty(0),
    )


def _cpu_forward(src, flow, metric, mode: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.splat_forward(src, flow, metric, mode, deterministic)
    return compiled.splat_forward(src, flow, metric, mode)


def _cpu_backward(grad_out, src, flow, metric, out, den, mode: str, need_src: bool, need_flow: bool,
                  need_metric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    compiled = compiled_cpu()
    if compiled is None:
        return fallback.splat_backward(grad_out, src, flow, metric, out, den, mode, need_src, need_flow, need_metric)
    grads = compiled.splat_backward(grad_out, src, flow, metric, out, den, mode, need_src, need_flow, need_metric)
    return tuple(or_empty(g, like) for g, like in zip(grads, (src, flow, metric)))


_splat_op = define_op("splat", _forward, _cpu_forward, fallback.splat_forward, _forward_fake)
_splat_backward_op = define_op("splat_backward", _backward, _cpu_backward, fallback.splat_backward, _backward_fake)


def _setup_context(ctx, inputs, output):
    src, flow, metric, mode, _ = inputs
    out, den = output
    ctx.save_for_backward(src, flow, metric, out, den)
    ctx.mode = mode
    ctx.arguments = tuple(inputs[3:])


def _backward_rule(ctx, grad_out, grad_den):
    src, flow, metric, out, den = ctx.saved_tensors
    need_src, need_flow, need_metric = ctx.needs_input_grad[:3]
    grad_src, grad_flow, grad_metric = _splat_backward_op(
        grad_out, src, flow, metric, out, den, ctx.mode, need_src, need_flow, need_metric and metric.numel() > 0
    )
    return (
        grad_src if need_src else None,
        grad_flow if need_flow else None,
        grad_metric if need_metric and metric.numel() else None,
        None,
        None,
    )


register_autograd(_splat_op, _backward_rule, 3, fallback.splat_forward, _setup_context)


def check_splat_args(src: object, flow: object, mode: object, metric: object) -> torch.Tensor:
    """Validate splat's arguments (SPEC section 4's rules); returns the metric to pass (empty for none)."""
    check_tensor("src", src)
    check_tensor("flow", flow)
    assert isinstance(src, torch.Tensor) and isinstance(flow, torch.Tensor)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    b, _, h, w = src.shape
    if tuple(flow.shape) != (b, 2, h, w):
        raise ValueError(f"flow must have shape {(b, 2, h, w)} (src's batch and size, 2 channels), "
                         f"got {tuple(flow.shape)}")
    if flow.device != src.device:
        raise ValueError(f"flow must be on {src.device} (src's device), got {flow.device}")
    check_disp_dtype(src, flow, "flow")
    if _METRIC[mode] == 0:
        if metric is not None:
            raise ValueError(f"metric must be None for mode {mode!r} (it weights only 'linear' and 'softmax')")
        return src.new_empty(0)
    if metric is None:
        raise ValueError(f"metric is required for mode {mode!r}: a [B, 1, H, W] tensor")
    check_tensor("metric", metric)
    assert isinstance(metric, torch.Tensor)
    if tuple(metric.shape) != (b, 1, h, w):
        raise ValueError(f"metric must have shape {(b, 1, h, w)}, got {tuple(metric.shape)}")
    if metric.device != src.device:
        raise ValueError(f"metric must be on {src.device} (src's device), got {metric.device}")
    if metric.dtype not in (src.dtype, flow.dtype):
        raise TypeError(f"metric dtype must be {src.dtype} (src's) or {flow.dtype} (flow's), got {metric.dtype}")
    return metric


def splat(
    src: torch.Tensor, flow: torch.Tensor, mode: str = "sum", metric: torch.Tensor | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Forward-warp ``src`` along ``flow`` (splatting; Niklaus & Liu, CVPR 2020), differentiable.

    Each source pixel p adds its value bilinearly at p + flow(p) — the x + flow
    convention of the flow that maps src's frame to the target's; what lands
    outside the image is dropped.

    Args:
        src: [B, C, H, W]; float16, bfloat16, float32 or float64; any strides.
        flow: [B, 2, H, W] in **pixels** (channel 0 along W, 1 along H), src's
            dtype or float32 beside a float16/bfloat16 src.
        mode: ``"sum"`` (Σ of what lands), ``"average"`` (divided by the weights
            that land), ``"linear"`` (weighted by ``metric``, divided by the
            weighted sum) or ``"softmax"`` (weighted by exp(metric)). Softmax
            subtracts each sample's largest metric before exp: mathematically
            identical, and large metrics cannot overflow (a weight more than
            ~87 below the maximum in float32 underflows to 0).
        metric: [B, 1, H, W] importance of each source pixel, for ``"linear"``
            and ``"softmax"`` only; src's or flow's dtype.
        deterministic: accumulate in int64 fixed point, bitwise reproducible
            (else float atomics). None follows ``torch.use_deterministic_algorithms``.

    Returns:
        [B, C, H, W] in src's dtype. Where no weight landed (the normalized
        modes' denominator is 0), the output is 0. A non-finite flow sends
        nothing (and gets zero gradients). Gradients flow to src, flow and metric.
    """
    metric_t = check_splat_args(src, flow, mode, metric)
    check_position_range(src, flow, "flow")
    return call(_splat_op, src, flow, metric_t, mode, resolve_deterministic(deterministic))[0]
