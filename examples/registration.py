"""Image registration: find the smooth displacement that aligns a moving image to a fixed one.

The displacement is parametrised on a coarse grid (a few control points per
side) and upsampled to full resolution, so it stays smooth; the warp's
gradient w.r.t. the displacement (pixels) drives it. The same pattern
registers medical slices or aligns video frames.

    python examples/registration.py --size 96 --steps 150
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tcae_kernels.nn import DisplacementWarp


def blobs(size: int, gen: torch.Generator) -> torch.Tensor:
    """A grey image of Gaussian blobs of many sizes, [1, 1, size, size]: texture everywhere, so
    every displacement is visible."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    img = torch.zeros(size, size)
    for _ in range(60):
        cy, cx = torch.rand(2, generator=gen) * size
        r = size * (0.02 + 0.05 * torch.rand(1, generator=gen))
        img += torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r**2))
    return img[None, None]


def upsample(coarse: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def main(size: int = 96, steps: int = 150, control: int = 6, seed: int = 0) -> dict[str, float]:
    """Returns the mean squared intensity error and the displacement error (pixels), before and after."""
    gen = torch.Generator().manual_seed(seed)
    fixed = blobs(size, gen)
    true_disp = upsample(torch.randn(1, 2, control, control, generator=gen) * size / 40, size)
    moving = DisplacementWarp("border")(fixed, -true_disp)  # fixed = warp(moving, true_disp), roughly

    warp = DisplacementWarp("border")
    coarse = torch.zeros(1, 2, control, control, requires_grad=True)
    opt = torch.optim.Adam([coarse], lr=0.3)
    mse = lambda: F.mse_loss(warp(moving, upsample(coarse, size)), fixed).item()  # noqa: E731
    err = lambda: (upsample(coarse, size) - true_disp).norm(dim=1).mean().item()  # noqa: E731
    before = (mse(), err())
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(warp(moving, upsample(coarse, size)), fixed).backward()
        opt.step()
    return {"mse_before": before[0], "mse_after": mse(), "disp_err_before": before[1], "disp_err_after": err()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    r = main(args.size, args.steps)
    print(f"intensity MSE {r['mse_before']:.5f} -> {r['mse_after']:.5f}; "
          f"displacement error {r['disp_err_before']:.2f} px -> {r['disp_err_after']:.2f} px")
