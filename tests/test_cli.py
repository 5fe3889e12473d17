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

from tcae.cli import main
from tcae_kernels import cpu
from tcae.frames import FramePairDataset
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
    assert summary["videos_ok"] == 2 and summary["frames_read"] == 16
    assert summary["frames_written"] >= 12 and summary["tracks"] >= 2
    for name in ("clip_a", "clip_b"):
        assert len(list((out / name / name / "track0").glob("*.png"))) >= 2
    assert FramePairDataset(out, size=64)[0]["source"].shape == (3, 64, 64)


def test_train_then_probe(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", str(data), "--identities", "4", "--videos", "1", "--frames", "6"])
    run = tmp_path / "run"
    flags = ["--data", str(data), "--out", str(run), "--image-size", "64", "--width", "0.125", "--batch-size", "4",
             "--pairs-per-identity", "4", "--val-every", "-1", "--panel-every", "0", "--num-workers", "0",
             "--backend", "grid_sample", "--no-curriculum"]
    assert main(["train", *flags, "--steps", "1"]) == 0
    assert main(["train", *flags, "--steps", "2", "--resume"]) == 0
    # A checkpoint alone is enough: its run's settings, with the flags given on top.
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--steps", "3"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["curriculum"], config["model"]["width"], config["steps"]) == (False, 0.125, 3)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    capsys.readouterr()

    report = tmp_path / "probe.json"
    assert main(["probe", str(run / "checkpoint.pt"), "--epochs", "2", "--json", str(report)]) == 0
    assert "AU detection F1" in capsys.readouterr().out
    assert set(json.loads(report.read_text())["f1"]) == {"au_embedding", "pose_embedding"}

    # Refusals are one clear line, not a traceback.
    assert main(["train", *flags, "--steps", "4", "--width", "0.25", "--resume"]) == 1
    assert "width: checkpoint 0.125, config 0.25" in capsys.readouterr().err
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    assert main(["probe", str(run / "checkpoint.pt")]) == 1
    assert "is corrupt" in capsys.readouterr().err


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
    assert 0.0 <= summary["au_f1"]["au_embedding"] <= 1.0 and set(summary["pose_r2"]) == {"au_embedding",
                                                                                            "pose_embedding"}
    if importlib.util.find_spec("bench") is None:
        assert summary["bench_table"] is None
    else:
        assert summary["bench_table"] and Path(summary["bench_table"]).is_file(), summary["bench_note"]
