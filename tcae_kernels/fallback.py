"""The PyTorch fallback of the warp: the kernels' math, vectorized over tensors.

CPU tensors run this when the Triton interpreter is off. It follows the
kernels step by step (same position arithmetic, same masks), so its results
match theirs to rounding. ``tcae_kernels.warp_torch`` is it behind autograd.
"""

from __future__ import annotations

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


def sample_setup(disp: torch.Tensor, h_in: int, w_in: int, padding: str, acc: torch.dtype):
    """Per output pixel: neighbour indices, weights, gradient gates, finiteness ([B, H, W] each)."""
    _, _, h, w = disp.shape
    d = disp.to(acc)
    xs = torch.arange(w, device=disp.device, dtype=acc).view(1, 1, w).expand_as(d[:, 0])
    ys = torch.arange(h, device=disp.device, dtype=acc).view(1, h, 1).expand_as(d[:, 1])
    finite = torch.isfinite(d[:, 0]) & torch.isfinite(d[:, 1])
    dx = torch.where(finite, d[:, 0], xs)
    dy = torch.where(finite, d[:, 1], ys)
    border = padding == "border"
    x0, ax, gate_x = _axis(xs, dx, w_in, border)
    y0, ay, gate_y = _axis(ys, dy, h_in, border)
    return x0, y0, ax, ay, gate_x, gate_y, finite


def _neighbours(x0, y0, ax, ay, h_in: int, w_in: int):
    """The four (flat index, weight, in-bounds) triples, in the order 00, 01, 10, 11 (y, x)."""
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0 + dx, y0 + dy
            valid = (xi >= 0) & (xi < w_in) & (yi >= 0) & (yi < h_in)
            yield torch.where(valid, yi * w_in + xi, torch.zeros_like(xi)), wx * wy, valid


def _gather(flat: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """flat src [B, C, H_in·W_in] at idx [B, H, W] → [B, C, H·W] in acc, 0 where not valid.

    Only the gathered values are converted: src itself may be far larger than the output.
    """
    b, c, _ = flat.shape
    n = idx.shape[1] * idx.shape[2]
    vals = flat.gather(2, idx.reshape(b, 1, n).expand(b, c, n)).to(acc)
    return vals * valid.reshape(b, 1, n)


def warp_forward(src: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    acc = acc_dtype(src)
    if h_in * w_in == 0:
        out = torch.zeros(b, c, h, w, dtype=acc, device=src.device)
        finite = torch.isfinite(disp).all(dim=1)
    else:
        x0, y0, ax, ay, _, _, finite = sample_setup(disp, h_in, w_in, padding, acc)
        flat = src.reshape(b, c, h_in * w_in)
        out = torch.zeros(b, c, h * w, dtype=acc, device=src.device)
        for idx, wgt, valid in _neighbours(x0, y0, ax, ay, h_in, w_in):
            out += _gather(flat, idx, valid, acc) * wgt.reshape(b, 1, h * w)
        out = out.view(b, c, h, w)
    out = out.masked_fill(~finite.unsqueeze(1), float("nan"))
    return out.to(src.dtype)


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
    x0, y0, ax, ay, gate_x, gate_y, finite = sample_setup(disp, h_in, w_in, padding, acc)
    g = grad_out.reshape(b, c, h * w).to(acc)
    n = h * w
    if need_src:
        # Non-finite pixels have no position, so they send nothing to src.
        g_src = g * finite.reshape(b, 1, n)
        flat = torch.zeros(b, c, h_in * w_in, dtype=acc, device=src.device)
        for idx, wgt, valid in _neighbours(x0, y0, ax, ay, h_in, w_in):
            contrib = g_src * (wgt * valid).reshape(b, 1, n)
            flat.scatter_add_(2, idx.reshape(b, 1, n).expand(b, c, n), contrib)
        grad_src = flat.view(b, c, h_in, w_in).to(src.dtype)
    if need_disp:
        s = src.reshape(b, c, h_in * w_in)
        v00, v01, v10, v11 = (
            _gather(s, idx, valid, acc) for idx, _, valid in _neighbours(x0, y0, ax, ay, h_in, w_in)
        )
        ax_, ay_ = ax.reshape(b, 1, n), ay.reshape(b, 1, n)
        d_dx = ((1 - ay_) * (v01 - v00) + ay_ * (v11 - v10)) * g
        d_dy = ((1 - ax_) * (v10 - v00) + ax_ * (v11 - v01)) * g
        gx = -d_dx.sum(1) * gate_x.reshape(b, n)
        gy = -d_dy.sum(1) * gate_y.reshape(b, n)
        gd = torch.stack((gx, gy), dim=1).view(b, 2, h, w)
        grad_disp = gd.masked_fill(~finite.unsqueeze(1), float("nan")).to(disp.dtype)
    return grad_src, grad_disp
