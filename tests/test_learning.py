"""The learning check, small: held-out reconstruction must drop below the identity baseline."""

from __future__ import annotations

import json

import pytest

from tcae.learning import LearningCheck, check_learning, format_learning

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = {"recon_l1", "identity_l1", "au_f1", "au_f1_always_present", "au_f1_random_encoder", "pose_r2_pose_embedding",
        "pose_r2_au_embedding", "recipe", "minutes"}


def test_tiny_run_learns(tmp_path):
    check = LearningCheck(identities=16, videos=1, frames=12, width=0.125, batch_size=8, steps=300, val_every=300,
                          val_batches=4, probe_epochs=3)
    report = check_learning(tmp_path, check, threads=1)
    # Trained from δ = 0 (the identity), so anything learned about the pairs takes it below the baseline.
    assert report["recon_l1"] < 0.97 * report["identity_l1"], format_learning(report)
    assert KEYS <= set(report) and report["recipe"] == "fast"
    assert json.loads((tmp_path / "learning.json").read_text()) == report
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "panel.png").is_file()
    assert "reconstruction L1" in format_learning(report)
