"""Figure-1-style panels: what the TCAE does to a few frame pairs, as one PNG.

One row per sample; columns: source, target, AU-changed, pose-changed,
reconstruction, AU displacement, pose displacement. Displacements are
coloured like optical flow: hue is the direction of δ, saturation its length
(white = no displacement, full colour = the panel's largest one, which
training logs as ``panel_max_disp_px``). Both displacement columns share that
scale, so AU and pose fields compare within a panel, not across panels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import TCAEOutput
from .synthetic import write_png

COLUMNS = ("source", "target", "au_changed", "pose_changed", "reconstruction", "disp_au", "disp_pose")
_GAP = 2  # pixels of white between tiles


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Arrays in [0, 1] of one shape → [..., 3] float RGB in [0, 1]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(table):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], axis=-1)
    return out


def flow_to_rgb(disp: np.ndarray, max_norm: float | None = None) -> np.ndarray:
    """disp [2, H, W] (δx, δy) in pixels → [H, W, 3] uint8.

    Hue from the direction of δ (red = +x, hue turning toward +y), saturation
    |δ| / ``max_norm`` (default: the largest |δ| here), value 1.
    """
    dx, dy = disp[0].astype(np.float64), disp[1].astype(np.float64)
    mag = np.hypot(dx, dy)
    scale = max_norm if max_norm is not None else float(mag.max())
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    sat = np.clip(mag / max(scale, 1e-9), 0.0, 1.0)
    return (hsv_to_rgb(hue, sat, np.ones_like(hue)) * 255.0 + 0.5).astype(np.uint8)


def _image_to_rgb(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → [H, W, 3] uint8."""
    x = (img.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5 + 0.5
    return x.permute(1, 2, 0).numpy().astype(np.uint8)


def make_panel(source: torch.Tensor, target: torch.Tensor, out: TCAEOutput,
               zoom: int = 2) -> tuple[np.ndarray, float]:
    """One row per sample of :data:`COLUMNS`; source, target [B, 3, S, S] in [-1, 1].

    Returns ([H, W, 3] uint8, the displacement length in pixels that gets full
    saturation). Tiles are enlarged ``zoom``× (nearest) so 64 px faces stay
    readable.
    """
    disps = torch.stack([out.disp_au, out.disp_pose]).detach().float().cpu()
    max_norm = float(disps.norm(dim=2).max())
    rows = []
    for b in range(source.shape[0]):
        tiles = [_image_to_rgb(t[b]) for t in (source, target, out.au_changed, out.pose_changed, out.reconstruction)]
        tiles += [flow_to_rgb(d[b].numpy(), max_norm) for d in disps]
        tiles = [t.repeat(zoom, 0).repeat(zoom, 1) for t in tiles]
        gap = np.full((tiles[0].shape[0], _GAP, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
    gap = np.full((_GAP, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0), max_norm


def write_panel(path: str | Path, source: torch.Tensor, target: torch.Tensor, out: TCAEOutput) -> float:
    """:func:`make_panel` written as a PNG; returns its full-saturation displacement in pixels."""
    image, max_norm = make_panel(source, target, out)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_png(path, image)
    return max_norm
