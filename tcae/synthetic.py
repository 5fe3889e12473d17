"""Procedural face videos with ground-truth action units and head pose.

A cartoon face is drawn with signed-distance functions and per-pixel
anti-aliasing, in plain numpy. Each identity (face shape, feature placement,
skin, hair, shirt and background colours) comes from a seed; within a video
seven FACS action units and the head pose move smoothly over time, so pairs of
frames of one track differ by facial actions and head motion, as in VoxCeleb.

Action units (intensity in [0, 1], 0 = neutral):

=====  ======================  ==============================================
AU1    inner brow raiser       inner ends of the brows rise
AU2    outer brow raiser       outer ends of the brows rise
AU4    brow lowerer            brows drop and draw together, glabella lines
AU12   lip corner puller       mouth corners rise and widen, nasolabial folds
AU20   lip stretcher           mouth widens and flattens, lips thin
AU26   jaw drop                mouth opens, lower lip and chin move down
AU43   eyes closed             eye openings close to a lid line
=====  ======================  ==============================================

An AU *occurs* in a frame when its intensity is above
:data:`~tcae.common.OCCURRENCE_THRESHOLD` (0.5).

Two AU styles (``au_style``). ``"drawn"`` (the default) redraws the face's
parts where each AU puts them and draws what real AUs also show: glabella
lines, forehead lines, nasolabial folds, the mouth's interior and teeth.
``"warp"`` draws the neutral face and moves its content by a smooth
displacement per AU (:func:`au_displacement`): the brows' ends as above, the
eye openings squeezed toward their middle line, the lip corners, and the jaw,
which stretches the neutral mouth's thin dark gap into an opening. Nothing
appears that the neutral face does not hold, so every AU change is a warp, as
TCAE assumes: a frame is the AU-free one warped by :func:`au_displacement`,
up to the resampling of a rasterised image.

Head pose (:class:`Pose`): ``roll`` in degrees (positive = clockwise on
screen), ``tx``/``ty`` translation as a fraction of the image size (positive =
right/down), ``scale`` (1 = nominal face size) and ``yaw`` in [-1, 1], a
yaw-like horizontal shift of the inner features (nose and mouth move further
than the eyes, the ears and face outline react the other way), so the face
turns without 3-D geometry.

On disk (:func:`generate_dataset`), the VoxCeleb-like layout
``root/<identity>/<video>/<track>/000000.png ...`` with ``labels.csv`` in
every track folder; :class:`tcae.frames.FramePairDataset` and
:class:`tcae.labels.LabelledFrames` read it.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import AU_NAMES, OCCURRENCE_THRESHOLD, POSE_NAMES, write_png

__all__ = [
    "AU_NAMES",
    "POSE_NAMES",
    "OCCURRENCE_THRESHOLD",
    "IdentityParams",
    "Pose",
    "SyntheticConfig",
    "sample_identity",
    "sample_trajectory",
    "render_frame",
    "au_displacement",
    "AU_STYLES",
    "generate_dataset",
    "write_png",
]

AU_STYLES = ("drawn", "warp")
# The "warp" style's neutral mouth: a dark gap a pixel or more high, which the jaw drop stretches.
_WARP_GAP = 0.03

# Image units per face unit at scale 1: the face fills about two thirds of
# the frame, like a face crop.
_FACE_ZOOM = 1.35

_SKIN_LIGHT = np.array([242.0, 205.0, 178.0])
_SKIN_DARK = np.array([98.0, 64.0, 45.0])
_HAIR_COLOURS = np.array(
    [[28, 24, 24], [70, 45, 30], [115, 80, 50], [205, 170, 110], [150, 65, 35], [165, 160, 160]],
    dtype=np.float64,
)


@dataclass(frozen=True)
class IdentityParams:
    """What stays fixed for one person.

    Lengths are in face coordinates: y points down, the face centre is the
    origin, and at scale 1 the image spans about [-0.74, 0.74] on both axes. Colours are RGB in
    [0, 255].
    """

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    lips: tuple[float, float, float]
    iris: tuple[float, float, float]
    shirt: tuple[float, float, float]
    background: tuple[float, float, float]
    face_rx: float
    face_ry: float
    chin_ry: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_gap: float
    brow_inner: float
    brow_len: float
    brow_th: float
    brow_arch: float
    nose_y: float
    mouth_y: float
    mouth_w: float
    fringe: float
    hair_volume: float
    long_hair: float


@dataclass(frozen=True)
class Pose:
    """Head pose of one frame; units as in the module docstring."""

    roll: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    scale: float = 1.0
    yaw: float = 0.0

    def as_array(self) -> np.ndarray:
        """``[5]`` float64 in :data:`POSE_NAMES` order."""
        return np.array([self.roll, self.tx, self.ty, self.scale, self.yaw])


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of a generated data set.

    ``seed`` fixes everything: identity ``i`` and track ``(i, v, t)`` draw from
    their own generators, so a larger config reproduces a smaller one's
    identities and tracks exactly. ``head_motion`` scales the head's pose
    around neutral (:func:`sample_trajectory`); ``au_style`` is "drawn" or
    "warp" (the module docstring).
    """

    identities: int = 4
    videos_per_identity: int = 2
    frames_per_video: int = 24
    size: int = 64
    seed: int = 0
    tracks_per_video: int = 1
    head_motion: float = 1.0
    au_style: str = "drawn"


def _rgb(c: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(c, 0.0, 255.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def sample_identity(rng: np.random.Generator | int) -> IdentityParams:
    """Draw one identity; an int is used as the seed of a fresh generator."""
    rng = np.random.default_rng(rng)
    skin = _SKIN_LIGHT + rng.uniform(0.0, 1.0) * (_SKIN_DARK - _SKIN_LIGHT) + rng.normal(0, 6, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 8, 3)
    lips = 0.55 * skin + 0.45 * np.array([180.0, 60.0, 70.0]) + rng.normal(0, 6, 3)
    iris = np.array([[60, 40, 25], [40, 80, 120], [70, 100, 60], [30, 25, 20]], dtype=np.float64)[
        rng.integers(4)
    ]
    # Background and shirt: saturated enough to separate from skin and hair.
    hue = rng.uniform(0, 2 * math.pi, 2)
    sat = rng.uniform(40, 90, 2)
    val = rng.uniform(90, 200, 2)
    phases = np.array([0.0, 2.0944, 4.1888])
    background = val[0] + sat[0] * np.cos(hue[0] - phases)
    shirt = val[1] + sat[1] * np.cos(hue[1] - phases)
    face_rx = rng.uniform(0.36, 0.44)
    face_ry = face_rx * rng.uniform(1.22, 1.42)
    return IdentityParams(
        skin=_rgb(skin),
        hair=_rgb(hair),
        lips=_rgb(lips),
        iris=_rgb(iris),
        shirt=_rgb(shirt),
        background=_rgb(background),
        face_rx=face_rx,
        face_ry=face_ry,
        chin_ry=face_ry * rng.uniform(0.9, 1.05),
        eye_dx=face_rx * rng.uniform(0.38, 0.48),
        eye_y=-face_ry * rng.uniform(0.08, 0.18),
        eye_w=face_rx * rng.uniform(0.17, 0.22),
        eye_h=face_rx * rng.uniform(0.09, 0.12),
        brow_gap=face_ry * rng.uniform(0.15, 0.2),
        brow_inner=face_rx * rng.uniform(0.1, 0.18),
        brow_len=face_rx * rng.uniform(0.45, 0.58),
        brow_th=face_rx * rng.uniform(0.1, 0.14),
        brow_arch=face_ry * rng.uniform(0.0, 0.06),
        nose_y=face_ry * rng.uniform(0.22, 0.3),
        mouth_y=face_ry * rng.uniform(0.5, 0.58),
        mouth_w=face_rx * rng.uniform(0.36, 0.48),
        fringe=face_ry * rng.uniform(0.22, 0.4),
        hair_volume=rng.uniform(1.04, 1.2),
        long_hair=float(rng.uniform() < 0.4),
    )


def _smooth_series(rng: np.random.Generator, n: int, channels: int, period: tuple[int, int]) -> np.ndarray:
    """``[n, channels]`` standard-normal-ish signals, C1-smooth in time.

    Gaussian control points every ``period`` frames (drawn per channel),
    joined by cosine interpolation.
    """
    out = np.empty((n, channels))
    t = np.arange(n, dtype=np.float64)
    for c in range(channels):
        step = rng.uniform(*period)
        knots = rng.normal(size=int((n - 1) / step) + 3)
        pos = t / step + rng.uniform()
        k = np.floor(pos).astype(int)
        w = 0.5 - 0.5 * np.cos(math.pi * (pos - k))
        out[:, c] = (1 - w) * knots[k] + w * knots[k + 1]
    return out


def sample_trajectory(n_frames: int, rng: np.random.Generator | int,
                      head_motion: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth AU intensities and head pose for one track.

    Returns ``au`` ``[n_frames, len(AU_NAMES)]`` in [0, 1] (about a third of
    the frames have each AU above the occurrence threshold) and ``pose``
    ``[n_frames, 5]`` in :data:`POSE_NAMES` order and units. ``head_motion``
    scales every pose parameter's spread around the neutral pose (0: a still,
    frontal head; 0.5: about ±7° roll, ±5 % of the frame in translation).

    AUs spend most frames clipped at 0 (neutral) or 1 (fully on) and pass
    quickly through the middle: only about one frame in seven lies in
    0.3–0.7, where a frame's occurrence label is decided by a change too
    small to see.
    """
    rng = np.random.default_rng(rng)
    au = np.clip(0.5 + (_smooth_series(rng, n_frames, len(AU_NAMES), (5, 14)) - 0.4), 0.0, 1.0)
    z = _smooth_series(rng, n_frames, len(POSE_NAMES), (10, 24))
    offset = rng.normal(size=len(POSE_NAMES))
    m = head_motion
    pose = np.stack(
        [
            m * (3.0 * offset[0] + 7.0 * z[:, 0]),
            m * (0.02 * offset[1] + 0.04 * z[:, 1]),
            m * (0.02 * offset[2] + 0.03 * z[:, 2]),
            1.0 + m * (0.03 * offset[3] + 0.05 * z[:, 3]),
            np.clip(m * (0.15 * offset[4] + 0.45 * z[:, 4]), -1.0, 1.0),
        ],
        axis=1,
    )
    return au, pose


# --- signed distances (negative inside) in face coordinates ---------------------


def _ellipse(x: np.ndarray, y: np.ndarray, rx: float | np.ndarray, ry: float | np.ndarray) -> np.ndarray:
    # First-order distance approximation k0 (k0 - 1) / k1: exact on the
    # boundary, which is all the anti-aliasing needs, and stable for thin ellipses.
    # Far from a thin ellipse it underestimates badly (a closed eye's lid
    # line spanned the face); the distance to the bounding box is a lower
    # bound of the true distance that corrects it there.
    u, v = x / rx, y / ry
    k0 = np.sqrt(u * u + v * v)
    k1 = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return np.maximum(k0 * (k0 - 1.0) / np.maximum(k1, 1e-9), np.maximum(np.abs(x) - rx, np.abs(y) - ry))


def _segment(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float], half_width: float
) -> np.ndarray:
    bax, bay = b[0] - a[0], b[1] - a[1]
    pax, pay = x - a[0], y - a[1]
    h = np.clip((pax * bax + pay * bay) / (bax * bax + bay * bay), 0.0, 1.0)
    return np.hypot(pax - h * bax, pay - h * bay) - half_width


def _band(x: np.ndarray, y: np.ndarray, top: np.ndarray, bottom: np.ndarray, x_half: float) -> np.ndarray:
    # Region between two curves y = top(x) <= y <= bottom(x) over |x| < x_half;
    # vertical distance is close enough to Euclidean for these gentle curves.
    return np.maximum(np.maximum(top - y, y - bottom), np.abs(x) - x_half)


class _Canvas:
    """Float RGB image with alpha-composited, anti-aliased shapes."""

    def __init__(self, background: np.ndarray, pixel: float):
        self.img = background
        self.pixel = pixel

    def fill(self, sdf: np.ndarray, colour: np.ndarray | Sequence[float], alpha: float | np.ndarray = 1.0) -> None:
        cov = np.clip(0.5 - sdf / self.pixel, 0.0, 1.0) * alpha
        colour = np.asarray(colour, dtype=np.float32)
        self.img += cov[..., None] * (colour - self.img)


def _au_vector(au: Mapping[str, float] | Sequence[float] | np.ndarray | None) -> dict[str, float]:
    if au is None:
        return dict.fromkeys(AU_NAMES, 0.0)
    if isinstance(au, Mapping):
        unknown = set(au) - set(AU_NAMES)
        if unknown:
            raise ValueError(f"unknown AUs {sorted(unknown)}; known: {AU_NAMES}")
        return {name: float(np.clip(au.get(name, 0.0), 0.0, 1.0)) for name in AU_NAMES}
    values = np.asarray(au, dtype=np.float64).reshape(-1)
    if values.size != len(AU_NAMES):
        raise ValueError(f"expected {len(AU_NAMES)} AU intensities ({AU_NAMES}), got {values.size}")
    return {name: float(np.clip(v, 0.0, 1.0)) for name, v in zip(AU_NAMES, values)}


def _pose(pose: Pose | Sequence[float] | np.ndarray | None) -> Pose:
    if pose is None:
        return Pose()
    if isinstance(pose, Pose):
        return pose
    return Pose(*np.asarray(pose, dtype=np.float64).reshape(-1)[: len(POSE_NAMES)].tolist())


def _face_coords(pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixel centres' image row coordinate ``gy`` in [-1, 1], and their face coordinates ``x, y``
    (translation, roll and scale undone)."""
    g = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    gx, gy = np.meshgrid(g, g)
    theta = math.radians(pose.roll)
    c, s = math.cos(theta), math.sin(theta)
    ux, uy = gx - 2.0 * pose.tx, gy - 2.0 * pose.ty
    zoom = _FACE_ZOOM * pose.scale
    return gy, (c * ux + s * uy) / zoom, (-s * ux + c * uy) / zoom


def _bump(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return np.exp(-((x / sx) ** 2) - (y / sy) ** 2)


def _au_field(p: IdentityParams, a: dict[str, float], x: np.ndarray, y: np.ndarray,
              yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """The "warp" style's motion at face coordinates (x, y), in face units: the pixel there shows the
    neutral face's content from (x − dx, y − dy). Amplitudes match the "drawn" style's parts. Each
    field's slope along its motion stays below 1, so content stretches or squeezes but does not fold."""
    dx, dy = np.zeros_like(x), np.zeros_like(y)
    eyes_dx, mouth_dx = 0.10 * yaw, 0.13 * yaw
    brow_y = p.eye_y - p.brow_gap
    low = p.eye_y + 2.0 * p.eye_h  # below the eye: the skin between it and the brow stretches or squeezes
    for side in (-1.0, 1.0):
        # Brows: the drawn style's motion along the brow, fading past its ends. Above the moved brow the
        # forehead follows, fading over 0.13; below it the skin down to ``low`` moves in proportion.
        bx = side * (x - eyes_dx)
        u = np.clip((bx - p.brow_inner) / p.brow_len, 0.0, 1.0)
        past_end = np.maximum(np.abs(bx - p.brow_inner - 0.5 * p.brow_len) - 0.5 * p.brow_len, 0.0)
        shift = -0.15 * a["AU1"] * (1.0 - u) ** 1.5 - 0.14 * a["AU2"] * u**1.5 + a["AU4"] * (0.09 * (1.0 - u) + 0.03)
        top = brow_y + shift
        profile = np.where(y < top, np.exp(-(((top - y) / 0.13) ** 2)),
                           np.clip((low - y) / np.maximum(low - top, 0.02), 0.0, 1.0))
        window = profile * np.exp(-((past_end / 0.06) ** 2))
        dy += window * shift
        dx -= window * side * 0.05 * a["AU4"] * (1.0 - u)
        # Eyes: content squeezed toward the opening's middle line, 3 × at full AU43.
        ex = side * p.eye_dx + eyes_dx
        dy -= 2.0 * a["AU43"] * (y - p.eye_y) * _bump(x - ex, y - p.eye_y, 1.2 * p.eye_w, 1.5 * p.eye_h)
        # Lip corners: out and up (AU12), out and slightly down (AU20).
        corner = _bump(x - mouth_dx - side * p.mouth_w, y - p.mouth_y, 0.09, 0.09)
        dx += corner * side * p.mouth_w * (0.3 * a["AU12"] + 0.45 * a["AU20"])
        dy += corner * (-0.1 * a["AU12"] + 0.02 * a["AU20"])
    # Jaw: below the mouth everything moves down by 0.085 (at full AU26), which stretches the neutral
    # mouth's dark gap (_WARP_GAP high) to about 4 times its height; the chin drops a further 0.03, and
    # the field fades below it.
    chin = p.chin_ry
    jaw = 0.085 * np.clip((y - p.mouth_y + 0.5 * _WARP_GAP) / (0.085 + _WARP_GAP), 0.0, 1.0) \
        + 0.03 * np.clip((y - p.mouth_y) / (chin - p.mouth_y), 0.0, 1.0)
    fade = np.exp(-(np.maximum(y - chin - 0.12, 0.0) / 0.15) ** 2) * np.clip(1.0 - (x / p.face_rx) ** 2, 0.0, 1.0)
    dy += a["AU26"] * jaw * fade
    return dx, dy


def au_displacement(
    identity: IdentityParams,
    au: Mapping[str, float] | Sequence[float] | np.ndarray | None = None,
    pose: Pose | Sequence[float] | np.ndarray | None = None,
    size: int = 64,
) -> np.ndarray:
    """The displacement δ ``[2, size, size]`` float32 in pixels (channel 0 along x, 1 along y) that
    takes the AU-free frame to the "warp"-style frame with ``au`` at the same ``pose``, in TCAE's
    convention (``tcae_kernels.warp``: the output at x samples the input at x − δ)."""
    pose = _pose(pose)
    _, x, y = _face_coords(pose, size)
    dx, dy = _au_field(identity, _au_vector(au), x, y, pose.yaw)
    theta = math.radians(pose.roll)
    c, s = math.cos(theta), math.sin(theta)
    # Face units → image units (rotate back, zoom) → pixels (the image spans 2 units).
    k = _FACE_ZOOM * pose.scale * size / 2.0
    return np.stack([k * (c * dx - s * dy), k * (s * dx + c * dy)]).astype(np.float32)


def render_frame(
    identity: IdentityParams,
    au: Mapping[str, float] | Sequence[float] | np.ndarray | None = None,
    pose: Pose | Sequence[float] | np.ndarray | None = None,
    size: int = 64,
    au_style: str = "drawn",
) -> np.ndarray:
    """Draw one frame.

    ``au``: intensities in [0, 1], a mapping by name (missing = 0) or a
    sequence in :data:`AU_NAMES` order; ``pose``: a :class:`Pose` or 5 numbers
    in :data:`POSE_NAMES` order; ``au_style``: "drawn" or "warp" (the module
    docstring). Returns ``[size, size, 3]`` uint8 RGB.
    Deterministic: no randomness at render time.
    """
    if au_style not in AU_STYLES:
        raise ValueError(f"au_style must be one of {AU_STYLES}, got {au_style!r}")
    a = _au_vector(au)
    pose = _pose(pose)
    p = identity
    gy, x, y = _face_coords(pose, size)
    zoom = _FACE_ZOOM * pose.scale
    if au_style == "warp":
        dx, dy = _au_field(p, a, x, y, pose.yaw)
        x, y = x - dx, y - dy
        a = _au_vector(None)

    skin = np.array(p.skin, dtype=np.float32)
    # The background stays put while the head moves: a vertical gradient.
    bg = np.array(p.background, dtype=np.float32) * (1.12 - 0.24 * (gy[..., None] + 1.0) / 2.0)
    cv = _Canvas(bg, pixel=2.0 / (size * zoom))

    yaw = pose.yaw
    eyes_dx = 0.10 * yaw  # inner features shift with yaw, the nose and mouth most
    nose_dx = 0.17 * yaw
    mouth_dx = 0.13 * yaw
    rx = p.face_rx * (1.0 - 0.06 * abs(yaw))

    # Hair behind the head, torso, neck, ears.
    hair = np.array(p.hair, dtype=np.float32)
    back_hair = _ellipse(x, y + 0.08, p.face_rx * p.hair_volume + 0.02, p.face_ry * p.hair_volume)
    if p.long_hair:
        long_half = p.face_rx * p.hair_volume + 0.02
        down_to_shoulders = _band(x, y, np.zeros_like(y), np.full_like(y, p.face_ry * 1.15), long_half)
        back_hair = np.minimum(back_hair, down_to_shoulders)
    cv.fill(back_hair, hair)
    cv.fill(_ellipse(x, y - (p.face_ry + 0.62), 0.95, 0.48), p.shirt)
    cv.fill(_band(x, y, np.full_like(y, 0.2), np.full_like(y, p.face_ry + 0.25), 0.42 * p.face_rx), skin * 0.82)
    for side in (-1.0, 1.0):
        ear_x = side * (rx + 0.01) - 0.05 * yaw
        cv.fill(_ellipse(x - ear_x, y - (p.eye_y + 0.06), 0.055, 0.1), skin * 0.9)

    # Face: upper half-ellipse plus a lower one that jaw drop lengthens; shading
    # darkens the side turned away.
    chin = p.chin_ry + 0.12 * a["AU26"]
    face = _ellipse(x, y, rx, np.where(y < 0, p.face_ry, chin))
    shade = 1.0 - 0.22 * np.clip(((x - 0.4 * yaw * rx) / rx) ** 2, 0.0, 1.0)
    cv.fill(face, skin * shade[..., None])

    brow_y = p.eye_y - p.brow_gap
    # Forehead lines come with raised brows.
    lift = max(a["AU1"], a["AU2"])
    for k in (1, 2):
        ly = brow_y - 0.045 * k - 0.06 * lift
        curve = ly + 0.05 * (x - eyes_dx) ** 2
        line = _band(x - eyes_dx, y, curve - 0.006, curve + 0.006, 0.16)
        cv.fill(line, skin * 0.7, alpha=np.clip((lift - 0.3) / 0.5, 0.0, 1.0))

    # Fringe: the face region above a hairline that dips at the temples.
    hairline = -p.face_ry + p.fringe + 0.25 * (x / rx) ** 2 - 0.04 * np.cos(9.0 * x)
    cv.fill(np.maximum(face, y - hairline), hair)

    # Eyes: socket shadow, opening (sclera), iris and pupil clipped to the
    # opening, a dark upper lid line that remains when the eye closes.
    open_h = max(p.eye_h * (1.0 - a["AU43"]) * (1.0 + 0.15 * lift), 0.004)
    for side in (-1.0, 1.0):
        ex, ey = side * p.eye_dx + eyes_dx, p.eye_y
        dx, dy = x - ex, y - ey
        cv.fill(_ellipse(dx, dy + 0.01, p.eye_w * 1.25, p.eye_h * 1.6), skin * 0.86)
        opening = _ellipse(dx, dy, p.eye_w, open_h)
        cv.fill(opening, (236.0, 234.0, 228.0))
        iris_x = dx - 0.03 * yaw
        cv.fill(np.maximum(opening, np.hypot(iris_x, dy) - p.eye_h * 0.95), p.iris)
        cv.fill(np.maximum(opening, np.hypot(iris_x, dy) - p.eye_h * 0.45), (12.0, 10.0, 10.0))
        lid = np.maximum(np.abs(opening) - 0.009, dy - 0.25 * open_h)
        cv.fill(lid, (35.0, 25.0, 25.0))

    # Brows: arched thick curves; AU1 lifts the inner ends, AU2 the outer ends,
    # AU4 lowers them (the inner ends most) and pulls them together.
    inner = p.brow_inner - 0.05 * a["AU4"]
    for side in (-1.0, 1.0):
        bx = side * (x - eyes_dx)
        u = np.clip((bx - inner) / p.brow_len, 0.0, 1.0)
        centre = (
            brow_y
            - p.brow_arch * 4.0 * u * (1.0 - u)
            - 0.15 * a["AU1"] * (1.0 - u) ** 1.5
            - 0.14 * a["AU2"] * u**1.5
            + a["AU4"] * (0.09 * (1.0 - u) + 0.03)
        )
        half = 0.5 * p.brow_th * (1.0 - 0.45 * u)
        brow = np.maximum(np.abs(y - centre) - half, np.abs(bx - inner - 0.5 * p.brow_len) - 0.5 * p.brow_len)
        cv.fill(brow, hair * 0.7)
    for side in (-1.0, 1.0):
        gx0 = eyes_dx + side * 0.022
        furrow = _segment(x, y, (gx0, brow_y - 0.01), (gx0 + side * 0.006, brow_y + 0.07), 0.006)
        cv.fill(furrow, skin * 0.62, alpha=np.clip(a["AU4"] / 0.6, 0.0, 1.0))

    # Nose: a shadow along the bridge, a tip and two nostrils.
    bridge = _segment(x, y, (nose_dx * 0.6 + 0.025, p.eye_y + 0.03), (nose_dx + 0.03, p.nose_y - 0.03), 0.008)
    cv.fill(bridge, skin * 0.8)
    cv.fill(_ellipse(x - nose_dx, y - p.nose_y, 0.065, 0.04), skin * 0.9)
    for side in (-1.0, 1.0):
        cv.fill(_ellipse(x - nose_dx - side * 0.032, y - p.nose_y - 0.018, 0.02, 0.011), skin * 0.45)

    # Mouth: opening between two parabolas, lips as bands around it.
    half_w = p.mouth_w * (1.0 + 0.45 * a["AU20"] + 0.3 * a["AU12"])
    my = p.mouth_y + 0.07 * a["AU26"]
    corner = -0.1 * a["AU12"] + 0.02 * a["AU20"]
    gap = (_WARP_GAP if au_style == "warp" else 0.01) + 0.17 * a["AU26"] + 0.035 * a["AU12"]
    mx = x - mouth_dx
    xn2 = np.clip((mx / half_w) ** 2, 0.0, 1.0)
    bow = 1.0 - xn2
    top = my - 0.5 * gap * bow + corner * xn2
    bottom = my + 0.5 * gap * bow + corner * xn2
    thin = 1.0 - 0.45 * a["AU20"]

    # Nasolabial folds deepen with a smile.
    for side in (-1.0, 1.0):
        cx = mouth_dx + side * (half_w + 0.035)
        start = (nose_dx + side * 0.085, p.nose_y + 0.005)
        fold = _segment(x, y, start, (cx, my + corner - 0.01), 0.006)
        cv.fill(fold, skin * 0.7, alpha=np.clip((a["AU12"] - 0.2) / 0.5, 0.0, 1.0))

    cv.fill(_band(mx, y, top, bottom, half_w), (70.0, 22.0, 28.0))
    if au_style == "drawn":  # teeth
        cv.fill(np.maximum(_band(mx, y, top, bottom, half_w), y - (top + 0.03 * bow)), (238.0, 236.0, 225.0))
    lips = np.array(p.lips, dtype=np.float32)
    cv.fill(_band(mx, y, top - 0.03 * thin * np.sqrt(bow), top, half_w), lips)
    cv.fill(_band(mx, y, bottom, bottom + 0.04 * thin * np.sqrt(bow), half_w), lips * 1.05)

    return np.clip(cv.img + 0.5, 0.0, 255.0).astype(np.uint8)


def _write_labels(path: Path, au: np.ndarray, pose: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", *AU_NAMES, *(f"{n}_occ" for n in AU_NAMES), *POSE_NAMES])
        for t in range(au.shape[0]):
            occ = (au[t] > OCCURRENCE_THRESHOLD).astype(int)
            writer.writerow([t, *(f"{v:.4f}" for v in au[t]), *occ.tolist(), *(f"{v:.5f}" for v in pose[t])])


def generate_dataset(root: str | Path, config: SyntheticConfig = SyntheticConfig()) -> dict:
    """Render a data set to ``root/<identity>/<video>/<track>/``.

    Folder names are ``id0000`` / ``vid00`` / ``track0``; frames are
    ``000000.png ...``; ``labels.csv`` per track has columns ``frame`` (the
    frame number of the file name), the AU intensities (``AU1`` ...), the
    occurrences (``AU1_occ`` ..., 1 where intensity > 0.5) and the pose
    (``roll, tx, ty, scale, yaw``). Existing files are overwritten.

    Returns a summary: ``root``, counts of ``identities``, ``videos``,
    ``tracks`` and ``frames``, ``au_names``, ``au_style``, ``occurrence_rate`` (fraction of
    frames in which each AU occurs) and ``seconds``.
    """
    if min(config.identities, config.videos_per_identity, config.tracks_per_video, config.frames_per_video) < 1:
        raise ValueError(f"every count in {config} must be at least 1")
    if not config.head_motion >= 0:
        raise ValueError(f"head_motion must be non-negative, got {config.head_motion}")
    if config.au_style not in AU_STYLES:
        raise ValueError(f"au_style must be one of {AU_STYLES}, got {config.au_style!r}")
    if config.size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {config.size}")
    start = time.perf_counter()
    root = Path(root)
    all_au = []
    tracks = 0
    for i in range(config.identities):
        identity = sample_identity(np.random.default_rng([config.seed, 0, i]))
        for v in range(config.videos_per_identity):
            for t in range(config.tracks_per_video):
                folder = root / f"id{i:04d}" / f"vid{v:02d}" / f"track{t}"
                folder.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng([config.seed, 1, i, v, t])
                au, pose = sample_trajectory(config.frames_per_video, rng, config.head_motion)
                for f in range(config.frames_per_video):
                    write_png(folder / f"{f:06d}.png", render_frame(identity, au[f], pose[f], config.size,
                                                                          config.au_style))
                _write_labels(folder / "labels.csv", au, pose)
                all_au.append(au)
                tracks += 1
    au_all = np.concatenate(all_au)
    return {
        "root": str(root),
        "identities": config.identities,
        "videos": config.identities * config.videos_per_identity,
        "tracks": tracks,
        "frames": int(au_all.shape[0]),
        "au_names": list(AU_NAMES),
        "au_style": config.au_style,
        "occurrence_rate": {n: float(r) for n, r in zip(AU_NAMES, (au_all > OCCURRENCE_THRESHOLD).mean(axis=0))},
        "seconds": time.perf_counter() - start,
    }
