"""Public references for the displacement warp T(S, δ) of SPEC section 1.

``warp_naive`` is the oracle: a plain PyTorch gather that reads like the math,
differentiated by autograd. Run it in float64 to check anything else.
``warp3d_naive`` is its trilinear counterpart for volumes.
``warp_grid_sample`` is the same function the way TCAE's original code and most
flow-warping code compute it: a normalized grid through ``F.grid_sample``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_warp3d_args, check_warp_args


def _axis(coord: torch.Tensor, d: torch.Tensor, size: int, padding: str):
    """Along one axis, for the position t = coord − d (pixels): left neighbour ⌊t⌋ and t − ⌊t⌋."""
    t = coord - d
    exact = torch.ones_like(t, dtype=torch.bool)
    if padding == "border":
        # As grid_sample: a position on or beyond the border carries no gradient.
        # (0 < t < size − 1, tested on d: t may have rounded onto a bound.)
        exact = (d < coord) & (d > coord - (size - 1))
        t = torch.where(exact, t, t.detach().clamp(0, max(size - 1, 0)))
    else:
        # Two pixels out every neighbour is outside; the clamp keeps indices small.
        t = t.clamp(-2, size + 1)
    i0 = torch.floor(t)
    # For |δ| below 2⁻⁵³·coord, coord − d rounds; if onto an integer from above
    # that integer is not the floor. coord − t is exact, so this compare is.
    i0 = torch.where(exact & (t == i0) & (coord - t < d), i0 - 1, i0)
    return i0.long(), t - i0


def _sample_positions(disp: torch.Tensor, h_in: int, w_in: int, padding: str):
    """Upper-left neighbours (x0, y0) and weights (ax, ay) of the right and lower ones.

    Non-finite δ is replaced by 0 (and reported) so that no index is ever
    formed from NaN or ±Inf.
    """
    _, _, h, w = disp.shape
    finite = torch.isfinite(disp).all(dim=1)
    disp = torch.where(finite.unsqueeze(1), disp, torch.zeros_like(disp))
    ys = torch.arange(h, device=disp.device, dtype=disp.dtype).view(1, h, 1)
    xs = torch.arange(w, device=disp.device, dtype=disp.dtype).view(1, 1, w)
    x0, ax = _axis(xs, disp[:, 0], w_in, padding)
    y0, ay = _axis(ys, disp[:, 1], h_in, padding)
    return x0, y0, ax, ay, finite


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
    x0, y0, ax, ay, finite = _sample_positions(disp, h_in, w_in, padding)
    flat = src.reshape(b, c, h_in * w_in)
    out = src.new_zeros(b, c, h, w)
    if flat.shape[2] == 0:  # a source without pixels: every neighbour is outside
        return torch.where(finite.unsqueeze(1), out, torch.full_like(out, float("nan")))
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


def warp3d_naive(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """out[b, c, z, y, x] = trilinear sample of src at (x − δx, y − δy, z − δz), in voxels.

    src: [B, C, D_in, H_in, W_in]; disp: [B, 3, D, H, W] (channels δx along W,
    δy along H, δz along D, voxels); returns [B, C, D, H, W]. The x − δ
    convention; a VoxelMorph/MONAI flow f (x + f) is disp = −f. Padding and
    non-finite δ as :func:`warp_naive`. Slow by design.
    """
    padding = check_warp3d_args(src, disp, padding)
    b, c, d_in, h_in, w_in = src.shape
    _, _, d, h, w = disp.shape
    disp = disp.to(src.dtype)
    finite = torch.isfinite(disp).all(dim=1)
    disp = torch.where(finite.unsqueeze(1), disp, torch.zeros_like(disp))
    coords = [torch.arange(n, device=disp.device, dtype=disp.dtype) for n in (w, h, d)]
    shapes = [(1, 1, 1, w), (1, 1, h, 1), (1, d, 1, 1)]
    axes = [_axis(coord.view(shape), disp[:, k], size, padding)
            for k, (coord, shape, size) in enumerate(zip(coords, shapes, (w_in, h_in, d_in)))]
    (x0, ax), (y0, ay), (z0, az) = axes
    flat = src.reshape(b, c, d_in * h_in * w_in)
    out = src.new_zeros(b, c, d, h, w)
    nan = torch.full_like(out, float("nan"))
    if flat.shape[2] == 0:  # a source without voxels: every neighbour is outside
        return torch.where(finite.unsqueeze(1), out, nan)
    for dz, wz in ((0, 1 - az), (1, az)):
        for dy, wy in ((0, 1 - ay), (1, ay)):
            for dx, wx in ((0, 1 - ax), (1, ax)):
                xi, yi, zi = x0 + dx, y0 + dy, z0 + dz
                inside = (xi >= 0) & (xi < w_in) & (yi >= 0) & (yi < h_in) & (zi >= 0) & (zi < d_in)
                idx = torch.where(inside, (zi * h_in + yi) * w_in + xi, torch.zeros_like(xi))
                vals = flat.gather(2, idx.view(b, 1, -1).expand(b, c, -1)).view(b, c, d, h, w)
                out = out + vals * (wx * wy * wz * inside).unsqueeze(1)
    return torch.where(finite.unsqueeze(1), out, nan)


def splat_naive(
    src: torch.Tensor, flow: torch.Tensor, mode: str = "sum", metric: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward warping (splatting; Niklaus & Liu, CVPR 2020), plainly: the oracle of ``splat``.

    Each source pixel p of src [B, C, H, W] adds z(p)·src[p] at p + flow(p)
    (flow [B, 2, H, W] in pixels, x + flow), split bilinearly over the four
    pixels around it; outside is dropped. z = 1 ("sum", "average"), metric
    ("linear") or exp(metric − max metric) ("softmax", metric [B, 1, H, W]);
    the normalized modes divide by the splatted z (0 where nothing landed). A
    non-finite flow sends nothing. Differentiable by autograd; run it in float64.
    """
    b, c, h, w = src.shape
    flow = flow.to(src.dtype)
    finite = torch.isfinite(flow).all(dim=1)
    f = torch.where(finite.unsqueeze(1), flow, torch.zeros_like(flow))
    ys = torch.arange(h, device=src.device, dtype=src.dtype).view(1, h, 1)
    xs = torch.arange(w, device=src.device, dtype=src.dtype).view(1, 1, w)
    # Two pixels out every neighbour is outside; the clamp keeps indices small.
    tx = (xs + f[:, 0]).clamp(-2, w + 1)
    ty = (ys + f[:, 1]).clamp(-2, h + 1)
    x0, y0 = torch.floor(tx), torch.floor(ty)
    ax, ay = tx - x0, ty - y0
    if mode in ("sum", "average"):
        z = torch.ones_like(tx)
    elif mode == "linear":
        z = metric[:, 0].to(src.dtype)
    else:
        m = metric[:, 0].to(src.dtype)
        z = torch.exp(m - m.detach().amax(dim=(1, 2), keepdim=True))
    z = torch.where(finite, z, torch.zeros_like(z))
    num = src.new_zeros(b, c, h * w)
    den = src.new_zeros(b, h * w)
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0.long() + dx, y0.long() + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            weight = (wx * wy * inside * z).view(b, h * w)
            idx = torch.where(inside, yi * w + xi, torch.zeros_like(xi)).view(b, h * w)
            num = num.scatter_add(2, idx.unsqueeze(1).expand(b, c, h * w), src.reshape(b, c, h * w) * weight.unsqueeze(1))
            den = den.scatter_add(1, idx, weight)
    num = num.view(b, c, h, w)
    if mode == "sum":
        return num
    den = den.view(b, 1, h, w)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
