"""Datasets and video preparation: pairing, determinism, corrupt input, labels."""

import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import tcae.frames as frames_module
import tcae.videos as videos
from tcae.errors import DataError
from tcae.frames import FramePairDataset, image_size, list_identities, load_image, split_identities
from tcae.labels import LabelledFrames
from tcae.videos import prepare_videos
from tcae.synthetic import AU_NAMES, SyntheticConfig, generate_dataset, render_frame, sample_identity, write_png

REAL_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "single_face.mp4"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    config = SyntheticConfig(
        identities=3, videos_per_identity=2, tracks_per_video=2, frames_per_video=8, size=32, seed=3
    )
    generate_dataset(root, config)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


# --- FramePairDataset ----------------------------------------------------------


def test_pairs_come_from_one_track_and_match_files(synthetic_root):
    ds = FramePairDataset(synthetic_root, size=32, pairs_per_identity=8, seed=0, jitter=False)
    assert len(ds) == 3 * 8 and ds.identities == ["id0000", "id0001", "id0002"]
    tracks = {t.key: t for t in ds.tracks}
    for i in range(0, len(ds), 5):
        item = ds[i]
        assert item["source"].shape == item["target"].shape == (3, 32, 32)
        assert item["source"].dtype == torch.float32
        assert item["source_index"] != item["target_index"]
        assert item["track"] == f"{item['identity']}/{item['video']}/{item['track'].split('/')[-1]}"
        frames = tracks[item["track"]].frames
        torch.testing.assert_close(item["source"], load_image(frames[item["source_index"]], 32))
        torch.testing.assert_close(item["target"], load_image(frames[item["target_index"]], 32))
        for key in ("source", "target"):
            assert item[key].min() >= 0.0 and item[key].max() <= 1.0
    assert ds.skipped_frames == 0
    # One pair per identity per epoch by default (the original), each identity once.
    assert sorted(FramePairDataset(synthetic_root, size=32)[i]["identity"] for i in range(3)) == ds.identities


def test_jitter_crops_source_and_target_independently(synthetic_root):
    plain = FramePairDataset(synthetic_root, size=32, pairs_per_identity=4, seed=2, jitter=False)
    jittered = FramePairDataset(synthetic_root, size=32, pairs_per_identity=4, seed=2)
    assert 200 <= jittered.crop_side <= 223
    for i in range(len(plain)):
        a, b = plain[i], jittered[i]
        assert (a["track"], a["source_index"], a["target_index"]) == (b["track"], b["source_index"], b["target_index"])
        assert b["source"].shape == (3, 32, 32) and 0 <= b["source"].min() and b["source"].max() <= 1
        assert not torch.allclose(a["source"], b["source"], atol=1e-3)  # a crop, enlarged
    # Same frame as source and target: the two crops differ unless drawn at one position.
    offsets = {(p[3][1:], p[4][1:]) for p in jittered._pairs}
    assert any(s != t for s, t in offsets)
    # The crop side is drawn once per epoch: every crop of an epoch shares it.
    assert {p[3][0] for p in jittered._pairs} | {p[4][0] for p in jittered._pairs} == {jittered.crop_side}
    sides = set()
    for epoch in range(6):
        jittered.set_epoch(epoch)
        sides.add(jittered.crop_side)
    assert len(sides) > 1


def test_jitter_crop_is_the_spec_window():
    # A frame whose pixel values are their x coordinate at 256 px: the crop's
    # left column must hold 16 + x0 (the central 224, then the offset).
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3)).copy()
    from tcae.frames import _to_tensor

    crop = _to_tensor(ramp, 200, crop=(200, 5, 7))
    assert crop[0, 0, 0].item() * 255 == pytest.approx(16 + 5, abs=1e-3)
    assert crop[0, 0, -1].item() * 255 == pytest.approx(16 + 5 + 199, abs=1e-3)


def test_pairs_are_deterministic_per_seed_and_epoch(synthetic_root):
    def pairs(ds):
        return [(d["track"], d["source_index"], d["target_index"]) for d in (ds[i] for i in range(len(ds)))]

    a = FramePairDataset(synthetic_root, size=16, pairs_per_identity=4, seed=5)
    b = FramePairDataset(synthetic_root, size=16, pairs_per_identity=4, seed=5)
    assert pairs(a) == pairs(b)
    torch.testing.assert_close(a[7]["source"], b[7]["source"])
    assert pairs(a) != pairs(FramePairDataset(synthetic_root, size=16, pairs_per_identity=4, seed=6))
    first = pairs(a)
    a.set_epoch(1)
    assert pairs(a) != first
    a.set_epoch(0)
    assert pairs(a) == first


def test_max_offset_bounds_the_frame_distance(synthetic_root):
    ds = FramePairDataset(synthetic_root, size=16, pairs_per_identity=30, max_offset=2, seed=1, jitter=False)
    gaps = {abs(ds[i]["source_index"] - ds[i]["target_index"]) for i in range(len(ds))}
    assert gaps == {1, 2}


def test_identity_filter_and_split(synthetic_root):
    ids = list_identities(synthetic_root)
    train, test = split_identities(ids, held_out=1, seed=0)
    assert sorted(train + test) == ids and not set(train) & set(test) and len(test) == 1
    assert split_identities(ids, held_out=1, seed=0) == (train, test)
    ds = FramePairDataset(synthetic_root, size=16, identities=test)
    assert {ds[i]["identity"] for i in range(len(ds))} == set(test)
    with pytest.raises(ValueError, match="not found"):
        FramePairDataset(synthetic_root, identities=["nobody"])
    assert len(split_identities([f"p{i}" for i in range(10)], held_out=0.3)[1]) == 3
    with pytest.raises(ValueError):
        split_identities(["only"])


def test_batches_collate_and_dataset_pickles(synthetic_root):
    ds = FramePairDataset(synthetic_root, size=16, pairs_per_identity=2)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch["source"].shape == (4, 3, 16, 16) and len(batch["identity"]) == 4
    # DataLoader workers started with "spawn" receive the dataset pickled.
    torch.testing.assert_close(pickle.loads(pickle.dumps(ds))[3]["target"], ds[3]["target"])
    labelled = LabelledFrames(synthetic_root, size=16)
    torch.testing.assert_close(pickle.loads(pickle.dumps(labelled))[3]["image"], labelled[3]["image"])


def test_corrupt_frames_are_skipped_and_counted(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    track = root / "id0000" / "vid00" / "track0"
    garbage, truncated = track / "000002.png", track / "000005.png"
    garbage.write_bytes(np.random.default_rng(0).bytes(200))
    truncated.write_bytes(truncated.read_bytes()[:150])
    # A track with nothing readable hands its pairs to another track.
    for frame in (root / "id0001" / "vid01" / "track1").glob("*.png"):
        frame.write_bytes(b"not a png")

    ds = FramePairDataset(root, size=32, pairs_per_identity=120, seed=0)
    with pytest.warns(RuntimeWarning, match="unreadable frame"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped_frames == 2 + 8
    assert set(ds.skipped_paths) >= {garbage, truncated}
    for item in items:
        assert item["track"] != "id0001/vid01/track1"
        if item["track"] == "id0000/vid00/track0":
            assert {item["source_index"], item["target_index"]}.isdisjoint({2, 5})
            assert item["source_index"] != item["target_index"]

    with pytest.warns(RuntimeWarning):
        checked = FramePairDataset(root, size=32, verify=True)
    assert checked.skipped_frames == 10
    assert len(checked.tracks) == 11 and len(checked.tracks[0].frames) == 6


def test_missing_and_empty_roots_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FramePairDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no frames found"):
        FramePairDataset(tmp_path)
    (tmp_path / "a" / "v" / "t").mkdir(parents=True)
    with pytest.raises(ValueError, match="no frames found"):
        FramePairDataset(tmp_path)
    write_png(tmp_path / "a" / "v" / "t" / "000000.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="two readable frames"):
        FramePairDataset(tmp_path)
    with pytest.raises(ValueError, match="label CSV"):
        LabelledFrames(tmp_path)
    with pytest.raises(FileNotFoundError):
        LabelledFrames(tmp_path / "nope")


def test_mixed_sizes_and_formats_are_resized(tmp_path):
    track = tmp_path / "person" / "clip" / "t0"
    track.mkdir(parents=True)
    ident = sample_identity(0)
    write_png(track / "000000.png", render_frame(ident, size=64))
    write_png(track / "000001.png", render_frame(ident, {"AU12": 1.0}, size=32))
    write_png(track / "000002.png", np.full((40, 56, 3), 200, np.uint8))  # non-square: centre-cropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is corrupt
        ds = FramePairDataset(tmp_path, size=48, pairs_per_identity=12)
        for i in range(len(ds)):
            assert ds[i]["source"].shape == ds[i]["target"].shape == (3, 48, 48)
    # A flat 200-grey frame stays flat: resampling adds no ringing.
    torch.testing.assert_close(load_image(track / "000002.png", 48), torch.full((3, 48, 48), 200 / 255))


# --- LabelledFrames ------------------------------------------------------------


def test_labelled_frames_read_synthetic_labels(synthetic_root):
    ds = LabelledFrames(synthetic_root, size=24)
    assert len(ds) == 12 * 8 and ds.au_names == list(AU_NAMES)
    assert ds.has_intensity and ds.has_pose
    item = ds[3]
    assert item["image"].shape == (3, 24, 24) and item["au_valid"].all()
    assert item["frame"] == "000003.png" and item["identity"] == "id0000"
    for i in range(len(ds)):
        it = ds[i]
        assert torch.equal(it["au_occurrence"], (it["au_intensity"] > 0.5).float())
        assert it["pose"].shape == (5,)
    occurrence = torch.stack([ds[i]["au_occurrence"] for i in range(len(ds))])
    assert 0 < occurrence.mean() < 1
    held = LabelledFrames(synthetic_root, size=24, identities=["id0002"])
    assert held.identities == ["id0002"] and len(held) == 4 * 8


def test_labelled_frames_read_bp4d_style_csv(tmp_path):
    track = tmp_path / "F001" / "T1" / "0"
    track.mkdir(parents=True)
    ident = sample_identity(1)
    for f in range(1, 5):
        write_png(track / f"{f:04d}.png", render_frame(ident, size=32))
    # Frame 4 has no row, frame 7 has no image, 9 means "not coded" (BP4D).
    (track / "F001_T1.csv").write_text("frame,AU01,AU02,AU12\n1,1,0,0\n2,0,9,1\n3,1,1,\n7,1,1,1\n")
    ds = LabelledFrames(tmp_path, size=16)
    assert len(ds) == 3 and ds.au_names == ["AU1", "AU2", "AU12"]
    assert not ds.has_intensity and not ds.has_pose
    items = [ds[i] for i in range(3)]
    assert "au_intensity" not in items[0] and "pose" not in items[0]
    assert [it["frame"] for it in items] == ["0001.png", "0002.png", "0003.png"]
    assert items[0]["au_occurrence"].tolist() == [1.0, 0.0, 0.0] and items[0]["au_valid"].all()
    assert items[1]["au_occurrence"].tolist() == [0.0, 0.0, 1.0]
    assert items[1]["au_valid"].tolist() == [True, False, True]
    assert items[2]["au_valid"].tolist() == [True, True, False]
    # Requested AUs the CSV lacks are "not coded".
    chosen = LabelledFrames(tmp_path, size=16, au_names=["AU12", "AU04"])
    assert chosen.au_names == ["AU12", "AU4"] and chosen[0]["au_valid"].tolist() == [True, False]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["au_occurrence"].shape == (3, 3) and batch["au_valid"].dtype == torch.bool


def test_labelled_frames_skip_unreadable(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    (root / "id0000" / "vid00" / "track0" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = LabelledFrames(root, size=16)
    with pytest.warns(RuntimeWarning, match="unreadable frame"):
        item = ds[0]
    assert item["frame"] == "000001.png" and ds.skipped_frames == 1


def test_labelled_frames_bad_csv_is_reported(tmp_path):
    track = tmp_path / "p" / "v" / "t"
    track.mkdir(parents=True)
    write_png(track / "000000.png", np.zeros((8, 8, 3), np.uint8))
    labels = track / "labels.csv"
    labels.write_text("index,AU1\n0,1\n")
    with pytest.raises(DataError, match="no 'frame' column"):
        LabelledFrames(tmp_path)
    labels.write_bytes("frame,AU1\n0,1\n".encode("utf-16"))  # not UTF-8
    with pytest.raises(DataError, match=f"label file {re.escape(str(labels))} is not UTF-8 text"):
        LabelledFrames(tmp_path)
    labels.write_bytes("\ufeffframe,AU1\n0,1\n".encode())  # UTF-8 with a byte-order mark, as Excel writes
    assert LabelledFrames(tmp_path, size=8)[0]["au_occurrence"].tolist() == [1.0]


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk announcing width × height, with no image data after it."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def test_frames_above_the_pixel_limit_are_refused_before_decoding(synthetic_root, tmp_path, monkeypatch):
    root = _copy(synthetic_root, tmp_path)
    huge = root / "id0000" / "vid00" / "track0" / "000003.png"
    huge.write_bytes(_png_header(16000, 16000) + b"\0" * 100)
    assert image_size(huge) == (16000, 16000)
    decoded = []
    real_decoder = frames_module._decoder()
    monkeypatch.setattr(frames_module, "_decoder", lambda: lambda path: decoded.append(path) or real_decoder(path))
    with pytest.warns(RuntimeWarning, match=r"000003.png: 16000 × 16000 pixels, more than the limit of 16777216"):
        ds = FramePairDataset(root, size=32, verify=True)  # every frame read once
    assert huge not in decoded and len(decoded) == 3 * 2 * 2 * 8 - 1
    assert ds.skipped_paths == [huge] and len(ds.tracks[0].frames) == 7
    with pytest.raises(DataError, match="16000 × 16000 pixels"):
        load_image(huge, 32)
    # The limit is a setting: 32 × 32 frames above a limit of 1000 pixels are all refused.
    with pytest.warns(RuntimeWarning, match="32 × 32 pixels, more than the limit of 1000"), \
            pytest.raises(DataError, match="no track .* has two readable frames"):
        FramePairDataset(root, size=32, max_pixels=1000, verify=True)


def test_image_size_reads_png_and_jpeg_headers(tmp_path):
    cv2 = pytest.importorskip("cv2")
    image = np.zeros((30, 50, 3), np.uint8)
    write_png(tmp_path / "a.png", image)
    _, jpeg = cv2.imencode(".jpg", image)
    (tmp_path / "a.jpg").write_bytes(jpeg.tobytes())
    assert image_size(tmp_path / "a.png") == image_size(tmp_path / "a.jpg") == (50, 30)
    (tmp_path / "x.png").write_bytes(b"not an image")
    assert image_size(tmp_path / "x.png") is None


def test_entries_named_like_frames_that_are_not_files_are_skipped(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    track = root / "id0000" / "vid00" / "track0"
    (track / "000100.png").mkdir()
    (track / "000101.png").symlink_to(tmp_path / "gone.png")
    with pytest.warns(RuntimeWarning) as caught:
        ds = FramePairDataset(root, size=16)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f"skipping {track / '000100.png'}: named like a frame but not a file",
                        f"skipping {track / '000101.png'}: named like a frame but a broken link"]
    assert ds.skipped_frames == 2 and len(ds.tracks[0].frames) == 8


# --- prepare_videos ------------------------------------------------------------


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    cv2 = pytest.importorskip("cv2")
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()


def _face_video(path: Path, n: int = 10) -> list[bool]:
    """Even frames show a face on a 96x128 canvas, odd frames are black."""
    ident = sample_identity(2)
    frames, has_face = [], []
    for i in range(n):
        canvas = np.zeros((96, 128, 3), np.uint8)
        if i % 2 == 0:
            canvas[16:80, 32:96] = render_frame(ident, {"AU26": i / n}, size=64)
        frames.append(canvas)
        has_face.append(i % 2 == 0)
    _write_video(path, frames)
    return has_face


def _bright_box_detector(frame: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Stands in for a face detector: the bounding box of non-black pixels."""
    ys, xs = np.nonzero(frame.max(axis=2) > 40)
    if len(xs) < 50:
        return []
    return [(xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)]


def test_prepare_videos_counts_and_layout(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    has_face = _face_video(videos / "clip.avi", n=10)
    (videos / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="unreadable video"):
        summary = prepare_videos(videos, out, size=32, detector=_bright_box_detector)
    assert summary["videos_ok"] == 1 and summary["videos_failed"] == 1
    assert summary["failed"] == [str(videos / "broken.mp4")]
    assert summary["frames_read"] == summary["frames_sampled"] == 10
    assert summary["frames_without_face"] == has_face.count(False)
    assert summary["frames_written"] == has_face.count(True) and summary["tracks"] == 1
    written = sorted((out / "clip" / "clip" / "track0").glob("*.png"))
    assert [p.name for p in written] == [f"{i:06d}.png" for i in range(0, 10, 2)]
    assert load_image(written[0], 32).shape == (3, 32, 32)
    # The output is what the training dataset reads.
    assert len(FramePairDataset(out, size=32, pairs_per_identity=2)) == 2

    sparse = prepare_videos(
        [videos / "clip.avi"], tmp_path / "sparse", size=32, every_nth=3, detector=_bright_box_detector
    )
    assert summary["frames_read"] == sparse["frames_read"] and sparse["frames_sampled"] == 4  # frames 0, 3, 6, 9
    assert sparse["frames_written"] == 2 and sparse["frames_without_face"] == 2


def test_prepare_videos_starts_a_new_track_when_the_face_jumps(tmp_path):
    ident = sample_identity(3)
    frames = []
    for i in range(6):
        canvas = np.zeros((96, 192, 3), np.uint8)
        x = 8 if i < 3 else 120  # a cut: the face moves to the other side
        canvas[16:80, x : x + 64] = render_frame(ident, size=64)
        frames.append(canvas)
    _write_video(tmp_path / "cut.avi", frames)
    summary = prepare_videos([tmp_path / "cut.avi"], tmp_path / "out", size=24, detector=_bright_box_detector)
    assert summary["tracks"] == 2 and summary["frames_written"] == 6
    assert len(list((tmp_path / "out" / "cut" / "cut" / "track1").glob("*.png"))) == 3


def test_prepare_videos_names_missing_files(tmp_path):
    pytest.importorskip("cv2")
    _face_video(tmp_path / "clip.avi", n=2)
    absent = tmp_path / "absent.mp4"
    with pytest.warns(RuntimeWarning, match=f"skipping {re.escape(str(absent))}: no such file"):
        summary = prepare_videos([absent, tmp_path / "clip.avi"], tmp_path / "out", detector=_bright_box_detector)
    assert summary["videos_failed"] == 1 and summary["failed"] == [str(absent)] and summary["videos_ok"] == 1
    # Nothing that exists at all: an error, not an empty run.
    with pytest.raises(FileNotFoundError, match=r"no such file: videos/\*\.mp4 \(a shell pattern that matched"):
        prepare_videos(["videos/*.mp4"], tmp_path / "out2", detector=_bright_box_detector)


def test_prepare_videos_without_opencv_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(videos, "_optional_cv2", lambda: None)
    with pytest.raises(ImportError, match=r"tcae-kernels\[video\]"):
        prepare_videos([tmp_path / "x.mp4"], tmp_path / "out")


def _default_detector_or_skip():
    pytest.importorskip("cv2")
    try:
        return videos.haar_face_detector()
    except RuntimeError as e:
        assert "opencv-python-headless" in str(e)  # the error says how to get a detector
        pytest.skip(f"no bundled face detector: {e}")


def test_prepare_videos_default_detector_finds_the_faces(tmp_path):
    _face_video(tmp_path / "clip.avi", n=6)
    _default_detector_or_skip()
    summary = prepare_videos([tmp_path / "clip.avi"], tmp_path / "out", size=32)
    assert summary["frames_sampled"] == 6
    assert summary["frames_written"] + summary["frames_without_face"] == 6
    # Faces are found (at least the neutral first one), and only where there is one: never on a black frame.
    crops = sorted((tmp_path / "out" / "clip" / "clip" / "track0").glob("*.png"))
    assert crops and len(crops) == summary["frames_written"] and summary["tracks"] == 1
    assert crops[0].name == "000000.png" and all(int(p.stem) % 2 == 0 for p in crops)
    for crop in crops:
        image = load_image(crop, 32)
        assert image.shape == (3, 32, 32) and image[:, 8:24, 8:24].mean() > 0.2  # the face, not the black border


@pytest.mark.skipif(not REAL_VIDEO.is_file(), reason=f"{REAL_VIDEO} not present")
def test_prepare_real_video_detects_the_face(tmp_path):
    _default_detector_or_skip()
    summary = prepare_videos([REAL_VIDEO], tmp_path / "out", size=64, every_nth=2)
    assert summary["videos_ok"] == 1 and summary["frames_sampled"] >= 10
    assert summary["frames_written"] >= 0.8 * summary["frames_sampled"]
    crops = sorted((tmp_path / "out").rglob("*.png"))
    assert len(crops) == summary["frames_written"]
    assert load_image(crops[0], 64).shape == (3, 64, 64)
    # Face crops of one person from one shot: a single track.
    assert summary["tracks"] == 1
