"""The README's integration examples run and do what they say, on tiny inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flow_backward_warp_recovers_the_flow():
    r = load("flow_backward_warp").main(size=24, steps=60)
    assert r["l1_after"] < 0.3 * r["l1_before"]
    assert r["epe_after"] < 0.5 * r["epe_before"]


def test_registration_aligns_the_images():
    r = load("registration").main(size=32, steps=60, control=4)
    assert r["mse_after"] < 0.2 * r["mse_before"]
    assert r["disp_err_after"] < 0.7 * r["disp_err_before"]


def test_frame_interpolation_beats_averaging_the_frames():
    r = load("frame_interpolation").main(size=32)
    assert r["softmax_splat"] < 0.6 * r["baseline_average_frames"]
