"""The PyTorch fallback of the warp: the kernels' math, vectorized over tensors.

CPU tensors run this when the Triton interpreter is off. It follows the
kernels step by step (same position arithmetic, same masks), so its results
match theirs to rounding. ``tcae_kernels.warp_torch`` is it behind autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def acc_dtype(src: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if src.dtype == torch.float64 else torch.float32


def _axis(coord: torch.Tensor, d: torch.Tensor, size: int, border: bool):
    """One axis of the sample position coord − d (pixels).

    Returns the left neighbour i0 (the right one is i0 + 1), the weight a of
    the right one, and where δ along this axis receives gradient. The weight is
    (coord − i0) − d rather than (coord − d) − i0: both subtractions are exact
    for δ of a few pixels, so positions far from the origin keep full precision.
    """
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
    b, _, h, w = disp.shape
    d = disp.to(acc).reshape(b, 2, h * w)
    xs = torch.arange(w, device=disp.device, dtype=acc).repeat(h).expand(b, h * w)
    ys = torch.arange(h, device=disp.device, dtype=acc).repeat_interleave(w).expand(b, h * w)
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
            weight.append(wy[j] * wx[i])
            d_x.append(wy[j] * vx[i] * sign[i])
            d_y.append(vy[j] * wx[i] * sign[j])
    return Neighbours(index, weight, d_x, d_y, gate_x, gate_y, finite)


def _gather(flat: torch.Tensor, index: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """flat src [B, C, H_in·W_in] at index [B, P] → [B, C, P] in acc.

    Only the gathered values are converted: src itself may be far larger than the output.
    """
    b, c, _ = flat.shape
    return flat.gather(2, index.unsqueeze(1).expand(b, c, index.shape[1])).to(acc)


def warp_forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    out = torch.zeros(b, c, h * w, dtype=acc, device=src.device)
    if h_in * w_in == 0:
        finite = torch.isfinite(disp).all(dim=1).reshape(b, h * w)
    else:
        nb = neighbours(disp, h_in, w_in, padding, acc)
        flat = src.reshape(b, c, h_in * w_in)
        for index, weight in zip(nb.index, nb.weight):
            out += _gather(flat, index, acc) * weight.unsqueeze(1)
        finite = nb.finite
    out = out.masked_fill(~finite.unsqueeze(1), float("nan"))
    return out.view(b, c, h, w).to(src.dtype)


def warp_backward(
    grad_out: torch.Tensor,
    src: torch.Tensor,
    disp: torch.Tensor,
    padding: str,
    need_src: bool,
    need_disp: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        grad_src = flat.view(b, c, h_in, w_in).to(src.dtype)
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
        grad_disp = gd.masked_fill(~nb.finite.unsqueeze(1), float("nan")).view(b, 2, h, w).to(disp.dtype)
    return grad_src, grad_disp
