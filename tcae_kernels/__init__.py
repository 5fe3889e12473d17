"""tcae-kernels: the differentiable bilinear displacement warp as fused Triton kernels.

Every op samples at x − δ (TCAE's convention), with δ in pixels (voxels in 3-D), except
``flow_warp`` and ``flow_warp3d`` (x + flow: RAFT, PWC-Net, VoxelMorph, MONAI) and
``splat`` (forward warping to x + flow).
"""

from .fallback import warp_torch
from .fields import compose, integrate_velocity
from .ops.launch import implementation
from .ops.merged_warp import merge_displacements, merged_warp
from .ops.splat import splat
from .ops.warp import flow_warp, warp
from .ops.warp3d import flow_warp3d, warp3d
from .ops.warp_l1 import warp_l1
from .reference import splat_naive, warp3d_naive, warp_grid_sample, warp_naive

__all__ = [
    "warp",
    "flow_warp",
    "splat",
    "splat_naive",
    "warp_torch",
    "merged_warp",
    "merge_displacements",
    "warp_l1",
    "warp3d",
    "flow_warp3d",
    "compose",
    "integrate_velocity",
    "warp_naive",
    "warp3d_naive",
    "warp_grid_sample",
    "implementation",
]
__version__ = "0.1.0"
