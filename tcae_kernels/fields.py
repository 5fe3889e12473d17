"""Displacement fields as transformations: composition and integration of velocities.

Convention: x − δ, as every op here. warp(S, δ)(x) = S(x − δ(x)), with δ in
pixels [B, 2, H, W] (δx, δy) or voxels [B, 3, D, H, W] (δx, δy, δz); the
function dispatches on the field's dimension (4-D: ``warp``, 5-D: ``warp3d``).
Both are built on the fused warps (no grid tensor is ever made) and are
differentiable through them.

Composition. Warping by v, then by u:

    warp(warp(S, v), u)(x) = S(x − u(x) − v(x − u(x)))

so the one field that does both is δ = u + v(x − u(x)) = u + warp(v, u).
In the x + flow convention (VoxelMorph, MONAI) the same reasoning gives
f = u + flow_warp(v, u) for "by v, then by u": the fields of the two
conventions are each other's negatives, compose(−u, −v) = −(u + flow_warp(v, u)).

Integration (scaling and squaring). A stationary velocity field v generates a
diffeomorphism exp(v); with δ₀ = v / 2^steps, δ ← compose(δ, δ) ``steps``
times gives its displacement, as VoxelMorph's ``VecInt`` and MONAI's
``DVF2DDF`` (7 steps). For a VoxelMorph flow f (x + f, channels in axis order
D, H, W), ``VecInt(f)`` is ``-integrate_velocity(-f.flip(1)).flip(1)``.
"""

from __future__ import annotations

import torch

from .ops.warp import warp
from .ops.warp3d import warp3d


def _warp_field(field: torch.Tensor, disp: torch.Tensor, padding: str) -> torch.Tensor:
    """field sampled at x − disp: the 2-D or 3-D warp, by disp's dimension."""
    if disp.dim() == 5:
        return warp3d(field, disp, padding)
    return warp(field, disp, padding)


def _check_field(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (4, 5) or t.shape[1] != t.dim() - 2:
        raise ValueError(
            f"{name} must be [B, 2, H, W] or [B, 3, D, H, W] (a displacement in pixels or voxels), "
            f"got shape {tuple(t.shape)}"
        )
    return t


def compose(u: torch.Tensor, v: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """The displacement equal to warping by ``v``, then by ``u``: u + warp(v, u) (x − δ).

    Args:
        u, v: [B, 2, H, W] in pixels or [B, 3, D, H, W] in voxels, same shape
            and dtype (channels δx, δy[, δz] along W, H[, D]).
        padding: how v is read beyond its edge: ``"zeros"`` (v is 0 outside,
            as VoxelMorph and MONAI) or ``"border"`` (v extends by its edge
            values).

    Returns:
        δ with warp(S, δ) = warp(warp(S, v), u), up to interpolation; u's shape.
    """
    _check_field("u", u)
    _check_field("v", v)
    if u.shape != v.shape:
        raise ValueError(f"v must have u's shape {tuple(u.shape)}, got {tuple(v.shape)}")
    return u + _warp_field(v, u, padding)


def integrate_velocity(v: torch.Tensor, steps: int = 7, padding: str = "zeros") -> torch.Tensor:
    """The displacement of exp(v) by scaling and squaring: δ = v / 2^steps, then ``steps`` times
    δ ← compose(δ, δ) = δ + warp(δ, δ).

    Args:
        v: stationary velocity, [B, 2, H, W] in pixels or [B, 3, D, H, W] in
            voxels (x − δ convention: the result samples at x − δ).
        steps: squarings (7 as VoxelMorph and MONAI); 0 returns v.
        padding: as :func:`compose`.

    Returns:
        the displacement δ, v's shape and dtype; differentiable in v.
    """
    _check_field("v", v)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    disp = v / 2**steps
    for step in range(steps):
        disp = disp + _warp_field(disp, disp, padding)
    return disp
