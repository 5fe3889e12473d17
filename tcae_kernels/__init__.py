"""tcae-kernels: the differentiable bilinear displacement warp as fused Triton kernels."""

from .merged_warp import merge_displacements, merged_warp
from .reference import warp_grid_sample, warp_naive
from .warp import implementation, warp, warp_torch
from .warp_l1 import warp_l1

__all__ = [
    "warp",
    "warp_torch",
    "merged_warp",
    "merge_displacements",
    "warp_l1",
    "warp_naive",
    "warp_grid_sample",
    "implementation",
]
__version__ = "0.1.0"
