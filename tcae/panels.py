"""Figure-1-style panels: what the TCAE does to a few frame pairs, as one PNG that reads on its own.

One row per sample; columns (:data:`COLUMNS`): source, target, AU-changed,
pose-changed, reconstruction, AU displacement, pose displacement, attention;
for a model that sums the two displacements (``merge="sum"``), which has no
attention, the last column is the merged displacement δ = δ_AU + δ_pose.
Displacements are coloured by a colour wheel: hue is the direction of δ (the
way the content moves: the warp samples the source at x − δ), saturation its
length, white = none, full colour = ``scale_px`` pixels or more. The scale is
fixed (by default image size / 8, i.e. 8 px at 64 px) so panels of one run
compare across steps. Attention shows the AU branch's weight, 0 (pose decides,
black) to 1 (AU decides, white).

With matplotlib (``pip install 'tcae-kernels[plot]'``) the PNG has column
titles, the colour wheel as a legend with its scale in pixels, and, with
``arrows=True``, a quiver of each displacement over its colours. Without it,
the same tiles are written as a plain grid and a ``.txt`` caption beside the
PNG names the columns and the scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import write_png
from .model import TCAEOutput

COLUMNS = ("source", "target", "AU-changed", "pose-changed", "reconstruction", "AU displacement",
           "pose displacement", "attention (AU weight)")
SUM_COLUMN = "δ = δ_AU + δ_pose"


def columns(merge: str = "attention") -> tuple[str, ...]:
    """The panel's column titles for a model with this ``merge`` (:class:`~tcae.model.TCAEConfig`)."""
    return COLUMNS if merge == "attention" else COLUMNS[:-1] + (SUM_COLUMN,)
_GAP = 2  # pixels of white between tiles in the plain grid


def default_scale(image_size: int) -> float:
    """The full-colour displacement length of a panel, in pixels: image size / 8."""
    return image_size / 8


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


def colour_wheel(size: int = 65) -> np.ndarray:
    """The legend: [size, size, 3] uint8, the colour of δ = (x, y) relative to the centre, full colour
    at the rim, white outside the disc."""
    r = (size - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size] - r
    wheel = flow_to_rgb(np.stack([xs, ys]), r)
    wheel[np.hypot(xs, ys) > r] = 255
    return wheel


def _image_to_rgb(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] → [H, W, 3] uint8."""
    x = img.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5
    return x.permute(1, 2, 0).numpy().astype(np.uint8)


def _displacements(out: TCAEOutput, merge: str) -> dict[int, torch.Tensor]:
    """Column index → the displacement [B, 2, S, S] it shows."""
    return {5: out.disp_au, 6: out.disp_pose, **({7: out.disp} if merge == "sum" else {})}


def _tiles(source: torch.Tensor, target: torch.Tensor, out: TCAEOutput, scale_px: float,
           merge: str) -> list[list[np.ndarray]]:
    """Per sample, one [S, S, 3] uint8 tile per column."""
    rows = []
    for b in range(source.shape[0]):
        tiles = [_image_to_rgb(t[b]) for t in (source, target, out.au_changed, out.pose_changed, out.reconstruction)]
        tiles += [flow_to_rgb(d[b].detach().float().cpu().numpy(), scale_px)
                  for d in _displacements(out, merge).values()]
        if merge == "attention":
            weight = (out.attention[b, 0].detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
            tiles.append(np.repeat(weight[..., None], 3, axis=2))
        rows.append(tiles)
    return rows


def make_panel(source: torch.Tensor, target: torch.Tensor, out: TCAEOutput, scale_px: float | None = None,
               zoom: int = 2, merge: str = "attention") -> np.ndarray:
    """The plain grid: one row per sample of :func:`columns`, tiles enlarged ``zoom``× (nearest) so 64 px
    faces stay readable; source, target [B, 3, S, S] in [0, 1]. Returns [H, W, 3] uint8."""
    scale_px = scale_px or default_scale(source.shape[-1])
    rows = []
    for tiles in _tiles(source, target, out, scale_px, merge):
        tiles = [t.repeat(zoom, 0).repeat(zoom, 1) for t in tiles]
        gap = np.full((tiles[0].shape[0], _GAP, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
    gap = np.full((_GAP, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)


def caption(scale_px: float, merge: str = "attention") -> str:
    """What the plain grid shows, for the ``.txt`` beside it."""
    return (f"Columns, left to right: {', '.join(columns(merge))}. One row per (source, target) pair.\n"
            f"Displacements: hue = direction the content moves (red +x/right, yellow-green +y/down, cyan -x, "
            f"violet -y), white = none, full colour = {scale_px:g} px or more.\n"
            + ("Attention: the AU branch's weight in the merge, black 0 (pose decides) to white 1 (AU decides).\n"
               if merge == "attention" else ""))


def _figure(rows: list[list[np.ndarray]], out: TCAEOutput, scale_px: float, arrows: bool, merge: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    titles = columns(merge)
    shown = _displacements(out, merge)
    n, cols = len(rows), len(titles)
    fig, axes = plt.subplots(n, cols + 1, figsize=(1.45 * (cols + 1), 1.5 * n + 0.5), squeeze=False,
                             gridspec_kw={"wspace": 0.05, "hspace": 0.08})
    size = rows[0][0].shape[0]
    step = max(size // 12, 1)
    grid = np.arange(step // 2, size, step)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(tile, interpolation="nearest")
            if arrows and c in shown:
                d = shown[c][r].detach().float().cpu().numpy()
                u, v = d[0][np.ix_(grid, grid)], d[1][np.ix_(grid, grid)]
                # Arrows in pixels at the image's scale: one arrow is the displacement itself.
                ax.quiver(grid, grid, u, v, angles="xy", scale_units="xy", scale=1, color="black", width=0.012)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
        axes[r, cols].axis("off")
    legend = axes[0, cols]
    legend.imshow(colour_wheel(), extent=(-scale_px, scale_px, scale_px, -scale_px))
    legend.axis("on")
    legend.set_xticks([-scale_px, 0, scale_px])
    legend.set_yticks([-scale_px, 0, scale_px])
    legend.tick_params(labelsize=5)
    legend.set_title(f"δ in px\n(full colour ≥ {scale_px:g} px)", fontsize=6)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def write_panel(path: str | Path, source: torch.Tensor, target: torch.Tensor, out: TCAEOutput,
                scale_px: float | None = None, arrows: bool = False, merge: str = "attention") -> np.ndarray:
    """Write the panel of a batch as a PNG (titled with matplotlib, else the plain grid and a ``.txt``
    caption); returns the image written, [H, W, 3] uint8.

    source, target [B, 3, S, S] in [0, 1]; ``out`` = model(source, target);
    ``scale_px``: full-colour displacement in pixels (default :func:`default_scale`);
    ``arrows``: a quiver over each displacement (matplotlib only); ``merge``: the model's
    (``config.merge``), which decides the last column (:func:`columns`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale_px = scale_px or default_scale(source.shape[-1])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        image = make_panel(source, target, out, scale_px, merge=merge)
        path.with_suffix(".txt").write_text(caption(scale_px, merge))
    else:
        image = _figure(_tiles(source, target, out, scale_px, merge), out, scale_px, arrows, merge)
    write_png(path, image)
    return image
