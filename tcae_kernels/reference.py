"""Public references for the displacement warp T(S, δ) of SPEC section 1.

``warp_naive`` is the oracle: a plain PyTorch gather that reads like the math,
differentiated by autograd. Run it in float64 to check anything else.
``warp_grid_sample`` is the same function the way TCAE's original code and most
flow-warping code compute it: a normalized grid through ``F.grid_sample``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_warp_args


def _sample_positions(disp: torch.Tensor, h_in: int, w_in: int, padding: str):
    """x̂ = x − δx and ŷ = y − δy in pixels, clamped for ``border``.

    Non-finite positions are replaced by 0 (and reported) so that no index is
    ever formed from NaN or ±Inf.
    """
    _, _, h, w = disp.shape
    ys = torch.arange(h, device=disp.device, dtype=disp.dtype).view(1, h, 1)
    xs = torch.arange(w, device=disp.device, dtype=disp.dtype).view(1, 1, w)
    px = xs - disp[:, 0]
    py = ys - disp[:, 1]
    finite = torch.isfinite(px) & torch.isfinite(py)
    px = torch.where(finite, px, torch.zeros_like(px))
    py = torch.where(finite, py, torch.zeros_like(py))
    if padding == "border":
        # As grid_sample: a position on or beyond the border carries no gradient.
        px = torch.where((px > 0) & (px < w_in - 1), px, px.detach().clamp(0, max(w_in - 1, 0)))
        py = torch.where((py > 0) & (py < h_in - 1), py, py.detach().clamp(0, max(h_in - 1, 0)))
    return px, py, finite


def warp_naive(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """out[b, c, y, x] = bilinear sample of src at (x − δx, y − δy), in pixels.

    src: [B, C, H_in, W_in]; disp: [B, 2, H, W] (channel 0 δx along W, channel 1
    δy along H, pixels); returns [B, C, H, W]. Neighbours outside the source
    contribute 0 (``zeros``) or the position is clamped first (``border``).
    A non-finite δ gives NaN at that pixel. Slow by design.
    """
    padding = check_warp_args(src, disp, padding)
    b, c, h_in, w_in = src.shape
    _, _, h, w = disp.shape
    disp = disp.to(src.dtype)
    px, py, finite = _sample_positions(disp, h_in, w_in, padding)
    x0 = torch.floor(px)
    y0 = torch.floor(py)
    ax = px - x0
    ay = py - y0
    x0 = x0.long()
    y0 = y0.long()
    flat = src.reshape(b, c, h_in * w_in)
    out = src.new_zeros(b, c, h, w)
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w_in) & (yi >= 0) & (yi < h_in)
            idx = torch.where(inside, yi * w_in + xi, torch.zeros_like(xi))
            vals = flat.gather(2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
            out = out + vals * (wx * wy * inside).unsqueeze(1)
    return torch.where(finite.unsqueeze(1), out, torch.full_like(out, float("nan")))


def normalized_grid(disp: torch.Tensor, h_in: int, w_in: int) -> torch.Tensor:
    """The [B, H, W, 2] grid of ``grid_sample(align_corners=False)`` for x̂, ŷ."""
    _, _, h, w = disp.shape
    ys = torch.arange(h, device=disp.device, dtype=disp.dtype).view(1, h, 1)
    xs = torch.arange(w, device=disp.device, dtype=disp.dtype).view(1, 1, w)
    # align_corners=False maps pixel p to (2p + 1)/size − 1; unlike
    # align_corners=True it is defined for sizes of 1 too.
    gx = (2 * (xs - disp[:, 0]) + 1) / w_in - 1
    gy = (2 * (ys - disp[:, 1]) + 1) / h_in - 1
    return torch.stack((gx, gy), dim=-1)


def warp_grid_sample(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """The warp through ``F.grid_sample`` (bilinear), as TCAE's code does it.

    Same arguments and result as :func:`warp_naive`, except at non-finite δ
    (grid_sample's own behaviour) and for the rounding the normalization adds
    in low precision (~1e-7 · size pixels in float32).
    """
    padding = check_warp_args(src, disp, padding)
    grid = normalized_grid(disp.to(src.dtype), src.shape[2], src.shape[3])
    return F.grid_sample(src, grid, mode="bilinear", padding_mode=padding, align_corners=False)
