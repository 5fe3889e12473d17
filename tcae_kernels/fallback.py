"""The PyTorch fallback of every op: the kernels' math, vectorized over tensors.

It is each custom op's default kernel: what runs on devices without a
registered kernel, and on CPU without numba or the interpreter. It
follows the kernels step by step (same position arithmetic, same masks), so
its results match theirs to rounding; its src-gradient scatter is
deterministic. Every function takes and returns what its op does (an empty
tensor for a gradient not asked for). ``warp_torch`` is the warp through it on
any device.

The forwards are also each op's differentiable composite (see
``launch.register_autograd``): autograd, forward mode and torch.func follow
them op by op and get the ops' gradient conventions (right-sided derivative
at integer positions, border gates, NaN slopes at a non-finite δ) to every
order, because every dependence on δ goes through ``_axis``'s gated slope
and ``_nan_where_not_finite``. So they use no in-place arithmetic (torch.vmap
cannot batch it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .checks import check_position_range, check_warp_args
from .ops.launch import acc_dtype, memory_format_of, needs_composite, or_empty


def _axis(coord: torch.Tensor, d: torch.Tensor, size: int, border: bool):
    """One axis of the sample position coord − d (pixels).

    Returns the left neighbour i0 (the right one is i0 + 1), the weight a of
    the right one, and where δ along this axis receives gradient. The weight is
    (coord − i0) − d rather than (coord − d) − i0: both subtractions are exact
    for δ of a few pixels, so positions far from the origin keep full precision
    (up to 2**24 pixels in float32, where coord itself stops being exact).
    a carries d's autograd with slope −1 where gate holds and 0 elsewhere,
    exactly the kernels' convention; its value is computed from d's value alone.
    """
    slope, d = d, d.detach()
    t = coord - d
    lo, hi = (0.0, size - 1.0) if border else (-2.0, size + 1.0)
    # Bounds are tested on d, exactly: t itself may have rounded onto one.
    inside = (d >= coord - hi) & (d <= coord - lo)
    tc = t.clamp(lo, hi)
    i0 = torch.floor(tc)
    a = torch.where(inside, (coord - i0) - d, tc - i0)
    # t was rounded: it may sit on the integer just above its true floor.
    below = a < 0
    i0 = torch.where(below, i0 - 1, i0)
    a = torch.where(below, a + 1, a)
    gate = (d < coord) & (d > coord - hi) if border else torch.ones_like(inside)
    # d − slope is 0 (d is finite here), so a keeps its value exactly.
    a = a + torch.where(gate, d - slope, 0.0)
    return i0.long(), a, gate


class Neighbours(NamedTuple):
    """Where each output pixel samples, per neighbour in the order 00, 01, 10, 11 (y, x).

    index: flat src index [B, P] (P = H·W), clamped into src; weight: bilinear
    weight [B, P], 0 for a neighbour outside src (so the clamped index reads
    something harmless). d_x, d_y: ∂weight/∂x̂ and ∂weight/∂ŷ, 0 outside.
    gate_x, gate_y: where δ receives gradient; finite: where δ is finite.
    """

    index: list[torch.Tensor]
    weight: list[torch.Tensor]
    d_x: list[torch.Tensor]
    d_y: list[torch.Tensor]
    gate_x: torch.Tensor
    gate_y: torch.Tensor
    finite: torch.Tensor


def _pair(i0: torch.Tensor, a: torch.Tensor, size: int):
    """Along one axis: the two neighbours' clamped indices, in-bounds masks (as 0/1) and weights."""
    last = max(size - 1, 0)
    inb = (((i0 >= 0) & (i0 < size)).to(a.dtype), ((i0 >= -1) & (i0 < size - 1)).to(a.dtype))
    return (i0.clamp(0, last), (i0 + 1).clamp(0, last)), inb, ((1 - a) * inb[0], a * inb[1])


def neighbours(disp: torch.Tensor, h_in: int, w_in: int, padding: str, acc: torch.dtype) -> Neighbours:
    """Positions in float64 for a float64 δ (merged_warp's merged field), else in ``acc``;
    weights in ``acc``."""
    b, _, h, w = disp.shape
    pos = torch.float64 if disp.dtype == torch.float64 else acc
    d = disp.to(pos).reshape(b, 2, h * w)
    xs = torch.arange(w, device=disp.device, dtype=pos).repeat(h).expand(b, h * w)
    ys = torch.arange(h, device=disp.device, dtype=pos).repeat_interleave(w).expand(b, h * w)
    finite = torch.isfinite(d).all(dim=1)
    # A non-finite δ samples at its own pixel; its results are overwritten with NaN.
    dx = torch.where(finite, d[:, 0], xs)
    dy = torch.where(finite, d[:, 1], ys)
    border = padding == "border"
    x0, ax, gate_x = _axis(xs, dx, w_in, border)
    y0, ay, gate_y = _axis(ys, dy, h_in, border)
    xi, vx, wx = _pair(x0, ax, w_in)
    yi, vy, wy = _pair(y0, ay, h_in)
    sign = (-1.0, 1.0)
    index, weight, d_x, d_y = [], [], [], []
    for j in range(2):
        row = yi[j] * w_in
        for i in range(2):
            index.append(row + xi[i])
            weight.append((wy[j] * wx[i]).to(acc))
            d_x.append((wy[j] * vx[i] * sign[i]).to(acc))
            d_y.append((vy[j] * wx[i] * sign[j]).to(acc))
    return Neighbours(index, weight, d_x, d_y, gate_x, gate_y, finite)


def _gather(flat: torch.Tensor, index: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """flat src [B, C, H_in·W_in] at index [B, P] → [B, C, P] in acc.

    Only the gathered values are converted: src itself may be far larger than the output.
    """
    b, c, _ = flat.shape
    return flat.gather(2, index.unsqueeze(1).expand(b, c, index.shape[1])).to(acc)


def _nan_where_not_finite(x: torch.Tensor, finite: torch.Tensor, *fields: torch.Tensor) -> torch.Tensor:
    """x [B, C, P] with NaN at the pixels where finite [B, P] is False.

    There its slope w.r.t. every element of each field ([B, k, P]: δ; for
    warp_l1 the target too) is NaN as well (SPEC: NaN in its gradients); the
    values x came from (src) get none of it: such a pixel sends nothing to src.
    Each ``where`` keeps the other side's NaN out of every gradient and tangent
    of a finite pixel.
    """
    keep = finite.unsqueeze(1)
    nan = torch.where(keep, 1.0, float("nan")).to(x.dtype)
    poison = sum(torch.where(keep, 0.0, f.to(x.dtype)).sum(dim=1, keepdim=True) for f in fields) * nan
    return torch.where(keep, x, poison)


def _warp(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """The warp in the arithmetic dtype, [B, C, H, W] contiguous."""
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    if h_in * w_in == 0:
        out = torch.zeros(b, c, h * w, dtype=acc, device=src.device)
        finite = torch.isfinite(disp).all(dim=1).reshape(b, h * w)
    else:
        nb = neighbours(disp, h_in, w_in, padding, acc)
        flat = src.reshape(b, c, h_in * w_in)
        out = sum(_gather(flat, index, acc) * weight.unsqueeze(1) for index, weight in zip(nb.index, nb.weight))
        finite = nb.finite
    return _nan_where_not_finite(out, finite, disp.reshape(b, 2, h * w)).view(b, c, h, w)


def _warp_grads(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, need_src: bool, need_disp: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∂L/∂src (src's dtype) and ∂L/∂δ (in the position dtype), None where not needed."""
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    grad_src = grad_disp = None
    if h_in * w_in == 0:
        if need_src:
            grad_src = torch.zeros_like(src)
        if need_disp:
            finite = torch.isfinite(disp).all(dim=1, keepdim=True)
            grad_disp = torch.zeros_like(disp).masked_fill(~finite, float("nan"))
        return grad_src, grad_disp
    nb = neighbours(disp, h_in, w_in, padding, acc)
    n = h * w
    g = grad_out.reshape(b, c, n).to(acc)
    if need_src:
        # Non-finite pixels have no position, so they send nothing to src.
        g_src = g * nb.finite.unsqueeze(1)
        flat = torch.zeros(b, c, h_in * w_in, dtype=acc, device=src.device)
        for index, weight in zip(nb.index, nb.weight):
            flat.scatter_add_(2, index.unsqueeze(1).expand(b, c, n), g_src * weight.unsqueeze(1))
        grad_src = flat.view(b, c, h_in, w_in).to(src.dtype).contiguous(memory_format=memory_format_of(src))
    if need_disp:
        s = src.reshape(b, c, h_in * w_in)
        gx = torch.zeros(b, n, dtype=acc, device=src.device)
        gy = torch.zeros_like(gx)
        for index, d_x, d_y in zip(nb.index, nb.d_x, nb.d_y):
            gv = (g * _gather(s, index, acc)).sum(dim=1)  # Σ_c g·S at this neighbour
            gx += gv * d_x
            gy += gv * d_y
        # ∂x̂/∂δx = −1.
        gd = -torch.stack((gx * nb.gate_x, gy * nb.gate_y), dim=1)
        grad_disp = gd.masked_fill(~nb.finite.unsqueeze(1), float("nan")).view(b, 2, h, w)
    return grad_src, grad_disp


def warp_forward(src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool) -> torch.Tensor:
    return _warp(src, disp, padding).to(src.dtype).contiguous(memory_format=memory_format_of(src))


def warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_src, grad_disp = _warp_grads(grad_out, src, disp, padding, need_src, need_disp)
    return or_empty(grad_src, src), or_empty(grad_disp.to(disp.dtype) if need_disp else None, disp)


def inside_mass(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """The validity mask of T(src, δ) (x − δ): the bilinear weight on neighbours inside src,
    [B, 1, H, W] in src's dtype, NaN at a non-finite δ."""
    b, _, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    if h_in * w_in == 0:
        mass = torch.zeros(b, h * w, dtype=acc, device=src.device)
        finite = torch.isfinite(disp).all(dim=1).reshape(b, h * w)
    else:
        nb = neighbours(disp, h_in, w_in, padding, acc)
        mass = (nb.weight[0] + nb.weight[1]) + (nb.weight[2] + nb.weight[3])
        finite = nb.finite
    return _nan_where_not_finite(mass.unsqueeze(1), finite, disp.reshape(b, 2, h * w)).view(b, 1, h, w).to(src.dtype)


def inside_mass_grad(grad_mask: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """∂L/∂δ through the mask alone (x − δ), [B, 2, H, W] in the arithmetic dtype: the mask
    depends on the position only."""
    b, _, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    if h_in * w_in == 0:
        grad = torch.zeros(b, 2, h, w, dtype=acc, device=src.device)
        return grad.masked_fill(~torch.isfinite(disp).all(dim=1, keepdim=True), float("nan"))
    nb = neighbours(disp, h_in, w_in, padding, acc)
    gm = grad_mask.reshape(b, h * w).to(acc)
    # ∂x̂/∂δx = −1.
    gx = -gm * ((nb.d_x[0] + nb.d_x[1]) + (nb.d_x[2] + nb.d_x[3])) * nb.gate_x
    gy = -gm * ((nb.d_y[0] + nb.d_y[1]) + (nb.d_y[2] + nb.d_y[3])) * nb.gate_y
    grad = torch.stack((gx, gy), dim=1)
    return grad.masked_fill(~nb.finite.unsqueeze(1), float("nan")).view(b, 2, h, w)


def warp_variant_forward(
    src: torch.Tensor, disp: torch.Tensor, padding: str, deterministic: bool, flow: bool, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, mask): T(src, δ) for disp = δ (x − δ), or sampled at x + disp when ``flow``; mask
    [B, 1, H, W] when ``with_mask``, else empty."""
    field = -disp if flow else disp  # exact: x + f = x − (−f)
    out = warp_forward(src, field, padding, deterministic)
    return out, inside_mass(src, field, padding) if with_mask else src.new_empty(0)


def warp_variant_backward(
    grad_out: torch.Tensor, grad_mask: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, deterministic: bool, flow: bool, with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂src, ∂L/∂disp) of :func:`warp_variant_forward`; grad_mask is empty without the mask."""
    field = -disp if flow else disp
    grad_src, grad_disp = _warp_grads(grad_out, src, field, padding, need_src, need_disp)
    if need_disp:
        if with_mask:
            grad_disp = grad_disp + inside_mass_grad(grad_mask, src, field, padding)
        grad_disp = (-grad_disp if flow else grad_disp).to(disp.dtype)
    return or_empty(grad_src, src), or_empty(grad_disp, disp)


def _merge(disp_a, disp_b, logit_a, logit_b):
    """The merged δ in float64 (as the kernels merge) and the weight of δ_a."""
    w_a = torch.sigmoid(logit_a.double() - logit_b.double())
    return w_a * disp_a.double() + (1 - w_a) * disp_b.double(), w_a


def merged_warp_forward(
    src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor, logit_a: torch.Tensor, logit_b: torch.Tensor,
    padding: str, deterministic: bool,
) -> torch.Tensor:
    disp, _ = _merge(disp_a, disp_b, logit_a, logit_b)
    return warp_forward(src, disp, padding, deterministic)


def merged_warp_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp_a: torch.Tensor, disp_b: torch.Tensor,
    logit_a: torch.Tensor, logit_b: torch.Tensor, padding: str,
    need_src: bool, need_fields: bool, deterministic: bool,
) -> list[torch.Tensor]:
    disp, w_a = _merge(disp_a, disp_b, logit_a, logit_b)
    grad_src, gd = _warp_grads(grad_out, src, disp, padding, need_src, need_fields)
    grads = []
    if need_fields:
        # δ = w_a·δ_a + w_b·δ_b with ∂w_a/∂l_a = w_a·w_b = −∂w_a/∂l_b.
        w_b = 1 - w_a
        gl = w_a * w_b * (gd * (disp_a.double() - disp_b.double())).sum(dim=1, keepdim=True)
        dtype = disp_a.dtype
        grads = [(w_a * gd).to(dtype), (w_b * gd).to(dtype), gl.to(dtype), (-gl).to(dtype)]
    return [or_empty(grad_src, src), *grads]


def warp_l1_forward(
    src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str, deterministic: bool
) -> torch.Tensor:
    # Warped in the arithmetic dtype, as the kernel does: a bfloat16 image
    # rounded before the difference would flip the sign of small residuals.
    b, c, h, w = target.shape
    diff = (_warp(src, disp, padding) - target.to(acc_dtype(src))).reshape(b, c, h * w)
    # |NaN − t| has no slope in t either (abs's own derivative at NaN is 0).
    finite = torch.isfinite(disp).all(dim=1).reshape(b, h * w)
    diff = _nan_where_not_finite(diff, finite, disp.reshape(b, 2, h * w), target.reshape(b, c, h * w))
    return diff.abs().flatten(1).mean(dim=1)


def warp_l1_backward(
    grad_loss: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, target: torch.Tensor, padding: str,
    need_src: bool, need_disp: bool, need_target: bool, deterministic: bool,
) -> list[torch.Tensor]:
    b, c, h, w = target.shape
    acc = acc_dtype(src)
    out = _warp(src, disp, padding)
    diff = out - target.to(acc)
    # ∂loss[b]/∂out = sign(out − target) / (C·H·W); 0 where out is NaN (a non-finite δ,
    # which sends nothing to src), as in the kernel.
    g = torch.sign(torch.nan_to_num(diff, nan=0.0)) * (grad_loss.to(acc) / max(c * h * w, 1)).view(b, 1, 1, 1)
    grad_src, grad_disp = _warp_grads(g, src, disp, padding, need_src, need_disp)
    grad_target = None
    if need_target:
        # |NaN − t| has no slope: NaN, as autograd gives for abs at NaN.
        finite = torch.isfinite(disp).all(dim=1, keepdim=True)
        grad_target = torch.where(finite, -g, float("nan")).to(target.dtype)
    return [
        or_empty(grad_src, src),
        or_empty(grad_disp.to(disp.dtype) if need_disp else None, disp),
        or_empty(grad_target, target),
    ]


class Neighbours3d(NamedTuple):
    """Where each output voxel samples, per neighbour in the order (z, y, x) = 000, 001, …, 111.

    index: flat src index [B, P] (P = D·H·W), clamped into src; weight: trilinear
    weight [B, P], 0 outside src; slope[k]: ∂weight/∂(position along axis k),
    k = 0, 1, 2 for x̂, ŷ, ẑ; gate[k]: where δ along axis k receives gradient;
    finite: where δ is finite.
    """

    index: list[torch.Tensor]
    weight: list[torch.Tensor]
    slope: list[list[torch.Tensor]]
    gate: list[torch.Tensor]
    finite: torch.Tensor


def neighbours3d(disp: torch.Tensor, sizes_in: tuple[int, int, int], padding: str, acc: torch.dtype) -> Neighbours3d:
    """The eight neighbours of every voxel of disp [B, 3, D, H, W] (x − δ, voxels) in a
    source of sizes_in = (D_in, H_in, W_in); positions and weights in ``acc``."""
    b, _, d, h, w = disp.shape
    d_in, h_in, w_in = sizes_in
    n = d * h * w
    dd = disp.to(acc).reshape(b, 3, n)
    ar = functools.partial(torch.arange, device=disp.device, dtype=acc)
    coords = (ar(w).repeat(d * h), ar(h).repeat_interleave(w).repeat(d), ar(d).repeat_interleave(h * w))
    finite = torch.isfinite(dd).all(dim=1)
    border = padding == "border"
    idx, valid, wts, gate = [], [], [], []
    for k, (coord, size) in enumerate(zip(coords, (w_in, h_in, d_in))):
        coord = coord.expand(b, n)
        # A non-finite δ samples at its own voxel; its results are overwritten with NaN.
        i0, a, g = _axis(coord, torch.where(finite, dd[:, k], coord), size, border)
        i, v, wt = _pair(i0, a, size)
        idx.append(i)
        valid.append(v)
        wts.append(wt)
        gate.append(g)
    sign = (-1.0, 1.0)
    index, weight, slope = [], [], [[], [], []]
    for jz in range(2):
        for jy in range(2):
            for jx in range(2):
                j = (jx, jy, jz)
                index.append((idx[2][jz] * h_in + idx[1][jy]) * w_in + idx[0][jx])
                weight.append(wts[0][jx] * wts[1][jy] * wts[2][jz])
                for k in range(3):
                    # The weight is a product over axes; along axis k its factor's slope is ±(in bounds).
                    factors = [valid[m][j[m]] * sign[j[m]] if m == k else wts[m][j[m]] for m in range(3)]
                    slope[k].append(factors[0] * factors[1] * factors[2])
    return Neighbours3d(index, weight, slope, gate, finite)


def _warp3d(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """The 3-D warp (x − δ) in the arithmetic dtype, [B, C, D, H, W] contiguous."""
    b, c = src.shape[:2]
    d, h, w = disp.shape[2:]
    acc = acc_dtype(src)
    if src.shape[2:].numel() == 0:
        out = torch.zeros(b, c, d * h * w, dtype=acc, device=src.device)
        finite = torch.isfinite(disp).all(dim=1).reshape(b, d * h * w)
    else:
        nb = neighbours3d(disp, tuple(src.shape[2:]), padding, acc)
        flat = src.reshape(b, c, src.shape[2:].numel())
        out = sum(_gather(flat, index, acc) * weight.unsqueeze(1) for index, weight in zip(nb.index, nb.weight))
        finite = nb.finite
    return _nan_where_not_finite(out, finite, disp.reshape(b, 3, d * h * w)).view(b, c, d, h, w)


def warp3d_forward(src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool, deterministic: bool
                   ) -> torch.Tensor:
    """The 3-D warp: sampling at x − disp, or at x + disp when ``flow``."""
    return _warp3d(src, -disp if flow else disp, padding).to(src.dtype).contiguous(
        memory_format=memory_format_of(src))


def warp3d_backward(
    grad_out: torch.Tensor, src: torch.Tensor, disp: torch.Tensor, padding: str, flow: bool,
    need_src: bool, need_disp: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = src.shape[:2]
    d, h, w = disp.shape[2:]
    acc = acc_dtype(src)
    delta = -disp if flow else disp
    grad_src = grad_disp = None
    if src.shape[2:].numel() == 0:
        if need_src:
            grad_src = torch.zeros_like(src)
        if need_disp:
            finite = torch.isfinite(disp).all(dim=1, keepdim=True)
            grad_disp = torch.zeros_like(disp).masked_fill(~finite, float("nan"))
        return or_empty(grad_src, src), or_empty(grad_disp, disp)
    nb = neighbours3d(delta, tuple(src.shape[2:]), padding, acc)
    n = d * h * w
    g = grad_out.reshape(b, c, n).to(acc)
    if need_src:
        # Non-finite voxels have no position, so they send nothing to src.
        g_src = g * nb.finite.unsqueeze(1)
        flat = torch.zeros(b, c, src.shape[2:].numel(), dtype=acc, device=src.device)
        for index, weight in zip(nb.index, nb.weight):
            flat.scatter_add_(2, index.unsqueeze(1).expand(b, c, n), g_src * weight.unsqueeze(1))
        grad_src = flat.view(src.shape).to(src.dtype).contiguous(memory_format=memory_format_of(src))
    if need_disp:
        s = src.reshape(b, c, src.shape[2:].numel())
        sums = [torch.zeros(b, n, dtype=acc, device=src.device) for _ in range(3)]
        for j, index in enumerate(nb.index):
            gv = (g * _gather(s, index, acc)).sum(dim=1)  # Σ_c g·S at this neighbour
            for k in range(3):
                sums[k] += gv * nb.slope[k][j]
        # ∂x̂/∂δ = −1 (x − δ); +1 for a flow (x + f).
        sign = 1.0 if flow else -1.0
        gd = sign * torch.stack([sums[k] * nb.gate[k] for k in range(3)], dim=1)
        grad_disp = gd.masked_fill(~nb.finite.unsqueeze(1), float("nan")).view(b, 3, d, h, w).to(disp.dtype)
    return or_empty(grad_src, src), or_empty(grad_disp, disp)


def softmax_shift(metric: torch.Tensor) -> torch.Tensor:
    """Each sample's largest metric, [B], in the arithmetic dtype (0 for an empty sample):
    what softmax splatting subtracts before exp."""
    dtype = torch.float64 if metric.dtype == torch.float64 else torch.float32
    if metric.numel() == 0:
        return metric.new_zeros(metric.shape[0], dtype=dtype)
    return metric.detach().amax(dim=(1, 2, 3)).to(dtype)


def splat_importance(metric: torch.Tensor, mode: str, finite: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """z of each source pixel, [B, P]: 1, metric or exp(metric − shift); 0 where the flow is not finite."""
    if mode in ("sum", "average"):
        z = torch.ones(finite.shape, dtype=acc, device=finite.device)
    else:
        z = metric.reshape(finite.shape).to(acc)
        if mode == "softmax":
            z = torch.exp(z - softmax_shift(metric).to(acc).unsqueeze(1))
    return torch.where(finite, z, 0.0)


def splat_forward(
    src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, mode: str, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, den) of ops.splat (x + flow, pixels): den [B, 1, H, W] in the arithmetic dtype for
    the normalized modes, empty for "sum"."""
    b, c, h, w = src.shape
    acc = acc_dtype(src)
    n = h * w
    num = torch.zeros(b, c, n, dtype=acc, device=src.device)
    den = torch.zeros(b, n, dtype=acc, device=src.device)
    if b * n:
        nb = neighbours(-flow, h, w, "zeros", acc)  # exact: x + f = x − (−f)
        z = splat_importance(metric, mode, nb.finite, acc)
        vals = src.reshape(b, c, n).to(acc) * z.unsqueeze(1)
        # Out of place: this is also the composite that torch.func and double backward differentiate.
        for index, weight in zip(nb.index, nb.weight):
            num = num.scatter_add(2, index.unsqueeze(1).expand(b, c, n), vals * weight.unsqueeze(1))
            den = den.scatter_add(1, index, z * weight)
    fmt = memory_format_of(src)
    if mode == "sum":
        return num.view(b, c, h, w).to(src.dtype).contiguous(memory_format=fmt), src.new_empty(0, dtype=acc)
    d = den.view(b, 1, h, w)
    # Dividing by 1 where nothing landed keeps NaN out of the gradient of the branch not taken.
    out = torch.where(d != 0, num.view(b, c, h, w) / torch.where(d != 0, d, 1.0), 0.0)
    return out.to(src.dtype).contiguous(memory_format=fmt), d


def splat_output_grads(
    grad_out: torch.Tensor, out: torch.Tensor, den: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(∂L/∂num, ∂L/∂den or None) in the arithmetic dtype: out = num / den gives
    ∂L/∂num = g / den and ∂L/∂den = −Σ_c g·out / den (both 0 where den is 0)."""
    g = grad_out.to(acc_dtype(grad_out))
    if mode == "sum":
        return g, None
    inv = torch.where(den != 0, 1 / den, 0.0)
    return g * inv, -(g * out.to(g.dtype)).sum(dim=1, keepdim=True) * inv


def splat_backward(
    grad_out: torch.Tensor, src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor, out: torch.Tensor,
    den: torch.Tensor, mode: str, need_src: bool, need_flow: bool, need_metric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂src, ∂L/∂flow, ∂L/∂metric) of splat_forward, empty where not needed: a gather of
    ∂L/∂num and ∂L/∂den at p + flow."""
    b, c, h, w = src.shape
    acc = acc_dtype(src)
    n = h * w
    if b * n == 0:
        return (
            or_empty(torch.zeros_like(src) if need_src else None, src),
            or_empty(torch.zeros_like(flow) if need_flow else None, flow),
            or_empty(torch.zeros_like(metric) if need_metric else None, metric),
        )
    gn, gd = splat_output_grads(grad_out, out, den, mode)
    nb = neighbours(-flow, h, w, "zeros", acc)
    z = splat_importance(metric, mode, nb.finite, acc)
    gn = gn.reshape(b, c, n)
    s = src.reshape(b, c, n).to(acc)
    sampled = torch.zeros(b, c, n, dtype=acc, device=src.device)
    slope_x = torch.zeros(b, n, dtype=acc, device=src.device)
    slope_y = torch.zeros_like(slope_x)
    for index, weight, d_x, d_y in zip(nb.index, nb.weight, nb.d_x, nb.d_y):
        v = _gather(gn, index, acc)
        sampled += v * weight.unsqueeze(1)
        sv = (s * v).sum(dim=1)
        slope_x += sv * d_x
        slope_y += sv * d_y
        if gd is not None:
            vd = gd.reshape(b, n).gather(1, index)
            slope_x += vd * d_x
            slope_y += vd * d_y
    grad_src = grad_flow = grad_metric = None
    if need_src:
        grad_src = (z.unsqueeze(1) * sampled).view(b, c, h, w).to(src.dtype)
        grad_src = grad_src.contiguous(memory_format=memory_format_of(src))
    if need_flow:
        # ∂(x + f)/∂f = +1.
        gf = torch.stack((z * slope_x, z * slope_y), dim=1)
        grad_flow = torch.where(nb.finite.unsqueeze(1), gf, 0.0).view(b, 2, h, w).to(flow.dtype)
    if need_metric:
        gz = (s * sampled).sum(dim=1)
        if gd is not None:
            for index, weight in zip(nb.index, nb.weight):
                gz = gz + gd.reshape(b, n).gather(1, index) * weight
        if mode == "softmax":
            gz = gz * z
        grad_metric = torch.where(nb.finite, gz, 0.0).view(b, 1, h, w).to(metric.dtype)
    return or_empty(grad_src, src), or_empty(grad_flow, flow), or_empty(grad_metric, metric)


class _WarpTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, disp, padding):
        ctx.save_for_backward(src, disp)
        ctx.padding = padding
        return warp_forward(src, disp, padding, True)

    @staticmethod
    def backward(ctx, grad_out):
        src, disp = ctx.saved_tensors
        need_src, need_disp = ctx.needs_input_grad[:2]
        grad_src, grad_disp = warp_backward(grad_out, src, disp, ctx.padding, need_src, need_disp, True)
        return grad_src if need_src else None, grad_disp if need_disp else None, None


def warp_torch(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """:func:`tcae_kernels.warp` (x − δ, pixels) through this PyTorch fallback, on any device.

    Its src gradient is a ``scatter_add_``: deterministic on CPU. Its backward
    is made of differentiable ops (double backward works); forward mode and
    torch.func differentiate the forward itself, as for the ops.
    """
    padding = check_warp_args(src, disp, padding)
    check_position_range(src, disp)
    if needs_composite(src, disp):
        return warp_forward(src, disp, padding, True)
    return _WarpTorch.apply(src, disp, padding)
