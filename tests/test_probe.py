"""The AU probe: F1, ridge R², the detector, and the report from a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tcae.probe as probe_module
from tcae.labels import LabelledFrames
from tcae.model import TCAE, TCAEConfig
from tcae.probe import (EMBEDDINGS, NonFiniteModelError, best_thresholds, f1_scores, fit_detector, format_report,
                        probe, probe_checkpoint, ridge_r2, select_alpha)
from tcae.synthetic import AU_NAMES, POSE_NAMES, SyntheticConfig, generate_dataset
from tcae.config import TrainConfig
from tcae.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, SyntheticConfig(identities=4, videos_per_identity=1, frames_per_video=10, size=64))
    return root


def test_f1_by_hand():
    truth = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1]])
    predicted = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    valid = np.ones_like(truth, dtype=bool)
    valid[3, 2] = False  # a hit that is not coded does not count
    # AU 0: tp 1, fp 1, fn 1 → 0.5; AU 1: no positive predicted, one missed → 0; AU 2: tp 2, fp 0, fn 0 → 1.
    assert f1_scores(predicted, truth, valid).tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert f1_scores(np.zeros((2, 1)), np.zeros((2, 1)), np.ones((2, 1))).tolist() == [0.0]


def test_ridge_r2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = x @ rng.normal(size=(8, 2)) + 0.5
    r2 = ridge_r2(x[:150], y[:150], x[150:], y[150:], alpha=1e-6)
    assert r2 == pytest.approx([1.0, 1.0], abs=1e-6)
    noise = ridge_r2(x[:150], rng.normal(size=(150, 2)), x[150:], rng.normal(size=(50, 2)))
    assert (noise < 0.2).all()


def test_ridge_penalty_is_chosen_on_held_out_groups():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 40))
    groups = [f"id{i // 20}" for i in range(120)]
    signal = x[:, :1] * 2.0
    assert select_alpha(x, signal, groups) <= 1.0
    # Each identity has its own feature code and its own target value: a fit
    # memorizes the training identities and predicts nothing about a new one.
    member = np.arange(120) // 20
    codes = rng.normal(size=(6, 40)) * 3
    assert select_alpha(x + codes[member], rng.normal(size=(6, 1))[member], groups) >= 1e3


def test_detector_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, 16, generator=g) * 3 + 5  # BatchNorm removes the offset and scale
    labels = (features[:, :3] > 5).float()
    valid = torch.ones_like(labels, dtype=torch.bool)
    detector = fit_detector(features[:200], labels[:200], valid[:200], epochs=60, lr=3e-2)
    assert [type(m).__name__ for m in detector] == ["BatchNorm1d", "Linear"] and detector[1].bias is None
    with torch.no_grad():
        predicted = (detector(features[200:]) > 0).numpy()
    assert f1_scores(predicted, labels[200:].numpy(), valid[200:].numpy()).min() > 0.9


def test_thresholds_are_chosen_for_f1_on_the_training_frames():
    rng = np.random.default_rng(0)
    truth = (rng.random((400, 2)) < 0.2).astype(np.float32)
    # Positives score higher, but all logits sit below 0: threshold 0 finds no positive at all.
    logits = rng.normal(size=(400, 2)) * 0.5 - 4 + 2 * truth
    valid = np.ones_like(truth, dtype=bool)
    assert (logits < 0).all() and f1_scores(logits > 0, truth, valid).max() == 0.0
    thresholds = best_thresholds(logits, truth, valid)
    assert (thresholds < 0).all() and np.isfinite(thresholds).all()
    assert f1_scores(logits > thresholds, truth, valid).min() > 0.5
    # A detector that knows nothing falls back to always-present, the best F1 a constant answer gets.
    assert (best_thresholds(np.zeros((400, 2)), truth, valid) == -np.inf).all()
    noise = rng.normal(size=(400, 2))
    always = f1_scores(np.ones_like(truth), truth, valid)
    assert (f1_scores(noise > best_thresholds(noise, truth, valid), truth, valid) >= always).all()


def test_probe_reports_f1_and_r2_in_range(data):
    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=64, width=0.125, embed_dim=32, backend="grid_sample"))
    report = probe(model, data, held_out=1, seed=0, epochs=5)
    assert report["au_names"] == list(AU_NAMES) and report["pose_names"] == list(POSE_NAMES)
    assert len(report["test_identities"]) == 1 and len(report["train_identities"]) == 3
    assert (report["n_train"], report["n_test"]) == (30, 10)
    for kind in EMBEDDINGS:
        f1 = report["f1"][kind]
        assert set(f1) == {*AU_NAMES, "mean"}
        assert all(0.0 <= v <= 1.0 for v in f1.values())
        assert f1["mean"] == pytest.approx(np.mean([f1[a] for a in AU_NAMES]))
        r2 = report["pose_r2"][kind]
        assert set(r2) == {*POSE_NAMES, "mean"} and all(math.isfinite(v) and v <= 1.0 for v in r2.values())
    # The always-present floor, by hand from the test identity's labels: F1 = 2p / (p + n) for p positives of n.
    test = LabelledFrames(data, size=64, identities=report["test_identities"])
    occurrence = torch.stack([test[i]["au_occurrence"] for i in range(len(test))])
    positives = occurrence.sum(0)
    assert [report["f1_always_present"][a] for a in AU_NAMES] == pytest.approx(
        (2 * positives / (positives + len(test))).tolist())
    assert report["skipped_frames"] == 0
    text = format_report(report)
    assert "AU26" in text and "pose R²" in text and "yaw" in text and "skipped" not in text


def test_probe_regresses_pose_from_an_embedding_that_holds_it(tmp_path, monkeypatch):
    # 9 training identities: with the 3 of the shared fixture, the penalty chosen on held-out identities is the
    # largest, and R² is far below 0 even from this embedding.
    data = tmp_path / "data"
    generate_dataset(data, SyntheticConfig(identities=12, videos_per_identity=1, frames_per_video=10, size=16))
    real = probe_module.embed_frames

    def pose_in_pose_embedding(model, frames, **kwargs):
        found = real(model, frames, **kwargs)
        noise = torch.randn(len(found["identity"]), 8, generator=torch.Generator().manual_seed(0)) * 0.01
        found["pose_embedding"] = torch.cat([found["pose"], noise], 1)
        return found

    monkeypatch.setattr(probe_module, "embed_frames", pose_in_pose_embedding)
    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=64, width=0.125, embed_dim=8, backend="grid_sample"))
    report = probe(model, data, held_out=0.25, seed=0, epochs=1)
    assert report["pose_r2"]["pose_embedding"]["mean"] > 0.99  # the pose, read back from the embedding
    assert report["pose_r2"]["au_embedding"]["mean"] < 0.5  # a random encoder's embedding does not hold it


def test_probe_refuses_a_model_with_nan_weights(data, tmp_path):
    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=64, width=0.125, embed_dim=8, backend="grid_sample"))
    with torch.no_grad():
        model.encoder.trunk[0][0].weight[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteModelError, match=r"non-finite \(NaN or inf\) weights in 1 tensors, first "
                                                  r"\['encoder.trunk.0.0.weight'\]"):
        probe(model, data, held_out=1, epochs=1)


def test_probe_counts_unreadable_frames(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    for frame in sorted(root.rglob("*.png"))[:3]:
        frame.write_bytes(b"not a png")
    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=64, width=0.125, embed_dim=8, backend="grid_sample"))
    with pytest.warns(RuntimeWarning, match="unreadable frame"):
        report = probe(model, root, held_out=1, seed=0, epochs=1)
    assert report["skipped_frames"] == 3
    assert "3 unreadable frames skipped" in format_report(report)


def test_probe_checkpoint_uses_the_runs_split(data, tmp_path):
    config = TrainConfig(data=str(data), out=str(tmp_path), model={"image_size": 64, "width": 0.125,
                                                                   "backend": "grid_sample"},
                         batch_size=4, steps=1, val_every=-1, panel_every=0, num_workers=0, held_out=0.25, seed=3)
    model, _ = train(config)
    # Data, split and seed from the checkpoint; the restored model embeds exactly like the trained one.
    restored = probe_checkpoint(tmp_path / "checkpoint.pt", epochs=2)
    assert restored == probe(model, data, held_out=0.25, seed=3, epochs=2)
