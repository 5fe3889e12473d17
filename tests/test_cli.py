"""The ``tcae`` command: synth, prepare, train + probe, and a smoke run of the demo."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tcae.checkpoint import load_checkpoint, save_checkpoint
from tcae.cli import main
from tcae.config import TrainConfig
from tcae.model import TCAE, TCAEConfig
from tcae_kernels import cpu
from tcae.frames import FramePairDataset, split_identities
from tcae.labels import LabelledFrames
from tcae.synthetic import render_frame, sample_identity, sample_trajectory


pytestmark = pytest.mark.usefixtures("one_thread")


def test_synth(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--identities", "2", "--videos", "1", "--frames", "3", "--size", "32"]) == 0
    assert "wrote 6 frames of 2 identities" in capsys.readouterr().out
    track = out / "id0001" / "vid00" / "track0"
    assert sorted(p.name for p in track.iterdir()) == ["000000.png", "000001.png", "000002.png", "labels.csv"]
    assert len(LabelledFrames(out, size=32)) == 6
    warp = tmp_path / "warp"
    assert main(["synth", str(warp), "--identities", "2", "--videos", "1", "--frames", "3", "--size", "32",
                 "--au-style", "warp"]) == 0
    assert (warp / track.relative_to(out) / "labels.csv").read_text() == (track / "labels.csv").read_text()
    assert (warp / track.relative_to(out) / "000000.png").read_bytes() != (track / "000000.png").read_bytes()


def test_prepare_cuts_face_tracks_from_a_video(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    videos = [tmp_path / "clip_a.avi", tmp_path / "clip_b.avi"]
    identity = sample_identity(3)  # one the Haar cascade finds in every frame
    for seed, video in enumerate(videos):
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
        assert writer.isOpened()
        au, pose = sample_trajectory(8, seed)
        for f in range(8):
            frame = np.full((120, 160, 3), 90, np.uint8)
            frame[12:108, 32:128] = render_frame(identity, au[f], pose[f], 96)
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
        writer.release()

    out = tmp_path / "crops"
    assert main(["prepare", *map(str, videos), str(out), "--size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # A face in every frame, one steady track per video.
    assert (summary["videos_ok"], summary["frames_read"], summary["frames_without_face"]) == (2, 16, 0)
    assert (summary["frames_written"], summary["tracks"]) == (16, 2)
    for name in ("clip_a", "clip_b"):
        crops = sorted((out / name / name / "track0").glob("*.png"))
        assert [p.name for p in crops] == [f"{i:06d}.png" for i in range(8)]
        for crop in crops:
            image = cv2.imread(str(crop))
            # 64 px and a face: far from the flat grey-90 background around it.
            assert image.shape == (64, 64, 3) and np.abs(image[16:48, 16:48].astype(float) - 90).mean() > 20
    assert FramePairDataset(out, size=64)[0]["source"].shape == (3, 64, 64)


def test_prepare_names_a_missing_input(tmp_path, capsys):
    pytest.importorskip("cv2")
    assert main(["prepare", "videos/*.mp4", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == "error: no such file: videos/*.mp4 (a shell pattern that matched no file?)\n"


def test_train_then_probe(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", str(data), "--identities", "4", "--videos", "1", "--frames", "6"])
    run = tmp_path / "run"
    flags = ["--data", str(data), "--out", str(run), "--image-size", "64", "--width", "0.125", "--batch-size", "4",
             "--pairs-per-identity", "4", "--val-every", "-1", "--panel-every", "0", "--num-workers", "0",
             "--backend", "grid_sample", "--no-curriculum"]
    weights = []
    for argv in (["train", *flags, "--steps", "1"], ["train", *flags, "--steps", "2", "--resume"],
                 # A checkpoint alone is enough: its run's settings, with the flags given on top.
                 ["train", "--resume", str(run / "checkpoint.pt"), "--steps", "3"]):
        assert main(argv) == 0
        state = load_checkpoint(run / "checkpoint.pt")
        assert state["step"] == len(weights) + 1
        weights.append(state["model"]["encoder.trunk.0.0.weight"])
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])  # each step trained
    config = json.loads((run / "config.json").read_text())
    assert (config["curriculum"], config["model"]["width"], config["steps"]) == (False, 0.125, 3)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    capsys.readouterr()

    report = tmp_path / "probe.json"
    assert main(["probe", str(run / "checkpoint.pt"), "--epochs", "2", "--json", str(report)]) == 0
    assert "AU detection F1 on 1 held-out identities (6 frames; detector trained on 18)" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert set(saved["f1"]) == {"au_embedding", "pose_embedding"}
    assert (saved["n_train"], saved["n_test"], saved["skipped_frames"]) == (18, 6, 0)

    # Refusals are one clear line, not a traceback.
    assert main(["train", *flags, "--steps", "4", "--width", "0.25", "--resume"]) == 1
    assert "width: checkpoint 0.125, config 0.25" in capsys.readouterr().err
    assert main(["train", *flags, "--steps", "4", "--resume", str(run)]) == 1
    assert capsys.readouterr().err == (f"error: {run} is a folder, not a checkpoint file; its checkpoint is "
                                       f"{run / 'checkpoint.pt'}\n")
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    assert main(["probe", str(run / "checkpoint.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is corrupt" in err and err.count("\n") == 1


def _one_line_error(argv: list[str], capsys) -> str:
    """Runs a command that must fail; returns its error line, after one-line warnings at most."""
    assert main(argv) == 1
    *warned, error = capsys.readouterr().err.splitlines()
    assert error.startswith("error: ") and all(line.startswith("warning: ") for line in warned), warned + [error]
    return error


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "-1", "grad_clip must be at least 0 (0 = no clipping), got -1.0"),
    ("--min-lr-ratio", "-3", "min_lr_ratio must be in [0, 1]"),
    ("--momentum", "5", "momentum must be in [0, 1)"),
    ("--threads", "100000", "threads must be in [0, 1024]"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, flag, value, message):
    err = _one_line_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), flag, value], capsys)
    assert message in err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unusable_data_and_devices_are_one_line_errors(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", str(data), "--identities", "2", "--videos", "1", "--frames", "3", "--size", "32"])
    capsys.readouterr()
    flags = ["--data", str(data), "--image-size", "64", "--width", "0.125", "--batch-size", "2", "--steps", "1",
             "--backend", "grid_sample", "--num-workers", "0", "--held-out", "0", "--val-every", "-1"]
    if not torch.cuda.is_available():
        err = _one_line_error(["train", *flags, "--out", str(tmp_path / "a"), "--device", "cuda"], capsys)
        assert "device cuda asked for, but" in err
    labels = data / "id0000" / "vid00" / "track0" / "labels.csv"
    labels.write_bytes(b"\xff\xfe\x00frame")
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, {"config": TrainConfig(data=str(data), model={"image_size": 64, "width": 0.125,
                                                                              "backend": "grid_sample"}).as_dict(),
                                 "model": TCAE(TCAEConfig(image_size=64, width=0.125)).state_dict()})
    assert f"label file {labels} is not UTF-8 text" in _one_line_error(["probe", str(checkpoint)], capsys)
    for frame in data.rglob("*.png"):
        frame.write_bytes(b"not a png")
    err = _one_line_error(["train", *flags, "--out", str(tmp_path / "b"), "--panel-every", "0"], capsys)
    assert "has two readable frames" in err


def test_warnings_are_one_line(tmp_path, capsys):
    pytest.importorskip("cv2")
    absent = tmp_path / "absent.mp4"
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert main(["prepare", str(absent), str(tmp_path / "empty.mp4"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: skipping {absent}: no such file",
                   f"warning: skipping unreadable video {tmp_path / 'empty.mp4'}"]


def test_help_and_readme_agree_on_the_distributed_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "torchrun --nproc_per_node N -m tcae.cli train"
    assert command in " ".join(help_text.split())
    assert "-m tcae.cli train" in readme and "-m tcae.train" not in readme + help_text


def test_demo_quick(tmp_path):
    # As a user runs it: a fresh process, without the test suite's Triton interpreter
    # (the demo uses the "triton" backend, which on CPU then runs the compiled CPU kernels).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "tcae.cli", "demo", "--quick", "--steps", "2", "--out", str(out)],
                            env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TCAE demo summary" in result.stdout and "AU F1 (mean)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["backend"] == "triton"
    # What ran, not what was asked for: without a GPU or the interpreter, the compiled CPU
    # kernels (numba), or the eager PyTorch fallback without numba.
    ran = "numba" if cpu.available() else "pytorch"
    assert summary["implementation"] == ran and f"warp triton → {ran}" in result.stdout
    assert f"pictures: {out / 'run' / 'panels'}" in result.stdout
    assert (out / "run" / "checkpoint.pt").is_file() and (out / "run" / "metrics.jsonl").is_file()
    assert summary["panels"] and all(Path(p).is_file() for p in summary["panels"])
    assert set(summary["au_f1"]) == set(summary["pose_r2"]) == {"au_embedding", "pose_embedding"}
    # The probe's floor, recomputed from the labels of the held-out identities: F1 = 2p / (p + n).
    frames = LabelledFrames(out / "data", size=64)
    _, test_ids = split_identities(frames.identities, 0.25, 0)
    occurrence = np.array([frames[i]["au_occurrence"].numpy() for i in range(len(frames))
                           if frames[i]["identity"] in test_ids])
    positives = occurrence.sum(0)
    assert summary["au_f1_always_present"] == pytest.approx(np.mean(2 * positives / (positives + len(occurrence))))
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "recon" in r]
    assert [r["step"] for r in steps] == [1, 2] and summary["losses"]["recon"] == steps[-1]["recon"]
    if importlib.util.find_spec("bench") is None:
        assert summary["bench_table"] is None
    else:
        assert summary["bench_table"] and Path(summary["bench_table"]).is_file(), summary["bench_note"]


def test_check_learning_flags_reach_the_check(monkeypatch, tmp_path):
    import tcae.learning

    seen = {}

    class Stop(Exception):
        pass

    def fake(out, check, threads=0):
        seen.update(out=out, check=check, threads=threads)
        raise Stop

    monkeypatch.setattr(tcae.learning, "check_learning", fake)
    with pytest.raises(Stop):
        main(["check-learning", "--out", str(tmp_path), "--head-motion", "0", "--no-jitter", "--steps", "7",
              "--seed", "3", "--au-style", "warp"])
    check = seen["check"]
    assert (check.head_motion, check.jitter, check.steps, check.seed, check.au_style) == (0.0, False, 7, 3, "warp")
    with pytest.raises(Stop):
        main(["check-learning", "--out", str(tmp_path)])
    assert (seen["check"].head_motion, seen["check"].jitter, seen["check"].seed) == (0.5, True, 0)
