"""Labelled frames for the AU probe: per-track label CSVs (AU occurrence, intensity, head pose)."""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import POSE_NAMES
from .errors import DataError
from .frames import (
    _LAYOUT,
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    _CountsSkippedFrames,
    _decoder,
    _read_frame,
    _scan_tracks,
    _SkipCounter,
    _to_tensor,
    _Track,
)

__all__ = ["LabelledFrames"]

_AU_COLUMN = re.compile(r"^au_?0*(\d+)(_occ)?$", re.IGNORECASE)


def _au_name(number: int) -> str:
    return f"AU{number}"


def _label_file(folder: Path) -> Path | None:
    preferred = folder / "labels.csv"
    if preferred.is_file():
        return preferred
    csvs = sorted(p for p in folder.glob("*.csv") if p.is_file())
    if len(csvs) > 1:
        message = f"{folder}: several CSV files, none named labels.csv; track ignored"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return csvs[0] if len(csvs) == 1 else None


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class _LabelTable:
    occurrence: dict[str, dict[str, float]]  # frame key -> AU name -> 0/1 (NaN = not coded)
    intensity: dict[str, dict[str, float]] | None
    pose: dict[str, list[float]] | None
    aus: list[str]


def _read_labels(path: Path) -> _LabelTable:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"label file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"label file {path} is not a readable CSV: {e}") from None
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if "frame" not in lower:
        raise DataError(f"{path} has no 'frame' column (header: {header})")
    frame_col = lower.index("frame")
    plain: dict[str, int] = {}
    occ_cols: dict[str, int] = {}
    for col, name in enumerate(header):
        m = _AU_COLUMN.match(name)
        if m:
            (occ_cols if m.group(2) else plain)[_au_name(int(m.group(1)))] = col
    if not plain and not occ_cols:
        raise DataError(f"{path} has no AU columns like AU1 / AU01 (header: {header})")
    # With explicit *_occ columns, the plain AU columns are intensities (our
    # synthetic format); without, they are the 0/1 occurrences (BP4D/DISFA style).
    occ_source = occ_cols if occ_cols else plain
    intensity_source = plain if occ_cols else None
    pose_cols = [lower.index(p) for p in POSE_NAMES] if all(p in lower for p in POSE_NAMES) else None

    occurrence, intensity, pose = {}, ({} if intensity_source else None), ({} if pose_cols else None)
    for row in rows[1:]:
        if len(row) < len(header) or not row[frame_col].strip():
            continue
        key = _frame_key(row[frame_col].strip())
        occurrence[key] = {}
        for au, col in occ_source.items():
            v = _float_or_nan(row[col])
            occurrence[key][au] = v if v in (0.0, 1.0) else math.nan  # e.g. BP4D's 9 = not coded
        if intensity is not None:
            intensity[key] = {au: _float_or_nan(row[col]) for au, col in intensity_source.items()}
        if pose is not None:
            pose[key] = [_float_or_nan(row[c]) for c in pose_cols]
    return _LabelTable(occurrence, intensity, pose, sorted(occ_source, key=lambda a: int(a[2:])))


def _frame_key(text: str) -> str:
    """Frame numbers match by value (``12`` = ``000012.png``), other names by stem."""
    stem = Path(text).stem if Path(text).suffix.lower() in IMAGE_EXTENSIONS else text
    return str(int(stem)) if stem.isdigit() else stem


class LabelledFrames(_CountsSkippedFrames, Dataset):
    """Single frames with per-frame AU labels, for the AU-detection probe.

    Every track folder (layout as in the module docstring) with a label CSV
    contributes the frames its CSV names: ``labels.csv`` if present, else the
    folder's only ``*.csv``. Accepted CSV format:

    - a ``frame`` column: a frame number, matched by value to file names of
      digits (``12`` matches ``000012.png``), or a file name / stem;
    - AU columns named ``AU<n>`` with any zero padding (``AU1``, ``AU01``);
    - either (BP4D/DISFA style) the AU columns hold occurrence 0/1, any other
      value (BP4D's 9, blank) meaning "not coded";
    - or (synthetic, :mod:`tcae.synthetic`) ``AU<n>_occ`` columns hold the
      occurrence and ``AU<n>`` the intensity in [0, 1];
    - optional pose columns ``roll, tx, ty, scale, yaw``.

    Frames without a row, and rows without a frame, are left out.

    Items are dicts: ``image`` ``[3, size, size]`` float32 in [-1, 1];
    ``au_occurrence`` ``[K]`` float32 0/1 (0 where not coded); ``au_valid``
    ``[K]`` bool; ``au_intensity`` ``[K]`` float32 (only when every track has
    intensities); ``pose`` ``[5]`` float32 (only when every track has pose);
    ``identity`` and ``track`` strings; ``frame`` the file name. ``K`` AUs
    are ``au_names``: the given list, else every AU any CSV has, by number;
    an AU missing from a track's CSV is not coded there.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        identities: Sequence[str] | None = None,
        au_names: Sequence[str] | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.root = Path(root)
        self.size = size
        self.max_pixels = max_pixels
        self._decode = _decoder()
        self._skipped = _SkipCounter()
        labelled: list[tuple[_Track, _LabelTable]] = []
        for track in _scan_tracks(root, identities, self._skipped):
            path = _label_file(track.folder)
            if path is not None:
                labelled.append((track, _read_labels(path)))
        if not labelled:
            raise DataError(f"no label CSV next to the frames under {root} (expected {_LAYOUT} and labels.csv)")
        if au_names is None:
            names = sorted({a for _, table in labelled for a in table.aus}, key=lambda a: int(a[2:]))
        else:
            names = []
            for a in au_names:
                m = _AU_COLUMN.match(a)
                if not m or m.group(2):
                    raise ValueError(f"AU names look like 'AU12' or 'AU01', got {a!r}")
                names.append(_au_name(int(m.group(1))))
        self.au_names = names
        self.has_intensity = all(t.intensity is not None for _, t in labelled)
        self.has_pose = all(t.pose is not None for _, t in labelled)

        self._items: list[tuple[_Track, Path, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        for track, table in labelled:
            for frame in track.frames:
                key = _frame_key(frame.stem)
                if key not in table.occurrence:
                    continue
                occ = np.array([table.occurrence[key].get(a, math.nan) for a in names], dtype=np.float32)
                inten = (
                    np.array([table.intensity[key].get(a, math.nan) for a in names], dtype=np.float32)
                    if self.has_intensity
                    else None
                )
                pose = np.array(table.pose[key], dtype=np.float32) if self.has_pose else None
                self._items.append((track, frame, occ, inten, pose))
        if not self._items:
            raise DataError(f"no frame under {root} matches a row of its label CSV")
        self.identities = sorted({t.identity for t, *_ in self._items})

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        # An unreadable frame hands over to the next item, labels and all.
        for step in range(len(self._items)):
            track, frame, occ, inten, pose = self._items[(i + step) % len(self._items)]
            if frame in self._skipped:
                continue
            img = _read_frame(frame, self._decode, self.max_pixels)
            if isinstance(img, str):
                self._skipped.add(frame, img)
                continue
            valid = ~np.isnan(occ)
            item = {
                "image": _to_tensor(img, self.size),
                "au_occurrence": torch.from_numpy(np.where(valid, occ, 0.0).astype(np.float32)),
                "au_valid": torch.from_numpy(valid),
                "identity": track.identity,
                "track": track.key,
                "frame": frame.name,
            }
            if inten is not None:
                item["au_intensity"] = torch.from_numpy(inten)
            if pose is not None:
                item["pose"] = torch.from_numpy(pose)
            return item
        raise DataError(f"no labelled frame under {self.root} is readable: {self.skipped_frames} found unreadable, "
                        f"the first {self._skipped.paths[0]}")
