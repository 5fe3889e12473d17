"""Backward warping with optical flow, and recovering a flow by gradient descent.

Optical flow f maps each pixel x of frame 1 to x + f(x) in frame 2, so frame 2
warped back onto frame 1 is frame2(x + f(x)) = warp(frame2, −f). Here the
flow is unknown: we start from zero and descend the photometric L1 error,
which only works because the warp is differentiable in its displacement.

    python examples/flow_backward_warp.py --size 64 --steps 200
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tcae_kernels import warp, warp_l1


def smooth_noise(shape: tuple[int, ...], blur: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    for _ in range(3):
        x = F.avg_pool2d(x, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
    return x / x.std()


def main(size: int = 64, steps: int = 200, lr: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Returns the flow's mean end-point error (pixels) and the photometric error, before and after."""
    gen = torch.Generator().manual_seed(seed)
    frame2 = smooth_noise((1, 3, size, size), 2, gen)
    true_flow = 2.0 * smooth_noise((1, 2, size, size), size // 8, gen)  # pixels
    frame1 = warp(frame2, -true_flow, "border")  # what frame 1 would be under that flow

    flow = torch.zeros(1, 2, size, size, requires_grad=True)
    opt = torch.optim.Adam([flow], lr=lr)
    # Only the interior: near the border, "border" padding makes the flow ambiguous.
    m = size // 8
    epe = lambda: (flow - true_flow)[..., m:-m, m:-m].norm(dim=1).mean().item()  # noqa: E731
    before = {"epe": epe(), "l1": warp_l1(frame2, -flow, frame1, "mean", "border").item()}
    for _ in range(steps):
        opt.zero_grad()
        loss = warp_l1(frame2, -flow, frame1, "mean", "border")
        # A little smoothness: a photometric loss alone cannot see flow along edges.
        smooth = (flow[..., 1:, :] - flow[..., :-1, :]).abs().mean() + (flow[..., 1:] - flow[..., :-1]).abs().mean()
        (loss + 0.05 * smooth).backward()
        opt.step()
    after = {"epe": epe(), "l1": warp_l1(frame2, -flow, frame1, "mean", "border").item()}
    return {"epe_before": before["epe"], "epe_after": after["epe"], "l1_before": before["l1"], "l1_after": after["l1"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    r = main(args.size, args.steps)
    print(f"end-point error {r['epe_before']:.3f} px -> {r['epe_after']:.3f} px; "
          f"photometric L1 {r['l1_before']:.4f} -> {r['l1_after']:.4f}")
