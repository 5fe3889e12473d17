"""Names and the image format that synthetic data, data loading, the probe and the panels share."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

AU_NAMES: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU12", "AU20", "AU26", "AU43")
"""The facial action units the synthetic faces move (FACS numbers)."""
POSE_NAMES: tuple[str, ...] = ("roll", "tx", "ty", "scale", "yaw")
"""Head-pose parameters, in the order of label files and pose arrays (:class:`tcae.synthetic.Pose`)."""
OCCURRENCE_THRESHOLD = 0.5
"""An AU occurs in a frame when its intensity is above this."""


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write ``[H, W, 3]`` uint8 RGB as an 8-bit PNG, with zlib only.

    Rows use PNG's "Sub" filter (difference to the pixel on the left), which
    compresses these smooth drawings well.
    """
    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8, got shape {img.shape}")
    h, w, _ = img.shape
    rows = img.reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 1
    filtered[:, 1:4] = rows[:, :3]
    filtered[:, 4:] = rows[:, 3:] - rows[:, :-3]  # uint8 arithmetic wraps mod 256, as PNG wants

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(filtered.tobytes(), 6)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
