"""Data for the TCAE: frame pairs, labelled frames, and face crops from videos.

Folder layout (VoxCeleb-like, also what :func:`prepare_videos` and
:func:`tcae.synthetic.generate_dataset` write)::

    root/<identity>/<video>/<track>/000000.png     (or .jpg / .jpeg)
                                   /000001.png ...
                                   /labels.csv     (optional, see LabelledFrames)

A *track* is one continuous shot of one face; TCAE's source and target frames
come from the same track. Frames are ordered by file name.

Images come out as float32 tensors ``[3, size, size]``, RGB, scaled from
[0, 255] to [-1, 1] (``x / 127.5 - 1``), the range of the decoder's tanh.
Non-square frames are centre-cropped to a square (faces are not stretched),
then resized with an antialiased bilinear filter.

Frames are decoded with OpenCV when it is installed, else Pillow. A frame that
cannot be decoded is skipped with a warning, counted (``skipped_frames``) and
replaced by another frame of the same track; it never stops an epoch. With
``DataLoader(num_workers > 0)`` each worker process counts its own skips.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tcae.synthetic import POSE_NAMES

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FramePairDataset",
    "LabelledFrames",
    "list_identities",
    "split_identities",
    "load_image",
    "haar_face_detector",
    "yunet_face_detector",
    "prepare_videos",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_LAYOUT = "root/<identity>/<video>/<track>/<frame>.png|jpg"


# --- decoding ------------------------------------------------------------------


def _optional_cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _decode_cv2(path: Path) -> np.ndarray | None:
    import cv2

    try:
        buf = np.fromfile(path, dtype=np.uint8)  # fromfile + imdecode: no trouble with non-ASCII paths
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except (OSError, cv2.error):
        return None
    return None if img is None else np.ascontiguousarray(img[..., ::-1])


def _decode_pil(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy wants one
    except (OSError, ValueError, SyntaxError):  # Pillow's errors for truncated, unknown and malformed files
        return None


def _decoder() -> Callable[[Path], np.ndarray | None]:
    """A function path -> ``[H, W, 3]`` uint8 RGB, or None when undecodable.

    Module-level functions, so datasets holding one still pickle for
    DataLoader workers started with "spawn".
    """
    if _optional_cv2() is not None:
        return _decode_cv2
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "reading frames needs OpenCV or Pillow: pip install 'tcae-kernels[video]' (or pillow)"
        ) from e
    return _decode_pil


def _to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, size, size]`` float32 in [-1, 1]."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.ascontiguousarray(img[top : top + side, left : left + side])).permute(2, 0, 1).float()
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    # Resampling can land a hair outside [0, 255]; keep the documented range exact.
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read one frame as ``[3, size, size]`` float32 in [-1, 1].

    Raises ``ValueError`` when the file cannot be decoded.
    """
    img = _decoder()(Path(path))
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return _to_tensor(img, size)


# --- folder scanning -----------------------------------------------------------


@dataclass
class _Track:
    identity: str
    video: str
    name: str
    folder: Path
    frames: list[Path]

    @property
    def key(self) -> str:
        return f"{self.identity}/{self.video}/{self.name}"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data directory {root} does not exist (expected layout {_LAYOUT})")
    if not root.is_dir():
        raise NotADirectoryError(f"data root {root} is not a directory (expected layout {_LAYOUT})")
    return root


def list_identities(root: str | Path) -> list[str]:
    """Sorted identity folder names under ``root``."""
    return [p.name for p in _subdirs(_check_root(root))]


def _scan_tracks(root: str | Path, identities: Sequence[str] | None) -> list[_Track]:
    root = _check_root(root)
    available = list_identities(root)
    if identities is None:
        chosen = available
    else:
        missing = sorted(set(identities) - set(available))
        if missing:
            raise ValueError(f"identities {missing} not found under {root}")
        chosen = sorted(set(identities))
    tracks = []
    for identity in chosen:
        for video in _subdirs(root / identity):
            for track in _subdirs(video):
                frames = sorted(p for p in track.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
                if frames:
                    tracks.append(_Track(identity, video.name, track.name, track, frames))
    if not tracks:
        raise ValueError(f"no frames found under {root}: expected {_LAYOUT}")
    return tracks


class _SkipCounter:
    """Frames found undecodable in this process; each warns once."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._seen: set[Path] = set()

    def __contains__(self, path: Path) -> bool:
        return path in self._seen

    def add(self, path: Path) -> None:
        if path not in self._seen:
            self._seen.add(path)
            self.paths.append(path)
            warnings.warn(f"skipping unreadable frame {path}", RuntimeWarning, stacklevel=3)


# --- frame pairs for self-supervised training ----------------------------------


class FramePairDataset(Dataset):
    """(source, target) frame pairs from the same track, for TCAE training.

    Each epoch holds ``pairs_per_track`` pairs per track: the source frame is
    uniform over the track, the target uniform over the track's other frames,
    or over those at most ``max_offset`` frames (in file order) away. The pairs
    depend only on ``seed`` and the epoch (:meth:`set_epoch`, like
    ``DistributedSampler``), so runs are reproducible.

    ``verify=True`` decodes every frame up front and drops unreadable ones
    (slow on large sets); otherwise they are found, counted and replaced when
    first loaded. Tracks with fewer than two frames are dropped.

    Items are dicts: ``source`` and ``target`` ``[3, size, size]`` float32 in
    [-1, 1]; ``identity``, ``video``, ``track`` (``identity/video/track``)
    strings; ``source_index`` and ``target_index``, positions of the frames
    in their track's sorted file list (after any replacement).

    Raises ``FileNotFoundError`` for a missing root, ``ValueError`` when no
    track has two frames.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        identities: Sequence[str] | None = None,
        pairs_per_track: int = 10,
        max_offset: int | None = None,
        seed: int = 0,
        verify: bool = False,
    ):
        if pairs_per_track < 1:
            raise ValueError(f"pairs_per_track must be at least 1, got {pairs_per_track}")
        if max_offset is not None and max_offset < 1:
            raise ValueError(f"max_offset must be at least 1 or None, got {max_offset}")
        self.root = Path(root)
        self.size = size
        self.pairs_per_track = pairs_per_track
        self.max_offset = max_offset
        self.seed = seed
        self._decode = _decoder()
        self._skipped = _SkipCounter()
        tracks = _scan_tracks(root, identities)
        if verify:
            for track in tracks:
                for path in track.frames:
                    if self._decode(path) is None:
                        self._skipped.add(path)
                track.frames = [p for p in track.frames if p not in self._skipped]
        self.tracks = [t for t in tracks if len(t.frames) >= 2]
        if not self.tracks:
            raise ValueError(f"no track under {root} has two readable frames (expected {_LAYOUT})")
        self.identities = sorted({t.identity for t in self.tracks})
        self.set_epoch(0)

    @property
    def skipped_frames(self) -> int:
        """Number of distinct frames found unreadable so far in this process."""
        return len(self._skipped.paths)

    @property
    def skipped_paths(self) -> list[Path]:
        return list(self._skipped.paths)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's pairs from ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, epoch])
        pairs = []
        for ti, track in enumerate(self.tracks):
            n = len(track.frames)
            src = rng.integers(n, size=self.pairs_per_track)
            m = n - 1 if self.max_offset is None else min(self.max_offset, n - 1)
            lo = np.maximum(src - m, 0)
            hi = np.minimum(src + m, n - 1)
            # Uniform over [lo, hi] without src: draw from hi - lo slots, step over src.
            k = lo + (rng.random(self.pairs_per_track) * (hi - lo)).astype(np.int64)
            tgt = k + (k >= src)
            pairs.extend((ti, int(s), int(t)) for s, t in zip(src, tgt))
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def _load(self, track: _Track, index: int, avoid: int) -> tuple[torch.Tensor, int] | None:
        # The requested frame, else the next readable one of the track (cyclic), never `avoid`.
        n = len(track.frames)
        for step in range(n):
            j = (index + step) % n
            path = track.frames[j]
            if j == avoid or path in self._skipped:
                continue
            img = self._decode(path)
            if img is not None:
                return _to_tensor(img, self.size), j
            self._skipped.add(path)
        return None

    def __getitem__(self, i: int) -> dict:
        ti, s, t = self._pairs[i]
        # A track without two readable frames hands over to the next track.
        for step in range(len(self.tracks)):
            track = self.tracks[(ti + step) % len(self.tracks)]
            source = self._load(track, s % len(track.frames), avoid=-1)
            if source is None:
                continue
            target = self._load(track, t % len(track.frames), avoid=source[1])
            if target is None:
                continue
            return {
                "source": source[0],
                "target": target[0],
                "identity": track.identity,
                "video": track.video,
                "track": track.key,
                "source_index": source[1],
                "target_index": target[1],
            }
        raise RuntimeError(f"no track under {self.root} has two readable frames any more")


# --- labelled frames for the AU probe ------------------------------------------

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
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if "frame" not in lower:
        raise ValueError(f"{path} has no 'frame' column (header: {header})")
    frame_col = lower.index("frame")
    plain: dict[str, int] = {}
    occ_cols: dict[str, int] = {}
    for col, name in enumerate(header):
        m = _AU_COLUMN.match(name)
        if m:
            (occ_cols if m.group(2) else plain)[_au_name(int(m.group(1)))] = col
    if not plain and not occ_cols:
        raise ValueError(f"{path} has no AU columns like AU1 / AU01 (header: {header})")
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


class LabelledFrames(Dataset):
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
    ):
        self.root = Path(root)
        self.size = size
        self._decode = _decoder()
        self._skipped = _SkipCounter()
        labelled: list[tuple[_Track, _LabelTable]] = []
        for track in _scan_tracks(root, identities):
            path = _label_file(track.folder)
            if path is not None:
                labelled.append((track, _read_labels(path)))
        if not labelled:
            raise ValueError(f"no label CSV next to the frames under {root} (expected {_LAYOUT} and labels.csv)")
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
            raise ValueError(f"no frame under {root} matches a row of its label CSV")
        self.identities = sorted({t.identity for t, *_ in self._items})

    @property
    def skipped_frames(self) -> int:
        """Number of distinct frames found unreadable so far in this process."""
        return len(self._skipped.paths)

    @property
    def skipped_paths(self) -> list[Path]:
        return list(self._skipped.paths)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        # An unreadable frame hands over to the next item, labels and all.
        for step in range(len(self._items)):
            track, frame, occ, inten, pose = self._items[(i + step) % len(self._items)]
            if frame in self._skipped:
                continue
            img = self._decode(frame)
            if img is None:
                self._skipped.add(frame)
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
        raise RuntimeError(f"no readable labelled frame left under {self.root}")


def split_identities(
    identities: Sequence[str], held_out: float | int = 0.25, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split identities into (train, held-out), both sorted, reproducibly.

    ``held_out``: a fraction in (0, 1) (rounded, at least one identity on each
    side) or a count.
    """
    ids = sorted(set(identities))
    if len(ids) < 2:
        raise ValueError(f"need at least two identities to split, got {ids}")
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out fraction must be in (0, 1), got {held_out}")
        n = min(max(round(held_out * len(ids)), 1), len(ids) - 1)
    else:
        n = int(held_out)
        if not 1 <= n < len(ids):
            raise ValueError(f"held_out count must be in [1, {len(ids) - 1}], got {held_out}")
    order = np.random.default_rng(seed).permutation(len(ids))
    test = sorted(ids[j] for j in order[:n])
    return [i for i in ids if i not in test], test


# --- videos -> face-crop tracks ------------------------------------------------

FaceDetector = Callable[[np.ndarray], Sequence[Sequence[float]]]
"""Takes an ``[H, W, 3]`` uint8 RGB frame, returns face boxes ``(x, y, w, h)`` in pixels."""


def _require_cv2():
    cv2 = _optional_cv2()
    if cv2 is None:
        raise ImportError("preparing videos needs OpenCV: pip install 'tcae-kernels[video]'")
    return cv2


def _find_haar_cascade(cv2) -> Path | None:
    name = "haarcascade_frontalface_default.xml"
    data = getattr(cv2, "data", None)
    if data is not None and (Path(data.haarcascades) / name).is_file():
        return Path(data.haarcascades) / name
    return next(Path(cv2.__file__).parent.rglob(name), None)


def haar_face_detector(min_size: float = 0.1) -> FaceDetector:
    """OpenCV's frontal-face Haar cascade (bundled with OpenCV 4).

    ``min_size``: smallest face side as a fraction of the frame's shorter
    side. Frames are searched at most 480 pixels on the long side, which keeps
    detection fast on HD video; boxes come back in full-frame pixels.

    Raises ``RuntimeError`` when this OpenCV has no cascade: OpenCV 5 moved
    ``CascadeClassifier`` and its XML files out of the main package.
    """
    cv2 = _require_cv2()
    xml = _find_haar_cascade(cv2) if hasattr(cv2, "CascadeClassifier") else None
    if xml is None:
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no Haar face cascade (OpenCV 5 dropped CascadeClassifier and "
            "its cascades from the main package). Install OpenCV 4: pip install 'opencv-python-headless>=4.5,<5', "
            "or pass detector=yunet_face_detector('face_detection_yunet_2023mar.onnx') with a YuNet model file"
        )
    cascade = cv2.CascadeClassifier(str(xml))

    def detect(frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        factor = min(1.0, 480.0 / max(h, w))
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if factor < 1.0:
            gray = cv2.resize(gray, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        smallest = max(int(min_size * min(gray.shape)), 20)
        boxes = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / factor

    return detect


def yunet_face_detector(model: str | Path, score_threshold: float = 0.7) -> FaceDetector:
    """OpenCV's YuNet CNN face detector (``cv2.FaceDetectorYN``) from an ONNX file.

    Works with OpenCV 4.8+ and 5; the model file (e.g.
    ``face_detection_yunet_2023mar.onnx`` from the OpenCV model zoo) is not
    shipped with OpenCV and must be supplied.
    """
    cv2 = _require_cv2()
    if not Path(model).is_file():
        raise FileNotFoundError(f"YuNet model {model} not found")
    net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold)

    def detect(frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        net.setInputSize((w, h))
        _, faces = net.detect(np.ascontiguousarray(frame[..., ::-1]))
        return np.zeros((0, 4)) if faces is None else np.asarray(faces[:, :4], dtype=np.float64)

    return detect


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def _crop_square(cv2, frame: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    half = side / 2.0
    x0, y0 = int(round(cx - half)), int(round(cy - half))
    x1, y1 = x0 + int(round(side)), y0 + int(round(side))
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        # Faces near the frame edge: repeat border pixels rather than shrink the crop.
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    crop = frame[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def _video_paths(videos: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(videos, (str, Path)):
        videos = Path(videos)
        if videos.is_dir():
            found = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
            if not found:
                raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {videos}")
            return found
        return [videos]
    return [Path(v) for v in videos]


def prepare_videos(
    videos: str | Path | Sequence[str | Path],
    out_root: str | Path,
    size: int = 256,
    every_nth: int = 1,
    margin: float = 0.3,
    smoothing: float = 0.6,
    detector: FaceDetector | None = None,
) -> dict:
    """Cut face-crop tracks out of videos, in the layout the datasets read.

    ``videos``: video files, or a directory searched recursively. Every
    ``every_nth`` frame is decoded (``cv2.VideoCapture``; the others are only
    grabbed), the face found by
    ``detector`` (default :func:`haar_face_detector`; with several faces, the
    one overlapping the previous face most, else the largest), and a square
    crop written to ``out_root/<stem>/<stem>/track<k>/<frame>.png``, size
    ``size`` pixels, ``<frame>`` the 6-digit frame number in the video. The
    crop side is the face box side times ``1 + 2 * margin``; its centre and
    side are smoothed over time with an exponential moving average
    (``smoothing`` = weight of the past, 0 = none) so crops do not jitter. A
    face that jumps (IoU < 0.3 with the previous box, e.g. a cut) starts a new
    track. Frames without a face are skipped and counted; a video that
    cannot be opened or yields no frame is skipped with a warning and counted.

    Returns a summary: ``videos_ok``, ``videos_failed``, ``failed`` (paths),
    ``frames_read`` (all frames gone through), ``frames_sampled`` (decoded and searched),
    ``frames_without_face``, ``frames_written``, ``tracks``, ``out_root``.
    """
    cv2 = _require_cv2()
    if every_nth < 1:
        raise ValueError(f"every_nth must be at least 1, got {every_nth}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    paths = _video_paths(videos)
    detect = haar_face_detector() if detector is None else detector
    out_root = Path(out_root)
    summary = {
        "videos_ok": 0,
        "videos_failed": 0,
        "failed": [],
        "frames_read": 0,
        "frames_sampled": 0,
        "frames_without_face": 0,
        "frames_written": 0,
        "tracks": 0,
        "out_root": str(out_root),
    }
    used_names: set[str] = set()
    for path in paths:
        cap = cv2.VideoCapture(str(path))
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            cap.release()
            warnings.warn(f"skipping unreadable video {path}", RuntimeWarning, stacklevel=2)
            summary["videos_failed"] += 1
            summary["failed"].append(str(path))
            continue
        name = path.stem
        while name in used_names:  # two videos with one stem must not share a folder
            name += "_"
        used_names.add(name)
        summary["videos_ok"] += 1

        track, box, smooth = -1, None, None
        index = 0
        while ok:
            summary["frames_read"] += 1
            if index % every_nth == 0:
                summary["frames_sampled"] += 1
                rgb = np.ascontiguousarray(frame[..., ::-1])
                faces = np.asarray(detect(rgb), dtype=np.float64).reshape(-1, 4)
                faces = faces[(faces[:, 2] >= 2) & (faces[:, 3] >= 2)]
                if len(faces) == 0:
                    summary["frames_without_face"] += 1
                else:
                    overlaps = [_iou(f, box) for f in faces] if box is not None else [0.0]
                    areas = faces[:, 2] * faces[:, 3]
                    best = int(np.argmax(overlaps)) if max(overlaps) > 0 else int(np.argmax(areas))
                    face = faces[best]
                    # Haar boxes start at the brows: centre the crop a little higher to keep the forehead.
                    side = max(face[2], face[3]) * (1 + 2 * margin)
                    raw = np.array([face[0] + face[2] / 2, face[1] + 0.45 * face[3], side])
                    if box is None or _iou(face, box) < 0.3:
                        track += 1
                        summary["tracks"] += 1
                        smooth = raw
                    else:
                        smooth = smoothing * smooth + (1.0 - smoothing) * raw
                    box = face
                    folder = out_root / name / name / f"track{track}"
                    folder.mkdir(parents=True, exist_ok=True)
                    crop = _crop_square(cv2, frame, smooth[0], smooth[1], smooth[2], size)
                    if not cv2.imwrite(str(folder / f"{index:06d}.png"), crop):
                        raise OSError(f"cannot write {folder / f'{index:06d}.png'}")
                    summary["frames_written"] += 1
            index += 1
            # Frames that will not be searched are only grabbed, not decoded.
            ok, frame = cap.read() if index % every_nth == 0 else (cap.grab(), frame)
        cap.release()
    return summary
