"""The 3-D displacement warp of volumes: Triton kernels, launchers and custom op.

Convention: ``warp3d`` samples at x − δ: for each output voxel (x, y, z) the
source is sampled trilinearly at (x − δx, y − δy, z − δz), in **voxels**
(SPEC sections 1–4 with a third axis). ``flow_warp3d`` samples at x + flow, the
convention of VoxelMorph and MONAI: the same kernels with a compile-time sign
that negates the field in registers after loading it and its gradient before
storing it (no negated copy of the field is ever made).

A program owns BLOCK_X consecutive voxels of one row (b, z, y) (of ROWS rows
under the interpreter): the launch grid is the 2-D warp's, over B·D planes of
H rows, so each program divides once (plane → b, z), a scalar. Each voxel's
position, eight neighbours and weights are formed once, then a loop walks the
channels: the forward reads δ once; the backward computes ∂L/∂δ (a per-voxel
reduction over channels, no atomics) and, only when src needs it, ∂L/∂src (a
scatter-add, fixed point in deterministic mode), in one launch.

At an integer position the neighbours are still ⌊x̂⌋ and ⌊x̂⌋ + 1, so the
derivative there is the right-sided one, as in ``grid_sample``. With
``border`` padding, δ receives no gradient along an axis where the position is
on or beyond the border.
"""

from __future__ import annotations

import torch

from .. import fallback
from ..checks import check_position_range, check_warp3d_args
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
        _axis,
        channel_mask,
        channel_offsets,
        interpolate,
        load_neighbours,
        per_channel,
        position_grad,
        row_block,
        scatter_neighbours,
        sum_channels,
    )

    @triton.jit
    def _voxel_block(W, H, D, B, yb_base, b_base, IDX64: tl.constexpr, BLOCK_X: tl.constexpr, ROWS: tl.constexpr):
        """(b, z, y, x, mask) of this program.

        GPUs (ROWS = 1): the 2-D row block of plane b·D + z (grid z), a scalar
        division per program. The interpreter, which pays per program, takes
        ROWS rows of the flat range of B·D·H rows (grid y) instead, however
        small each plane: its divisions are per row.
        """
        if ROWS == 1:
            plane, y, x, mask = row_block(W, H, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        else:
            zero, row, x, mask = row_block(W, B * D * H, yb_base, b_base, IDX64, BLOCK_X, ROWS)  # one plane
            plane = row // H
            y = row - plane * H
        b = plane // D
        return b, plane - b * D, y, x, mask

    @triton.jit
    def _load_field(ptr, off, stride_c, mask, FLOW: tl.constexpr, F64: tl.constexpr):
        """δ = (δx, δy, δz) at each voxel in the arithmetic dtype; a flow f is read as δ = −f."""
        dx = tl.load(ptr + off, mask=mask, other=0.0)
        dy = tl.load(ptr + off + stride_c, mask=mask, other=0.0)
        dz = tl.load(ptr + off + 2 * stride_c, mask=mask, other=0.0)
        if F64:
            dx, dy, dz = dx.to(tl.float64), dy.to(tl.float64), dz.to(tl.float64)
        else:
            dx, dy, dz = dx.to(tl.float32), dy.to(tl.float32), dz.to(tl.float32)
        if FLOW:
            dx, dy, dz = -dx, -dy, -dz
        return dx, dy, dz

    @triton.jit
    def _position3d(z, y, x, dx, dy, dz, D_in, H_in, W_in, pmask, BORDER: tl.constexpr, IDX64: tl.constexpr):
        """Where each voxel samples (see sampling.position, one axis more).

        Returns (finite, x0, y0, z0, ax, ay, az, gate_x, gate_y, gate_z, m000, …, m111):
        (x0, y0, z0) the first neighbour, a* the weights of the far ones, mZYX
        whether neighbour (z0 + Z, y0 + Y, x0 + X) lies in src (z-major order).
        A non-finite δ samples at the voxel itself; callers overwrite its
        results with NaN.
        """
        xf = x.to(dx.dtype)
        yf = y.to(dy.dtype)
        zf = z.to(dz.dtype)
        finite = (tl.abs(dx) < float("inf")) & (tl.abs(dy) < float("inf")) & (tl.abs(dz) < float("inf"))
        x0f, ax, gate_x = _axis(xf, tl.where(finite, dx, xf), W_in, BORDER)
        y0f, ay, gate_y = _axis(yf, tl.where(finite, dy, yf), H_in, BORDER)
        z0f, az, gate_z = _axis(zf, tl.where(finite, dz, zf), D_in, BORDER)
        if IDX64:
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
            z0 = z0f.to(tl.int64)
            unsigned: tl.constexpr = tl.uint64
        else:
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            z0 = z0f.to(tl.int32)
            unsigned: tl.constexpr = tl.uint32
        # One unsigned compare tests both ends: a negative index wraps past any size.
        vx0 = x0.to(unsigned, bitcast=True) < W_in
        vx1 = (x0 + 1).to(unsigned, bitcast=True) < W_in
        vy0 = y0.to(unsigned, bitcast=True) < H_in
        vy1 = (y0 + 1).to(unsigned, bitcast=True) < H_in
        vz0 = (z0.to(unsigned, bitcast=True) < D_in) & pmask
        vz1 = ((z0 + 1).to(unsigned, bitcast=True) < D_in) & pmask
        m00, m01, m10, m11 = vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1
        return (
            finite, x0, y0, z0, ax, ay, az, gate_x, gate_y, gate_z,
            vz0 & m00, vz0 & m01, vz0 & m10, vz0 & m11, vz1 & m00, vz1 & m01, vz1 & m10, vz1 & m11,
        )

    @triton.jit
    def _warp3d_fwd_kernel(
        src_ptr, disp_ptr, out_ptr,
        B, C, D, H, W, D_in, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_d, ss_h, ss_w,
        sd_b, sd_c, sd_d, sd_h, sd_w,
        so_b, so_c, so_d, so_h, so_w,
        BORDER: tl.constexpr, FLOW: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, z, y, x, pmask = _voxel_block(W, H, D, B, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy, dz = _load_field(disp_ptr, b * sd_b + z * sd_d + y * sd_h + x * sd_w, sd_c, pmask, FLOW, F64)
        (finite, x0, y0, z0, ax, ay, az, gate_x, gate_y, gate_z,
         m000, m001, m010, m011, m100, m101, m110, m111) = _position3d(
            z, y, x, dx, dy, dz, D_in, H_in, W_in, pmask, BORDER, IDX64)
        src_pix = b * ss_b + z0 * ss_d + y0 * ss_h + x0 * ss_w
        out_pix = b * so_b + z * so_d + y * so_h + x * so_w
        if BLOCK_C == 1:
            # A NaN weight makes every channel of a non-finite δ's voxel NaN (NaN · 0 too).
            axc = tl.where(finite, ax, float("nan"))
        else:
            axc = ax[:, None]
            bad = (finite == 0)[:, None]
        ayc = per_channel(ay, BLOCK_C)
        azc = per_channel(az, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            s_off = channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C)
            cm = channel_mask(c0, C, pmask, BLOCK_C)
            o_off = channel_offsets(out_pix, c0, so_c, IDX64, BLOCK_C)
            a00, a01, a10, a11 = load_neighbours(
                src_ptr, s_off, ss_h, ss_w, m000, m001, m010, m011, cm, ax.dtype, BLOCK_C)
            b00, b01, b10, b11 = load_neighbours(
                src_ptr, s_off + ss_d, ss_h, ss_w, m100, m101, m110, m111, cm, ax.dtype, BLOCK_C)
            front = interpolate(a00, a01, a10, a11, axc, ayc)
            back = interpolate(b00, b01, b10, b11, axc, ayc)
            val = front + azc * (back - front)
            if BLOCK_C > 1:
                val = tl.where(bad, float("nan"), val)
            tl.store(out_ptr + o_off, val.to(out_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _warp3d_bwd_kernel(
        src_ptr, disp_ptr, gout_ptr, gsrc_ptr, gdisp_ptr, scale_ptr,
        B, C, D, H, W, D_in, H_in, W_in, yb_base, b_base,
        ss_b, ss_c, ss_d, ss_h, ss_w,
        sd_b, sd_c, sd_d, sd_h, sd_w,
        sg_b, sg_c, sg_d, sg_h, sg_w,
        sgs_b, sgs_c, sgs_d, sgs_h, sgs_w,
        sgd_b, sgd_c, sgd_d, sgd_h, sgd_w,
        NEED_SRC: tl.constexpr, NEED_DISP: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BORDER: tl.constexpr, FLOW: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):
        b, z, y, x, pmask = _voxel_block(W, H, D, B, yb_base, b_base, IDX64, BLOCK_X, ROWS)
        dx, dy, dz = _load_field(disp_ptr, b * sd_b + z * sd_d + y * sd_h + x * sd_w, sd_c, pmask, FLOW, F64)
        (finite, x0, y0, z0, ax, ay, az, gate_x, gate_y, gate_z,
         m000, m001, m010, m011, m100, m101, m110, m111) = _position3d(
            z, y, x, dx, dy, dz, D_in, H_in, W_in, pmask, BORDER, IDX64)
        src_pix = b * ss_b + z0 * ss_d + y0 * ss_h + x0 * ss_w
        gout_pix = b * sg_b + z * sg_d + y * sg_h + x * sg_w
        gsrc_pix = b * sgs_b + z0 * sgs_d + y0 * sgs_h + x0 * sgs_w
        axc = per_channel(ax, BLOCK_C)
        ayc = per_channel(ay, BLOCK_C)
        azc = per_channel(az, BLOCK_C)
        sum_x = tl.zeros_like(ax)
        sum_y = tl.zeros_like(ay)
        sum_z = tl.zeros_like(az)
        for c0 in range(0, C, BLOCK_C):
            g_off = channel_offsets(gout_pix, c0, sg_c, IDX64, BLOCK_C)
            cm = channel_mask(c0, C, pmask, BLOCK_C)
            g = tl.load(gout_ptr + g_off, mask=cm, other=0.0).to(ax.dtype)
            if NEED_DISP:
                s_off = channel_offsets(src_pix, c0, ss_c, IDX64, BLOCK_C)
                a00, a01, a10, a11 = load_neighbours(
                    src_ptr, s_off, ss_h, ss_w, m000, m001, m010, m011, cm, ax.dtype, BLOCK_C)
                b00, b01, b10, b11 = load_neighbours(
                    src_ptr, s_off + ss_d, ss_h, ss_w, m100, m101, m110, m111, cm, ax.dtype, BLOCK_C)
                # Σ_c g·∂out/∂x̂ is the planes' bilinear slopes, blended by the per-voxel az.
                fx, fy = position_grad(g, a00, a01, a10, a11, axc, ayc, BLOCK_C)
                bx, by = position_grad(g, b00, b01, b10, b11, axc, ayc, BLOCK_C)
                sum_x += fx + az * (bx - fx)
                sum_y += fy + az * (by - fy)
                front = interpolate(a00, a01, a10, a11, axc, ayc)
                back = interpolate(b00, b01, b10, b11, axc, ayc)
                sum_z += sum_channels(g * (back - front), BLOCK_C)
            if NEED_SRC:
                # A non-finite δ has no position, so it sends nothing to src.
                gs_off = channel_offsets(gsrc_pix, c0, sgs_c, IDX64, BLOCK_C)
                g_back = g * azc
                scatter_neighbours(
                    gsrc_ptr, gs_off, sgs_h, sgs_w, g - g_back, axc, ayc,
                    m000 & finite, m001 & finite, m010 & finite, m011 & finite, cm,
                    scale_ptr, b, c0, C, DETERMINISTIC, BLOCK_C,
                )
                scatter_neighbours(
                    gsrc_ptr, gs_off + sgs_d, sgs_h, sgs_w, g_back, axc, ayc,
                    m100 & finite, m101 & finite, m110 & finite, m111 & finite, cm,
                    scale_ptr, b, c0, C, DETERMINISTIC, BLOCK_C,
                )
        if NEED_DISP:
            # ∂x̂/∂δ = −1; a flow's gradient is the negative of δ's.
            if FLOW:
                sum_x, sum_y, sum_z = -sum_x, -sum_y, -sum_z
            gd = gdisp_ptr + b * sgd_b + z * sgd_d + y * sgd_h + x * sgd_w
            ty = gdisp_ptr.dtype.element_ty
            tl.store(gd, tl.where(finite, tl.where(gate_x, -sum_x, 0.0), float("nan")).to(ty), mask=pmask)
            tl.store(gd + sgd_c, tl.where(finite, tl.where(gate_y, -sum_y, 0.0), float("nan")).to(ty), mask=pmask)
            tl.store(gd + 2 * sgd_c, tl.where(finite, tl.where(gate_z, -sum_z, 0.0), float("nan")).to(ty),
                     mask=pmask)


def _launches(src: torch.Tensor, b: int, d: int, h: int, w: int) -> tuple[list, dict]:
    """row_launches over B·D planes of H rows; under the interpreter over one plane of all
    B·D·H rows (see _voxel_block)."""
    launches, meta = row_launches(src, b * d, h, w)
    if meta["ROWS"] > 1:
        return row_launches(src, 1, b * d * h, w)
    return launches, meta


def _forward(src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool, deterministic: bool) -> torch.Tensor:
    b, c, d_in, h_in, w_in = src.shape
    _, _, d, h, w = disp.shape
    out = empty_like_src(src, (b, c, d, h, w))
    if out.numel() == 0:
        return out
    launches, meta = _launches(src, b, d, h, w)
    for grid, yb_base, b_base in launches:
        _warp3d_fwd_kernel[grid](
            src, disp, out,
            b, c, d, h, w, d_in, h_in, w_in, yb_base, b_base,
            *src.stride(), *disp.stride(), *out.stride(),
            BORDER=padding == "border", FLOW=flow, F64=src.dtype == torch.float64,
            IDX64=needs_int64(src, disp, out), **meta,
        )
    return out


def _backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, d_in, h_in, w_in = src.shape
    _, _, d, h, w = disp.shape
    gs = GradSrc(src, grad_out_bound(grad_out) if deterministic else None) if need_src else None
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else None
    if b * d * h * w and (need_src or need_disp):
        launches, meta = _launches(src, b, d, h, w)
        # src and disp stand in for buffers this launch does not touch.
        gs_buf = gs.buf if gs is not None else src
        gd_buf = grad_disp if grad_disp is not None else disp
        for grid, yb_base, b_base in launches:
            _warp3d_bwd_kernel[grid](
                src, disp, grad_out, gs_buf, gd_buf, gs.scale if gs is not None else disp,
                b, c, d, h, w, d_in, h_in, w_in, yb_base, b_base,
                *src.stride(), *disp.stride(), *grad_out.stride(), *gs_buf.stride(), *gd_buf.stride(),
                NEED_SRC=need_src, NEED_DISP=need_disp, DETERMINISTIC=gs is not None and gs.deterministic,
                BORDER=padding == "border", FLOW=flow, F64=src.dtype == torch.float64,
                IDX64=needs_int64(src, disp, grad_out, gs_buf), **meta,
            )
    return or_empty(gs.finish() if gs is not None else None, src), or_empty(grad_disp, disp)


def _forward_fake(src, disp, padding, flow, deterministic):
    return empty_like_src(src, (src.shape[0], src.shape[1], *disp.shape[2:]))


def _backward_fake(grad_out, src, disp, padding, flow, need_src, need_disp, deterministic):
    grad_src = empty_like_src(src, tuple(src.shape)) if need_src else src.new_empty(0)
    grad_disp = torch.empty_like(disp, memory_format=torch.contiguous_format) if need_disp else disp.new_empty(0)
    return grad_src, grad_disp


def _cpu_forward(src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool, deterministic: bool
                 ) -> torch.Tensor:
    if compiled_cpu() is None:
        return fallback.warp3d_forward(src, disp, padding, flow, deterministic)
    from .. import cpu3d

    return cpu3d.warp3d_forward(src, disp, padding, flow)


def _cpu_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if compiled_cpu() is None:
        return fallback.warp3d_backward(grad_out, src, disp, padding, flow, need_src, need_disp, deterministic)
    from .. import cpu3d

    grad_src, grad_disp = cpu3d.warp3d_backward(grad_out, src, disp, padding, flow, need_src, need_disp)
    return or_empty(grad_src, src), or_empty(grad_disp, disp)


_warp3d_op = define_op("warp3d", _forward, _cpu_forward, fallback.warp3d_forward, _forward_fake)
_warp3d_backward_op = define_op(
    "warp3d_backward", _backward, _cpu_backward, fallback.warp3d_backward, _backward_fake)


def _backward_rule(ctx, grad_out):
    src, disp = ctx.saved_tensors
    flow = ctx.arguments[1]
    need_src, need_disp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_src, grad_disp = _warp3d_backward_op(
        grad_out, src, disp, ctx.padding, flow, need_src, need_disp, ctx.deterministic)
    return (grad_src if need_src else None, grad_disp if need_disp else None, None, None, None)


register_autograd(_warp3d_op, _backward_rule, 2, fallback.warp3d_forward)


def warp3d(
    src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None
) -> torch.Tensor:
    """Warp the volume ``src`` by the displacement field ``disp`` (trilinear, differentiable).

    out[b, c, z, y, x] = src sampled at (x − disp[b, 0], y − disp[b, 1], z − disp[b, 2])
    (at voxel (z, y, x)) — the x − δ convention; for a VoxelMorph/MONAI flow
    (x + flow) use :func:`flow_warp3d`.

    Args:
        src: [B, C, D_in, H_in, W_in] volume; float16, bfloat16, float32 or
            float64; any strides (NCDHW and channels_last_3d run natively).
        disp: [B, 3, D, H, W] displacement in **voxels**; channel 0 is δx (along
            W), 1 is δy (along H), 2 is δz (along D). Same dtype as src, or
            float32 beside a float16/bfloat16 src. The output takes disp's size.
        padding: ``"zeros"`` (neighbours outside src count as 0) or
            ``"border"`` (the position is clamped into src first).
        deterministic: accumulate the src gradient in fixed point, bitwise
            reproducible from run to run. None follows
            ``torch.use_deterministic_algorithms``.

    Returns:
        [B, C, D, H, W] in src's dtype (channels_last_3d if src is). Arithmetic
        in float32 (float64 for float64). A non-finite δ gives NaN at that
        voxel, in every channel and in its δ gradient.
    """
    padding = check_warp3d_args(src, disp, padding)
    check_position_range(src, disp)
    return call(_warp3d_op, src, disp, padding, False, resolve_deterministic(deterministic))


def flow_warp3d(
    src: torch.Tensor, flow: torch.Tensor, padding: str = "zeros", deterministic: bool | None = None
) -> torch.Tensor:
    """Warp the volume ``src`` by the flow ``flow``, sampling at x + flow (VoxelMorph, MONAI).

    out[b, c, z, y, x] = src sampled at (x + flow[b, 0], y + flow[b, 1], z + flow[b, 2]);
    equal to ``warp3d(src, -flow)`` without making −flow. Shapes, units
    (voxels; channels along W, H, D), dtypes and arguments as :func:`warp3d`.
    VoxelMorph's and MONAI's flows list their channels in the volume's axis
    order (D, H, W): reverse them with ``flow.flip(1)``.
    """
    padding = check_warp3d_args(src, flow, padding, "flow")
    check_position_range(src, flow, "flow")
    return call(_warp3d_op, src, flow, padding, True, resolve_deterministic(deterministic))
