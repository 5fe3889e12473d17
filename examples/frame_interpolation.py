"""Frame interpolation by softmax splatting (Niklaus & Liu, CVPR 2020), on generated frames.

Two frames of a textured scene — a background drifting slowly, a disc moving
fast across it — and their true flows. Each frame is forward-warped (splatted)
half way along its flow; where several pixels land on one spot, softmax
splatting weights them by exp(metric) with the paper's brightness-constancy
metric, metric = −α·|I0 − backward_warp(I1, flow)|: a pixel still visible in the
other frame (the disc) wins over one it occludes (the background behind it).
The two half-way images are then averaged where both received pixels.

Printed: the L1 error against the true middle frame, next to the trivial
baseline (the average of the two frames) and plain average splatting.

    python examples/frame_interpolation.py --size 128
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tcae_kernels import flow_warp, splat


def smooth_noise(shape: tuple[int, ...], blur: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.rand(shape, generator=gen)
    for _ in range(2):
        x = F.avg_pool2d(x, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
    return (x - x.amin()) / (x.amax() - x.amin())


def render(t: float, size: int, bg: torch.Tensor, fg: torch.Tensor, v_bg: torch.Tensor, v_fg: torch.Tensor,
           centre: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame at time t ([1, 3, S, S], values in [0, 1]) and where the disc covers it ([1, 1, S, S])."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    c = centre + t * v_fg
    inside = (((xs - c[0]) ** 2 + (ys - c[1]) ** 2).sqrt() <= radius).float().view(1, 1, size, size)
    # Content moved by t·v is the texture sampled at x − t·v: flow_warp with flow −t·v.
    b = flow_warp(bg, (-t * v_bg).view(1, 2, 1, 1).expand(1, 2, size, size), "border")
    f = flow_warp(fg, (-t * v_fg).view(1, 2, 1, 1).expand(1, 2, size, size), "border")
    return inside * f + (1 - inside) * b, inside


def interpolate(i0: torch.Tensor, i1: torch.Tensor, f01: torch.Tensor, f10: torch.Tensor, t: float, alpha: float,
                mode: str = "softmax") -> torch.Tensor:
    """The frame at t from both frames and their flows (pixels), by splatting each toward t."""
    halves, covered = [], []
    for frame, other, flow, step in ((i0, i1, f01, t), (i1, i0, f10, 1 - t)):
        metric = None
        if mode == "softmax":
            # Brightness constancy: how well the pixel matches where its flow lands in the other frame.
            metric = -alpha * (frame - flow_warp(other, flow)).abs().mean(dim=1, keepdim=True)
        halves.append(splat(frame, step * flow, mode, metric))
        covered.append((splat(torch.ones_like(frame[:, :1]), step * flow, "sum") > 1e-3).float())
    both = covered[0] + covered[1]
    # Each half where only it received pixels, their mean where both did; holes in both: the frames' mean.
    mean = (halves[0] * covered[0] + halves[1] * covered[1]) / both.clamp(min=1)
    return torch.where(both > 0, mean, (i0 + i1) / 2)


def main(size: int = 128, alpha: float = 20.0, seed: int = 0) -> dict[str, float]:
    """Returns the mean L1 error (pixel values in [0, 1]) of each method against the true middle frame."""
    gen = torch.Generator().manual_seed(seed)
    bg = smooth_noise((1, 3, size, size), max(1, size // 32), gen)
    fg = 1 - smooth_noise((1, 3, size, size), max(1, size // 64), gen)
    v_bg = torch.tensor([0.02, 0.01]) * size  # pixels per frame interval
    v_fg = torch.tensor([0.15, 0.05]) * size
    centre, radius = torch.tensor([0.35, 0.45]) * size, 0.18 * size
    i0, in0 = render(0.0, size, bg, fg, v_bg, v_fg, centre, radius)
    i1, in1 = render(1.0, size, bg, fg, v_bg, v_fg, centre, radius)
    truth, _ = render(0.5, size, bg, fg, v_bg, v_fg, centre, radius)
    # The true flows: each pixel moves with what it shows.
    f01 = in0 * v_fg.view(1, 2, 1, 1) + (1 - in0) * v_bg.view(1, 2, 1, 1)
    f10 = -(in1 * v_fg.view(1, 2, 1, 1) + (1 - in1) * v_bg.view(1, 2, 1, 1))

    m = max(2, size // 16)  # the border, where content enters the frame, is left out
    err = lambda img: (img - truth)[..., m:-m, m:-m].abs().mean().item()  # noqa: E731
    result = {
        "baseline_average_frames": err((i0 + i1) / 2),
        "average_splat": err(interpolate(i0, i1, f01, f10, 0.5, alpha, "average")),
        "softmax_splat": err(interpolate(i0, i1, f01, f10, 0.5, alpha, "softmax")),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=20.0, help="metric scale: −α·|brightness difference|")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    r = main(args.size, args.alpha, args.seed)
    print(f"mean L1 error against the true middle frame ({args.size}×{args.size}, values in [0, 1]):")
    print(f"  average of the two frames (baseline): {r['baseline_average_frames']:.4f}")
    print(f"  average splatting:                    {r['average_splat']:.4f}")
    print(f"  softmax splatting (ours):             {r['softmax_splat']:.4f}")
