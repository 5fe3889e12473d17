"""The procedural face-video generator: determinism, ground truth, files."""

import csv

import numpy as np
import pytest
import torch

from tcae.frames import load_image
from tcae.synthetic import (
    AU_NAMES,
    AU_STYLES,
    OCCURRENCE_THRESHOLD,
    POSE_NAMES,
    Pose,
    SyntheticConfig,
    _FACE_ZOOM,
    au_displacement,
    generate_dataset,
    render_frame,
    sample_identity,
    sample_trajectory,
    write_png,
)
from tcae_kernels.reference import warp_naive


def _row(y_face: float, size: int) -> float:
    """Image row of a face-coordinate height at the neutral pose."""
    return (1.0 + _FACE_ZOOM * y_face) * size / 2.0 - 0.5


def test_render_is_deterministic_with_requested_shape():
    ident = sample_identity(3)
    au = {"AU12": 0.7, "AU26": 0.4}
    pose = Pose(roll=5.0, tx=0.02, ty=-0.01, scale=1.05, yaw=0.3)
    a = render_frame(ident, au, pose, size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, render_frame(ident, au, pose, size=64))
    assert render_frame(ident, au, pose, size=128).shape == (128, 128, 3)
    # Sequences in AU_NAMES / POSE_NAMES order are the same as the mappings.
    vec = [au.get(n, 0.0) for n in AU_NAMES]
    np.testing.assert_array_equal(a, render_frame(ident, vec, pose.as_array(), size=64))


def test_identities_differ_and_repeat_from_seed():
    assert sample_identity(1) == sample_identity(1)
    assert sample_identity(1) != sample_identity(2)
    assert np.abs(render_frame(sample_identity(1)).astype(int) - render_frame(sample_identity(2))).mean() > 10


def test_bad_au_input_is_rejected():
    ident = sample_identity(0)
    with pytest.raises(ValueError, match="unknown AUs"):
        render_frame(ident, {"AU99": 1.0})
    with pytest.raises(ValueError, match="expected 7"):
        render_frame(ident, [0.5, 0.5])
    with pytest.raises(ValueError, match="au_style"):
        render_frame(ident, None, None, 64, "painted")


def test_warp_style_aus_are_a_displacement_of_the_neutral_face():
    # The frame with AUs is the AU-free frame warped by au_displacement (x − δ), up to the
    # resampling of a rasterised image, at any pose; the drawn style's parts are not.
    rng = np.random.default_rng(1)
    size = 128
    for seed in range(4):
        ident = sample_identity(seed)
        pose = Pose(roll=rng.uniform(-7, 7), tx=rng.uniform(-0.05, 0.05), ty=rng.uniform(-0.05, 0.05),
                    scale=rng.uniform(0.9, 1.1), yaw=rng.uniform(-0.5, 0.5))
        au = rng.uniform(0.3, 1.0, len(AU_NAMES))
        disp = torch.from_numpy(au_displacement(ident, au, pose, size)).double()[None]
        np.testing.assert_array_equal(au_displacement(ident, None, pose, size), 0.0)
        ratio = {}
        for style in AU_STYLES:
            neutral, active = (torch.from_numpy(render_frame(ident, a, pose, size, style)).permute(2, 0, 1)
                               .double()[None] for a in (None, au))
            residual = (active - warp_naive(neutral, disp, padding="border")).abs().mean()
            ratio[style] = (residual / (active - neutral).abs().mean()).item()
        assert ratio["warp"] < 0.25 and ratio["drawn"] > 0.9, (seed, ratio)


@pytest.mark.parametrize("style", AU_STYLES)
@pytest.mark.parametrize("au", AU_NAMES)
def test_each_au_changes_pixels_where_its_feature_is(au, style):
    size = 128
    for seed in range(3):
        ident = sample_identity(seed)
        neutral = render_frame(ident, None, None, size, style).astype(int)
        active = render_frame(ident, {au: 1.0}, None, size, style).astype(int)
        changed = np.abs(active - neutral).max(axis=2) > 25
        assert changed.sum() >= 15, f"{au} barely visible for identity {seed}"
        rows = np.nonzero(changed)[0]
        eye, nose = _row(ident.eye_y, size), _row(ident.nose_y, size)
        if au in ("AU1", "AU2", "AU4"):  # brows sit above the eyes
            assert np.median(rows) < eye
        elif au == "AU43":
            assert abs(np.median(rows) - eye) < size * 0.05
        else:  # mouth AUs act below the nose
            assert np.median(rows) > nose
        # Inner-feature AUs leave the image borders (background, hair edge) alone.
        assert not changed[:, : size // 8].any() and not changed[:, -size // 8 :].any()


def test_stronger_intensity_changes_more():
    ident = sample_identity(4)
    neutral = render_frame(ident, None, None, 96).astype(int)
    diffs = [np.abs(render_frame(ident, {"AU26": v}, None, 96) - neutral).sum() for v in (0.25, 0.5, 1.0)]
    assert diffs[0] < diffs[1] < diffs[2]


def test_translation_moves_the_head():
    ident = sample_identity(5)
    size = 64
    base = render_frame(ident, None, Pose(), size).astype(int)
    moved = render_frame(ident, None, Pose(tx=0.125), size).astype(int)  # 0.125 of 64 px = 8 px right
    inner = slice(16, 48)
    shifted_err = np.abs(moved[:, 8:][:, inner] - base[:, :-8][:, inner]).mean()
    assert shifted_err < 0.1 * np.abs(moved - base)[:, inner].mean()


@pytest.mark.parametrize("pose", [Pose(roll=10.0), Pose(scale=1.1), Pose(yaw=0.6), Pose(ty=0.05)])
def test_each_pose_parameter_changes_the_image(pose):
    ident = sample_identity(6)
    assert np.abs(render_frame(ident, None, pose).astype(int) - render_frame(ident)).mean() > 1.0


def test_trajectory_is_smooth_bounded_reproducible():
    au, pose = sample_trajectory(400, 7)
    assert au.shape == (400, len(AU_NAMES)) and pose.shape == (400, len(POSE_NAMES))
    assert au.min() >= 0.0 and au.max() <= 1.0
    steps = np.abs(np.diff(au, axis=0))
    assert steps.max() < 0.8 and np.quantile(steps, 0.99) < 0.4  # onsets take a few frames, not one
    assert ((au > 0.3) & (au < 0.7)).mean() < 0.2  # mostly clearly off or clearly on
    occurs = au > OCCURRENCE_THRESHOLD
    assert (occurs.mean(axis=0) > 0.05).all() and (occurs.mean(axis=0) < 0.8).all()
    roll, tx, ty, scale, yaw = pose.T
    assert np.abs(roll).max() < 45 and np.abs(tx).max() < 0.25 and np.abs(ty).max() < 0.25
    assert 0.7 < scale.min() and scale.max() < 1.3 and np.abs(yaw).max() <= 1.0
    assert np.abs(np.diff(roll)).max() < 5.0
    au2, pose2 = sample_trajectory(400, 7)
    np.testing.assert_array_equal(au, au2)
    np.testing.assert_array_equal(pose, pose2)
    assert not np.array_equal(au, sample_trajectory(400, 8)[0])


def test_png_round_trip(tmp_path):
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    write_png(tmp_path / "x.png", img)
    back = load_image(tmp_path / "x.png", size=20)  # centre-crops 30 -> 20 columns, no resampling
    decoded = (back.numpy() * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(decoded, img[:, 5:25])


def test_generate_dataset_layout_labels_and_determinism(tmp_path):
    config = SyntheticConfig(
        identities=2, videos_per_identity=2, frames_per_video=6, size=32, seed=11, tracks_per_video=2
    )
    summary = generate_dataset(tmp_path / "a", config)
    assert summary["tracks"] == 8 and summary["frames"] == 48 and summary["au_names"] == list(AU_NAMES)
    tracks = sorted((tmp_path / "a").glob("*/*/*"))
    names = [t.relative_to(tmp_path / "a").as_posix() for t in tracks[:2]]
    assert names == ["id0000/vid00/track0", "id0000/vid00/track1"]
    assert len(tracks) == 8
    for track in tracks:
        assert sorted(p.name for p in track.glob("*.png")) == [f"{f:06d}.png" for f in range(6)]
        with (track / "labels.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["frame", *AU_NAMES, *(f"{n}_occ" for n in AU_NAMES), *POSE_NAMES]
        assert [int(r["frame"]) for r in rows] == list(range(6))
        for r in rows:
            for n in AU_NAMES:
                assert 0.0 <= float(r[n]) <= 1.0
                assert int(r[f"{n}_occ"]) == int(float(r[n]) > OCCURRENCE_THRESHOLD)
            assert 0.5 < float(r["scale"]) < 1.5 and -1.0 <= float(r["yaw"]) <= 1.0
    assert load_image(tracks[0] / "000000.png", 32).shape == (3, 32, 32)
    generate_dataset(tmp_path / "b", config)
    for path in (tmp_path / "a").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_generate_dataset_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        generate_dataset(tmp_path, SyntheticConfig(identities=0))
    with pytest.raises(ValueError, match="at least 16"):
        generate_dataset(tmp_path, SyntheticConfig(size=8))
    with pytest.raises(ValueError, match="au_style"):
        generate_dataset(tmp_path, SyntheticConfig(au_style="painted"))


def test_au_style_changes_the_frames_not_the_labels(tmp_path):
    for style in AU_STYLES:
        summary = generate_dataset(tmp_path / style, SyntheticConfig(identities=1, videos_per_identity=1,
                                                                     frames_per_video=4, size=32, au_style=style))
        assert summary["au_style"] == style
    track = "id0000/vid00/track0"
    labels = [(tmp_path / s / track / "labels.csv").read_text() for s in AU_STYLES]
    assert labels[0] == labels[1]
    rows = list(csv.DictReader(labels[0].splitlines()))
    for f in range(4):
        au = [float(rows[f][n]) for n in AU_NAMES]
        pose = [float(rows[f][n]) for n in POSE_NAMES]
        warped = load_image(tmp_path / "warp" / track / f"{f:06d}.png", size=32).numpy().transpose(1, 2, 0)
        # labels.csv rounds the intensities and pose: one grey level of slack.
        expected = render_frame(sample_identity(np.random.default_rng([0, 0, 0])), au, pose, 32, "warp")
        assert np.abs(warped * 255 - expected).max() <= 1.5


def test_head_motion_scales_the_pose_around_neutral(tmp_path):
    au, pose = sample_trajectory(50, 3)
    au_half, pose_half = sample_trajectory(50, 3, head_motion=0.5)
    _, still = sample_trajectory(50, 3, head_motion=0.0)
    np.testing.assert_array_equal(au, au_half)  # the AUs do not depend on it
    neutral = Pose().as_array()
    np.testing.assert_allclose(still, np.broadcast_to(neutral, still.shape))
    np.testing.assert_allclose(pose_half[:, :4] - neutral[:4], 0.5 * (pose[:, :4] - neutral[:4]), atol=1e-12)
    with pytest.raises(ValueError, match="head_motion"):
        generate_dataset(tmp_path, SyntheticConfig(head_motion=-1.0))
