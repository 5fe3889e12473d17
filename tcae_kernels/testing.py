"""What tests and benchmarks check results with: SPEC's tolerances and the error they bound.

Like ``torch.testing``: public, so a user's own tests of code built on the
warp can hold it to the same standard.
"""

from __future__ import annotations

import torch

# SPEC section 3: relative L2 error against the float64 reference, (forward, gradients).
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; where b is all zeros (everything sampled outside), a must be too."""
    a, b = a.double(), b.double()
    den = b.norm()
    if den == 0:
        return 0.0 if a.norm() == 0 else float("inf")
    return ((a - b).norm() / den).item()


def make_disp(kind: str, b: int, h: int, w: int, dtype: torch.dtype, device: str | torch.device,
              gen: torch.Generator) -> torch.Tensor:
    """[B, 2, H, W] displacements in pixels, of the kind the name says:

    "small" (σ = 2 px), "large" (σ = 25 px), "integer" and "half_integer"
    (−3 … 3 px), "far" (mostly small, some 1e6 px and −1e30 px away; float16
    keeps to its range).
    """
    shape = (b, 2, h, w)
    if kind == "small":
        d = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    elif kind == "large":
        d = torch.randn(shape, generator=gen, dtype=torch.float64) * 25
    elif kind == "integer":
        d = torch.randint(-3, 4, shape, generator=gen).double()
    elif kind == "half_integer":
        d = torch.randint(-3, 4, shape, generator=gen).double() + 0.5
    elif kind == "far":
        d = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        pick = torch.rand(shape, generator=gen)
        far, big = (3e4, 6e4) if dtype == torch.float16 else (1e6, 1e30)
        d = torch.where(pick < 0.15, torch.full_like(d, far), d)
        d = torch.where((pick >= 0.15) & (pick < 0.3), torch.full_like(d, -big), d)
    else:
        raise ValueError(f"kind must be small, large, integer, half_integer or far, got {kind!r}")
    return d.to(dtype=dtype, device=device)
