"""The learning check, small: held-out reconstruction must drop below the identity baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcae.learning import LearningCheck, check_learning, format_learning

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = {"recon_l1", "identity_l1", "au_f1", "au_f1_always_present", "au_f1_random_encoder", "pose_r2_pose_embedding",
        "pose_r2_au_embedding", "recipe", "minutes"}


def test_tiny_run_learns(tmp_path):
    # Two frames per video: the pairs differ mostly by the crop jitter, the easiest motion to learn.
    check = LearningCheck(identities=16, videos=2, frames=2, width=0.125, batch_size=16, steps=300, val_every=300,
                          val_batches=2, probe_epochs=2, backend="grid_sample")
    report = check_learning(tmp_path, check, threads=1)
    # The fast recipe starts from δ = 0, where the reconstruction is the source and its L1 is exactly
    # the identity baseline: only learning about the pairs takes it below.
    assert report["recon_l1"] < report["identity_l1"], format_learning(report)
    assert KEYS <= set(report) and report["recipe"] == "fast"
    assert json.loads((tmp_path / "learning.json").read_text()) == report
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "panel.png").is_file()
    # The JSON is committed: its paths name the check's folder, not this machine's.
    paths = report["train_config"]["data"], report["train_config"]["out"]
    assert all(not Path(p).is_absolute() and (tmp_path / p).is_dir() for p in paths), paths
    assert "reconstruction L1" in format_learning(report)
