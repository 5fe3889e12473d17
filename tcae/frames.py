"""Face-track frames on disk: the folder layout, decoding, identities, and TCAE's training pairs.

Folder layout (VoxCeleb-like, also what :func:`tcae.videos.prepare_videos` and
:func:`tcae.synthetic.generate_dataset` write)::

    root/<identity>/<video>/<track>/000000.png     (or .jpg / .jpeg)
                                   /000001.png ...
                                   /labels.csv     (optional, see tcae.labels)

A *track* is one continuous shot of one face; TCAE's source and target frames
come from the same track. Frames are ordered by file name.

Images come out as float32 tensors ``[3, size, size]``, RGB, in [0, 1] (the
original's ``ToTensor``; SPEC section 6). Non-square frames are centre-cropped
to a square (faces are not stretched), then resized with an antialiased
bilinear filter.

Frames are decoded with OpenCV when it is installed, else Pillow. A frame that
cannot be decoded, or whose header gives more than ``max_pixels`` pixels
(checked before decoding: a small PNG can hold a huge image), is skipped with a
warning, counted (``skipped_frames``) and replaced by another frame of the
same track; it never stops an epoch. So are entries named like frames that
are not files (folders, broken links), found when the folders are scanned.
Each item names the frames first found unreadable while loading it
(``skipped``, paths joined by newlines), so that the process iterating a
``DataLoader`` can count the skips of its worker processes too.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "FramePairDataset", "list_identities", "split_identities", "load_image",
           "image_size"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 4096 * 4096
"""Default largest frame, width × height. Issue #13: a 0.75 MB PNG of 16000 × 16000 took 17 s and 4 GB to decode."""
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


def _jpeg_size(f) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn marker), reading markers from after SOI."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2 or marker == 0xDA:  # start of scan: no frame header came before it
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            fields = f.read(5)
            return None if len(fields) < 5 else struct.unpack(">HH", fields[1:5])[::-1]
        f.seek(int.from_bytes(length, "big") - 2, 1)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) in pixels from a PNG's IHDR or a JPEG's frame header, without decoding; None when
    the header is not one of those (the decoder then decides)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(f)
    return None


def _read_frame(path: Path, decode: Callable[[Path], np.ndarray | None], max_pixels: int) -> np.ndarray | str:
    """The frame's ``[H, W, 3]`` uint8 RGB, or why it was not read (to follow "skipping ")."""
    try:
        size = image_size(path)
    except OSError as e:
        return f"unreadable frame {path} ({e.strerror or e})"
    if size is not None and size[0] * size[1] > max_pixels:
        return (f"frame {path}: {size[0]} × {size[1]} pixels, more than the limit of {max_pixels} "
                "(max_frame_pixels)")
    img = decode(path)
    return f"unreadable frame {path}" if img is None else img


# SPEC section 6's augmentation, in pixels of a 256-px frame: the central 224
# (resize to 256, pad by 24, centre-crop 224), then a random c × c crop of it.
JITTER_FRAME = 256
JITTER_CENTRE = 224
JITTER_SIDES = (200, 223)  # c, inclusive, drawn once per epoch


def _to_tensor(img: np.ndarray, size: int, crop: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``[H, W, 3]`` uint8 → ``[3, size, size]`` float32 in [0, 1].

    ``crop`` = (c, x0, y0): SPEC's jitter, in pixels of the frame resized to
    256: the c × c square at (16 + x0, 16 + y0), i.e. at (x0, y0) inside the
    central 224; then resized to ``size``.
    """
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.ascontiguousarray(img[top : top + side, left : left + side])).permute(2, 0, 1).float()
    if crop is not None:
        c, x0, y0 = crop
        margin = (JITTER_FRAME - JITTER_CENTRE) // 2
        if side != JITTER_FRAME:
            x = _resize(x, JITTER_FRAME)
        x = x[:, margin + y0 : margin + y0 + c, margin + x0 : margin + x0 + c]
    if x.shape[-1] != size:
        x = _resize(x, size)
    # Resampling can land a hair outside [0, 255]; keep the documented range exact.
    return (x / 255.0).clamp_(0.0, 1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def load_image(path: str | Path, size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read one frame as ``[3, size, size]`` float32 in [0, 1] (no jitter).

    Raises :class:`~tcae.errors.DataError` when the file cannot be decoded or has more than ``max_pixels``.
    """
    img = _read_frame(Path(path), _decoder(), max_pixels)
    if isinstance(img, str):
        raise DataError(f"cannot read {img}")
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


def _scan_tracks(root: str | Path, identities: Sequence[str] | None,
                 skipped: _SkipCounter) -> list[_Track]:
    """The tracks with frames; entries named like frames that are not files go to ``skipped``."""
    root = _check_root(root)
    available = list_identities(root)
    if identities is None:
        chosen = available
    else:
        missing = sorted(set(identities) - set(available))
        if missing:
            raise DataError(f"identities {missing} not found under {root}")
        chosen = sorted(set(identities))
    tracks = []
    for identity in chosen:
        for video in _subdirs(root / identity):
            for track in _subdirs(video):
                frames = []
                for p in sorted(track.iterdir()):
                    if p.suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    if p.is_file():
                        frames.append(p)
                    else:
                        what = "a broken link" if p.is_symlink() and not p.exists() else "not a file"
                        skipped.add(p, f"{p}: named like a frame but {what}")
                if frames:
                    tracks.append(_Track(identity, video.name, track.name, track, frames))
    if not tracks:
        raise DataError(f"no frames found under {root}: expected {_LAYOUT}")
    return tracks


class _SkipCounter:
    """Frames found unreadable in this process; each warns once. :meth:`take_new` hands over the paths
    found since its last call, for the item being loaded."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._seen: set[Path] = set()
        self._new: list[Path] = []

    def __contains__(self, path: Path) -> bool:
        return path in self._seen

    def add(self, path: Path, why: str | None = None) -> None:
        """Count ``path``; ``why`` completes the warning "skipping …" (default: "unreadable frame PATH")."""
        if path not in self._seen:
            self._seen.add(path)
            self.paths.append(path)
            self._new.append(path)
            warnings.warn(f"skipping {why or f'unreadable frame {path}'}", RuntimeWarning, stacklevel=3)

    def take_new(self) -> str:
        new, self._new = self._new, []
        return "\n".join(map(str, new))


def split_identities(
    identities: Sequence[str], held_out: float | int = 0.25, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split identities into (train, held-out), both sorted, reproducibly.

    ``held_out``: a fraction in (0, 1) (rounded, at least one identity on each
    side) or a count.
    """
    ids = sorted(set(identities))
    if len(ids) < 2:
        raise DataError(f"need at least two identities to split, got {ids}")
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


# --- frame pairs for self-supervised training ----------------------------------


class _CountsSkippedFrames:
    """The skip count of a dataset that reads its frames through ``self._skipped``."""

    _skipped: _SkipCounter

    @property
    def skipped_frames(self) -> int:
        """Number of distinct frames found unreadable so far in this process."""
        return len(self._skipped.paths)

    @property
    def skipped_paths(self) -> list[Path]:
        return list(self._skipped.paths)


class FramePairDataset(_CountsSkippedFrames, Dataset):
    """(source, target) frame pairs from the same track, for TCAE training (SPEC section 6).

    Each epoch holds ``pairs_per_identity`` pairs per identity (the original:
    one): a random video of the identity, a random track of it, a source frame
    uniform over the track and a target uniform over its other frames (or
    over those at most ``max_offset`` frames away, in file order). With
    ``jitter`` each frame is cropped as SPEC says: the central 224/256 of the
    frame, then a random c × c crop of it, c drawn once per epoch from
    200…223 (of 256) and the crop position drawn independently for source and
    target, resized to ``size``. The pairs and crops depend only on ``seed``
    and the epoch (:meth:`set_epoch`, like ``DistributedSampler``), so runs
    are reproducible.

    ``verify=True`` decodes every frame up front and drops unreadable ones
    (slow on large sets); otherwise they are found, counted and replaced when
    first loaded. Frames of more than ``max_pixels`` (width × height, read
    from the file's header) count as unreadable. Tracks with fewer than two
    frames are dropped.

    Items are dicts: ``source`` and ``target`` ``[3, size, size]`` float32 in
    [0, 1]; ``identity``, ``video``, ``track`` (``identity/video/track``)
    strings; ``source_index`` and ``target_index``, positions of the frames
    in their track's sorted file list (after any replacement); ``skipped``,
    the frames first found unreadable while loading this item (paths joined
    by newlines, usually "").

    Raises ``FileNotFoundError`` for a missing root, :class:`~tcae.errors.DataError`
    (a ``ValueError``) when no track has two frames, or, from an item, when
    no track has two readable frames left.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        identities: Sequence[str] | None = None,
        pairs_per_identity: int = 1,
        max_offset: int | None = None,
        seed: int = 0,
        jitter: bool = True,
        verify: bool = False,
        max_pixels: int = MAX_PIXELS,
    ):
        if pairs_per_identity < 1:
            raise ValueError(f"pairs_per_identity must be at least 1, got {pairs_per_identity}")
        if max_offset is not None and max_offset < 1:
            raise ValueError(f"max_offset must be at least 1 or None, got {max_offset}")
        self.root = Path(root)
        self.size = size
        self.pairs_per_identity = pairs_per_identity
        self.max_offset = max_offset
        self.seed = seed
        self.jitter = jitter
        self.max_pixels = max_pixels
        self._decode = _decoder()
        self._skipped = _SkipCounter()
        tracks = _scan_tracks(root, identities, self._skipped)
        if verify:
            for track in tracks:
                for path in track.frames:
                    found = _read_frame(path, self._decode, max_pixels)
                    if isinstance(found, str):
                        self._skipped.add(path, found)
                track.frames = [p for p in track.frames if p not in self._skipped]
        self.tracks = [t for t in tracks if len(t.frames) >= 2]
        if not self.tracks:
            raise DataError(f"no track under {root} has two readable frames (expected {_LAYOUT})")
        self.identities = sorted({t.identity for t in self.tracks})
        # identity → video → indices into self.tracks
        self._videos: dict[str, dict[str, list[int]]] = {}
        for ti, t in enumerate(self.tracks):
            self._videos.setdefault(t.identity, {}).setdefault(t.video, []).append(ti)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's pairs and crops from ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, epoch])
        side = int(rng.integers(JITTER_SIDES[0], JITTER_SIDES[1] + 1))
        pairs = []
        for identity in self.identities:
            videos = list(self._videos[identity].values())
            for _ in range(self.pairs_per_identity):
                video = videos[rng.integers(len(videos))]
                ti = video[rng.integers(len(video))]
                n = len(self.tracks[ti].frames)
                s = int(rng.integers(n))
                m = n - 1 if self.max_offset is None else min(self.max_offset, n - 1)
                lo, hi = max(s - m, 0), min(s + m, n - 1)
                # Uniform over [lo, hi] without s: draw from hi - lo slots, step over s.
                k = lo + int(rng.integers(hi - lo))
                t = k + (k >= s)
                crops = rng.integers(0, JITTER_CENTRE - side + 1, size=4).tolist()
                pairs.append((ti, s, t, (side, *crops[:2]), (side, *crops[2:])))
        self._pairs = pairs
        self.crop_side = side

    def __len__(self) -> int:
        return len(self._pairs)

    def _load(self, track: _Track, index: int, avoid: int,
              crop: tuple[int, int, int]) -> tuple[torch.Tensor, int] | None:
        # The requested frame, else the next readable one of the track (cyclic), never `avoid`.
        n = len(track.frames)
        for step in range(n):
            j = (index + step) % n
            path = track.frames[j]
            if j == avoid or path in self._skipped:
                continue
            img = _read_frame(path, self._decode, self.max_pixels)
            if not isinstance(img, str):
                return _to_tensor(img, self.size, crop if self.jitter else None), j
            self._skipped.add(path, img)
        return None

    def __getitem__(self, i: int) -> dict:
        ti, s, t, source_crop, target_crop = self._pairs[i]
        # A track without two readable frames hands over to the next track.
        for step in range(len(self.tracks)):
            track = self.tracks[(ti + step) % len(self.tracks)]
            source = self._load(track, s % len(track.frames), -1, source_crop)
            if source is None:
                continue
            target = self._load(track, t % len(track.frames), source[1], target_crop)
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
                "skipped": self._skipped.take_new(),
            }
        raise DataError(f"no track under {self.root} has two readable frames: {self.skipped_frames} frames found "
                        f"unreadable in this process, the first {self._skipped.paths[0]}")
