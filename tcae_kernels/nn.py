"""Thin ``nn.Module`` wrappers of the warp ops, for models built from modules."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_padding
from .ops.warp import flow_warp, warp
from .ops.warp3d import flow_warp3d, warp3d


class DisplacementWarp(nn.Module):
    """``warp(src, disp, padding)`` as a module (no parameters).

    src: [B, C, H_in, W_in]; disp: [B, 2, H, W] in pixels (δx, δy); returns
    [B, C, H, W], src sampled at (x − δx, y − δy). For backward warping with an
    optical flow f (frame 2 → frame 1 at each pixel of frame 1), pass
    disp = −f: out(x) = frame2(x + f(x)).
    """

    def __init__(self, padding: str = "zeros", deterministic: bool | None = None) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        self.deterministic = deterministic

    def forward(self, src: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return warp(src, disp, self.padding, self.deterministic)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}"


class FlowWarp(nn.Module):
    """``flow_warp(src, flow, padding)`` as a module (no parameters): the x + flow convention.

    src: [B, C, H_in, W_in]; flow: [B, 2, H, W] in pixels (x, y); returns [B, C, H, W],
    src sampled at (x + flow_x, y + flow_y), or (out, mask [B, 1, H, W]) with
    ``return_mask`` — RAFT's, PWC-Net's and VoxelMorph's backward warp.
    """

    def __init__(self, padding: str = "zeros", deterministic: bool | None = None, return_mask: bool = False) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        self.deterministic = deterministic
        self.return_mask = return_mask

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return flow_warp(src, flow, self.padding, self.deterministic, self.return_mask)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}, return_mask={self.return_mask}"


class VolumeWarp(nn.Module):
    """``warp3d`` (or, with ``flow=True``, ``flow_warp3d``) as a module (no parameters).

    src: [B, C, D_in, H_in, W_in]; disp: [B, 3, D, H, W] in voxels (channels
    along W, H, D); returns [B, C, D, H, W], src sampled at x − disp (x + disp
    with ``flow=True``, VoxelMorph's ``SpatialTransformer`` convention, whose
    channels run along D, H, W: pass ``flow.flip(1)``).
    """

    def __init__(self, padding: str = "zeros", flow: bool = False, deterministic: bool | None = None) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        self.flow = flow
        self.deterministic = deterministic

    def forward(self, src: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        fn = flow_warp3d if self.flow else warp3d
        return fn(src, disp, self.padding, self.deterministic)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}, flow={self.flow}"
