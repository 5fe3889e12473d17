"""Videos → face-crop tracks in the layout :mod:`tcae.frames` reads (needs OpenCV)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .frames import _optional_cv2

__all__ = ["VIDEO_EXTENSIONS", "FaceDetector", "haar_face_detector", "yunet_face_detector", "prepare_videos"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

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


def _video_paths(videos: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(the video files to read, the named paths that do not exist); FileNotFoundError when none exists."""
    if isinstance(videos, (str, Path)):
        videos = Path(videos)
        if videos.is_dir():
            found = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
            if not found:
                raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {videos}")
            return found, []
        videos = [videos]
    paths = [Path(v) for v in videos]
    missing = [p for p in paths if not p.exists()]
    if len(missing) == len(paths):
        pattern = any(c in str(p) for p in missing for c in "*?[")
        raise FileNotFoundError(f"no such file: {', '.join(map(str, missing))}"
                                + (" (a shell pattern that matched no file?)" if pattern else ""))
    return [p for p in paths if p.exists()], missing


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
    track. Frames without a face are skipped and counted; a video that does
    not exist, cannot be opened or yields no frame is skipped with a warning
    and counted. When no named video exists at all, ``FileNotFoundError``.

    Returns a summary: ``videos_ok``, ``videos_failed``, ``failed`` (paths),
    ``frames_read`` (all frames gone through), ``frames_sampled`` (decoded and searched),
    ``frames_without_face``, ``frames_written``, ``tracks``, ``out_root``.
    """
    cv2 = _require_cv2()
    if every_nth < 1:
        raise ValueError(f"every_nth must be at least 1, got {every_nth}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    paths, missing = _video_paths(videos)
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
    for path in missing:
        warnings.warn(f"skipping {path}: no such file", RuntimeWarning, stacklevel=2)
        summary["videos_failed"] += 1
        summary["failed"].append(str(path))
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
