"""tcae-kernels: the differentiable bilinear displacement warp as fused Triton kernels."""

from .reference import warp_grid_sample, warp_naive
from .warp import warp, warp_torch

__all__ = ["warp", "warp_torch", "warp_naive", "warp_grid_sample"]
__version__ = "0.1.0"
