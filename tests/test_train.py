"""Training: exact resume, checkpoint safety, NaN diagnostics, panels, config, DDP.

Tiny runs: 64 px, width 0.125, batch 4, grid_sample warp (the warp is tested
elsewhere; the Triton interpreter would make every step seconds long).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tcae.checkpoint as checkpoint_module
import tcae.config as config_module
import tcae.losses as losses_module
import tcae.monitor as monitor
import tcae.train as train_module
from tcae.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model, save_checkpoint
from tcae.batches import GlobalBatches
from tcae.config import TrainConfig, workers_and_threads
from tcae.errors import ConfigError, DataError
from tcae.frames import _decoder
from tcae.model import TCAE, TCAEConfig
from tcae.monitor import NonFiniteLossError, Progress
from tcae.panels import COLUMNS, SUM_COLUMN, caption, columns, flow_to_rgb, make_panel
from tcae.synthetic import SyntheticConfig, generate_dataset
from tcae.train import train

TIMING = ("img_per_s", "time")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, SyntheticConfig(identities=4, videos_per_identity=1, frames_per_video=6, size=64))
    return root


def tiny(data: Path, out: Path, **changes) -> TrainConfig:
    # 3 training identities × 5 pairs = 15 pairs: 3 batches of 4 per epoch, so 6 steps cross two epochs.
    model = dict(image_size=64, width=0.125, backend="grid_sample")
    model.update({k: changes.pop(k) for k in list(changes) if k in model})
    settings = dict(data=str(data), out=str(out), model=model, batch_size=4, steps=6, pairs_per_identity=5,
                    log_every=1, val_every=2, val_batches=1, panel_every=0, ckpt_every=2, num_workers=0, threads=1,
                    tensorboard=False)
    return TrainConfig(**{**settings, **changes})


def load_image_array(path: Path) -> np.ndarray:
    image = _decoder()(path)
    assert image is not None, f"{path} does not decode"
    return image


def metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 2-step run; returns its checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    train(tiny(data, out, steps=2))
    return out / "checkpoint.pt"


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(tiny(data, whole))

    # Same run, killed as it starts writing the step-6 checkpoint: steps 5
    # and 6 are logged, checkpoint.pt still holds step 4 (mid-epoch).
    broken = tmp_path / "broken"
    real_save = train_module.save_checkpoint

    def killed_at_6(path, state):
        if state["step"] == 6:
            raise KeyboardInterrupt
        return real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, broken))
    monkeypatch.undo()
    state = load_checkpoint(broken / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["consumed"]) == (4, 1, 1)

    model, summary = train(tiny(data, broken), resume="")
    assert summary["steps"] == 6
    assert metrics(broken) == metrics(whole)  # every loss term, lr, window and val loss, bitwise
    resumed, uninterrupted = load_checkpoint(broken / "checkpoint.pt"), load_checkpoint(whole / "checkpoint.pt")
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def test_checkpoint_holds_full_state(trained):
    state = load_checkpoint(trained)
    assert {"model", "optimizer", "scheduler", "curriculum", "rng", "step", "epoch", "consumed",
            "config"} <= set(state)
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])
    assert {"lo", "hi", "best", "stale", "lr_scale"} <= set(state["curriculum"])
    assert state["config"]["model"]["width"] == 0.125 and state["step"] == 2


def test_model_is_rebuilt_from_the_checkpoint(data, trained):
    # No width, size or padding given: the config inside the checkpoint is enough.
    model, config = load_model(trained)
    assert (model.config.width, model.config.image_size, model.config.padding) == (0.125, 64, "border")
    saved = load_checkpoint(trained)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_incompatible_config_is_refused(data, trained, tmp_path):
    config = tiny(data, tmp_path, width=0.25, image_size=128)
    with pytest.raises(CheckpointError) as e:
        train(config, resume=trained)
    message = str(e.value)
    assert "width: checkpoint 0.125, config 0.25" in message
    assert "image_size: checkpoint 64, config 128" in message
    assert "embed_dim" not in message
    check_compatible(load_checkpoint(trained)["config"], tiny(data, tmp_path, lr=0.5).as_dict())  # lr may change


def test_corrupt_checkpoint_is_detected(data, trained, tmp_path):
    blob = trained.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(blob[: len(blob) // 2])
    flipped = tmp_path / "flipped.pt"
    damaged = bytearray(blob)
    damaged[len(blob) * 3 // 4] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    for path in (truncated, flipped):
        with pytest.raises(CheckpointError, match="is corrupt"):
            load_checkpoint(path)
    stranger = tmp_path / "stranger.pt"
    torch.save({"model": {}}, stranger)
    with pytest.raises(CheckpointError, match="not a TCAE checkpoint"):
        load_checkpoint(stranger)
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(tiny(data, tmp_path / "run"), resume=truncated)


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(4.0)})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(10_000)})
    monkeypatch.undo()
    state = load_checkpoint(path, keys=())
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert list(tmp_path.iterdir()) == [path]


def test_kill_during_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    # The process dies (SIGKILL: no cleanup) after the new bytes are written, before the rename.
    script = textwrap.dedent(f"""
        import os, signal, torch
        import tcae.checkpoint as c
        c.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        c.save_checkpoint({str(path)!r}, {{"step": 2, "weights": torch.zeros(100_000)}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(path, keys=())["step"] == 1
    stale = path.with_name("checkpoint.pt.tmp")
    assert stale.exists()  # the next save overwrites it
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path, keys=())["step"] == 3 and not stale.exists()


def test_non_finite_loss_stops_with_diagnostic(data, tmp_path, monkeypatch):
    real = train_module.compute_losses
    calls = []

    def poisoned(model, out, source, target, weights=None):
        losses, total = real(model, out, source, target, weights)
        if torch.is_grad_enabled():  # training steps, not validation
            calls.append(1)
            if len(calls) == 3:
                nan = torch.zeros_like(total)
                nan[1] = math.nan
                losses = {**losses, "cycle_au": losses["cycle_au"] + nan}
                total = total + nan
        return losses, total

    monkeypatch.setattr(train_module, "compute_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny(data, out))
    message = str(e.value)
    assert "step 3" in message
    assert "cycle_au" in message and "recon:" not in message
    assert "samples [1]" in message
    assert "sample 1: identity id00" in message and "track id00" in message and "frames " in message
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # nothing trained on the NaN


def test_panels_and_metrics(data, tmp_path):
    out = tmp_path / "run"
    _, summary = train(tiny(data, out, steps=2, panel_every=1, panel_samples=3))
    assert [Path(p).name for p in summary["panels"]] == ["step_000001.png", "step_000002.png"]
    # A picture: decodable, one row per sample of eight columns (wider than tall), not blank.
    image = load_image_array(Path(summary["panels"][-1]))
    assert image.shape[1] > 2 * image.shape[0] and image.std() > 10
    records = metrics(out)
    steps = [r for r in records if "recon" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {"total", "loss", "lr", "window", "grad_norm", "cycle_au", "au_sparsity", "identity", "recon_ratio",
                "disp_au_mean_px", "disp_pose_max_px"} <= set(r)
        assert set(r["grad_norms"]) == {"encoder.trunk", "encoder.au_branch", "encoder.pose_branch", "au_decoder",
                                        "pose_decoder"}
        assert all(v > 0 for v in r["grad_norms"].values())
        assert math.isfinite(r["total"]) and r["lr"] == pytest.approx(1e-3)
        assert r["identity"] > 0 and r["recon_ratio"] == pytest.approx(r["recon"] / r["identity"])
    val = [r for r in records if "val_pixel_loss" in r]
    assert val and all(r["val_identity"] > 0 and r["val_recon"] > 0 for r in val)
    assert summary["img_per_s"] > 0 and summary["val"]["recon"] > 0
    assert summary["implementation"] == "grid_sample" and summary["threads"] == 1


def test_plain_panel_grid_has_one_tile_per_column():
    model = TCAE(TCAEConfig(image_size=64, width=0.125, backend="grid_sample")).eval()
    source, target = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        image = make_panel(source, target, model(source, target), zoom=2)
    tile = 64 * 2
    assert image.shape == (3 * tile + 2 * 2, len(COLUMNS) * tile + (len(COLUMNS) - 1) * 2, 3)
    # The source tile is the source, scaled to bytes.
    expected = (source[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(image[:tile:2, :tile:2], expected)


def test_summed_model_panel_shows_the_merged_displacement():
    # merge="sum" has no attention: the last column is δ = δ_AU + δ_pose, and the caption says so.
    model = TCAE(TCAEConfig(image_size=64, width=0.125, backend="grid_sample", merge="sum")).eval()
    source, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(source, target)
    image = make_panel(source, target, out, scale_px=8.0, zoom=1, merge="sum")
    last = image[:64, -64:]
    assert np.array_equal(last, flow_to_rgb(out.disp[0].numpy(), 8.0))
    assert not np.array_equal(last, flow_to_rgb(out.disp_pose[0].numpy(), 8.0))
    assert columns("sum")[-1] == SUM_COLUMN and "Attention" not in caption(8.0, "sum")
    assert columns("attention") == COLUMNS and "Attention" in caption(8.0)


def test_flow_colours():
    disp = np.zeros((2, 2, 3))
    disp[0, 0, 1] = 2.0  # +x: red
    disp[1, 1, 2] = 2.0  # +y: a quarter turn of hue, yellow-green
    rgb = flow_to_rgb(disp)
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # still: white
    assert tuple(rgb[0, 1]) == (255, 0, 0)
    assert rgb[1, 2, 1] == 255 and rgb[1, 2, 2] == 0 and rgb[1, 2, 0] < 255


def test_global_batches_shard_and_resume():
    whole = list(GlobalBatches(20, 4, seed=3))
    assert len(whole) == 5 and sorted(i for b in whole for i in b) == sorted(set(i for b in whole for i in b))
    ranks = [list(GlobalBatches(20, 4, rank=r, world=2, seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole
    later = GlobalBatches(20, 4, seed=3)
    later.set_position(0, 2)
    assert list(later) == whole[2:]
    later.set_position(1, 0)
    assert list(later) != whole
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatches(20, 3, world=2)


def test_config_from_file_and_flags(tmp_path):
    parser = argparse.ArgumentParser()
    config_module.add_config_arguments(parser)
    toml = tmp_path / "run.toml"
    toml.write_text('data = "faces"\nimage_size = 128\noptimizer = "adam"\ncurriculum = false\n')
    config = config_module.config_from_args(parser.parse_args(["--config", str(toml), "--image-size", "64"]))
    assert (config.data, config.model.image_size, config.optimizer, config.curriculum) == ("faces", 64, "adam", False)
    assert (config.batch_size, config.lr, config.momentum) == (64, 1e-3, 0.9)  # SPEC defaults
    assert config.recipe == "faithful"
    # The model's fields nest; padding and in_channels are reachable from the command line.
    config = config_module.config_from_args(parser.parse_args(["--padding", "zeros", "--in-channels", "1",
                                                              "--recipe", "fast", "--lr", "5e-4"]))
    assert (config.model.padding, config.model.in_channels, config.model.pose_grid) == ("zeros", 1, 4)
    assert (config.recipe, config.optimizer, config.lr) == ("fast", "adam", 5e-4)  # flags beat the recipe
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"image_size": 64, "learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        config_module.config_from_args(parser.parse_args(["--config", str(bad)]))
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_cosine_schedule():
    config = TrainConfig(schedule="cosine", warmup_steps=10, steps=110, min_lr_ratio=0.1)
    factors = [train_module.lr_factor(config, s) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_aux_warm_up_factor():
    config = TrainConfig(aux_delay_steps=10, aux_ramp_steps=4)
    factors = [train_module.aux_factor(config, s) for s in range(16)]
    assert factors == [0.0] * 11 + [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [train_module.aux_factor(TrainConfig(aux_delay_steps=2), s) for s in range(4)] == [0, 0, 1, 1]
    assert train_module.aux_factor(TrainConfig(), 0) == 1.0


def test_fast_recipe_nests_its_model_settings():
    config = TrainConfig.from_recipe("fast", model={"image_size": 64})
    assert (config.model.image_size, config.model.pose_grid, config.model.merge) == (64, 4, "sum")
    assert TrainConfig.from_recipe("fast", model={"pose_grid": 0}).model.pose_grid == 0  # changes beat it


def test_delayed_au_displacement_and_aux_losses(data, tmp_path):
    # Steps 0-2 train with δ_AU held at 0 and no cycle or consistency loss; step 3 turns both on (its
    # forward still has δ_AU = 0: the first update that moves it is step 3's own). The blurred
    # reconstruction is not one of those losses: its weight holds from the start.
    out = tmp_path / "run"
    model, _ = train(tiny(data, out, steps=4, still_start=True, curriculum=False, au_delay_steps=3,
                          aux_delay_steps=3, blur_weight=3.0, val_every=-1, ckpt_every=0))
    rows = [m for m in metrics(out) if "recon" in m]
    for row in rows:
        assert row["recon_blur"] > 0
        pixel_and_sparsity = 10 * row["recon"] + 3.0 * row["recon_blur"] + 0.1 * row["au_sparsity"]
        aux = sum(row[name] for name in losses_module.AUX_TERMS)
        assert aux > 0
        expected = pixel_and_sparsity + (aux if row["step"] == 4 else 0.0)
        assert row["loss"] == pytest.approx(expected, rel=1e-5), row["step"]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(row["disp_au_max_px"] == 0 for row in rows)
    assert all(row["disp_pose_max_px"] > 0 for row in rows[1:])
    assert model.au_decoder.output.weight.abs().sum() > 0 and model.pose_decoder.output.weight.abs().sum() > 0
    held = tiny(data, tmp_path / "held", steps=3, still_start=True, au_delay_steps=3, val_every=-1, ckpt_every=0)
    model, _ = train(held)
    assert not model.au_decoder.output.weight.any() and not model.au_decoder.output.bias.any()
    assert model.pose_decoder.output.weight.any()


DDP_DRIVER = """
import os, sys, torch
from tcae.config import TrainConfig
from tcae.train import train
config = TrainConfig(**{settings})
model, _ = train(config)
torch.save({{n: p.detach() for n, p in model.named_parameters()}},
           os.path.join(config.out, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_ddp_replicas_stay_identical(data, tmp_path):
    out = tmp_path / "run"
    config = tiny(data, out, steps=3, val_every=2, panel_every=3, ckpt_every=0, device="cpu").as_dict()
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(settings=repr(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # grid_sample backend: not needed
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["world_size"] == 2 and saved["step"] == 3
    for name, value in ranks[0].items():
        assert torch.equal(ranks[1][name], value), name
        assert torch.equal(saved["model"][name], value), name
    torch.manual_seed(0)  # train() seeds with config.seed before building the model
    initial = TCAE(tiny(data, out).model)
    assert not torch.equal(dict(initial.named_parameters())["encoder.trunk.0.0.weight"],
                           ranks[0]["encoder.trunk.0.0.weight"])
    # Only rank 0 writes: one metrics line per step and a single panel.
    assert len([r for r in metrics(out) if "recon" in r]) == 3
    assert [p.name for p in (out / "panels").iterdir()] == ["step_000003.png"]


def test_resume_on_finished_run_is_a_no_op(data, trained, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(trained, out / "checkpoint.pt")
    shutil.copy(trained.parent / "metrics.jsonl", out / "metrics.jsonl")
    model, summary = train(tiny(data, out, steps=2), resume="")
    assert "nothing to do: the run already reached step 2" in capsys.readouterr().out
    assert summary["steps"] == 2 and "nothing to do" in summary["note"]
    # Nothing trained, nothing written: the files are byte for byte the finished run's.
    assert (out / "checkpoint.pt").read_bytes() == trained.read_bytes()
    assert (out / "metrics.jsonl").read_bytes() == (trained.parent / "metrics.jsonl").read_bytes()
    assert not (out / "config.json").exists()
    saved = load_checkpoint(trained)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("setting, value, message", [
    ("grad_clip", -1.0, "grad_clip must be at least 0 (0 = no clipping), got -1.0"),
    ("min_lr_ratio", -3.0, "min_lr_ratio must be in [0, 1]"),
    ("momentum", 5.0, "momentum must be in [0, 1)"),
    ("lr", 0.0, "lr must be positive, got 0.0"),
    ("threads", 100_000, "threads must be in [0, 1024]"),
    ("jitter", "false", "jitter must be true or false, got 'false' (str)"),
    ("steps", 2.5, "steps must be an integer, got 2.5 (float)"),
    ("model", {"width": "0.25"}, "width must be a number, got '0.25' (str)"),
    ("model", {"width": -1.0}, "width must be in (0, 16.0], got -1.0"),
    ("aux_ramp_steps", -1, "aux_ramp_steps must be at least 0, got -1"),
    ("blur_weight", -0.5, "blur_weight must be at least 0, got -0.5"),
    ("au_delay_steps", 10, "au_delay_steps (10) holds δ_AU at 0 by not updating the zeroed output conv of "
                           "still_start: it needs still_start"),
])
def test_settings_are_checked_at_the_door(setting, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{setting: value})
    assert message in str(e.value)


def test_config_file_values_are_checked(tmp_path):
    parser = argparse.ArgumentParser()
    config_module.add_config_arguments(parser)
    for values, message in [({"deterministic": "false"}, "unknown settings ['deterministic']"),
                            ({"curriculum": "false"}, "curriculum must be true or false, got 'false'"),
                            ({"width": "0.25"}, "width must be a number, got '0.25'"),
                            ({"model": {"image_size": 64.0}}, "image_size must be an integer, got 64.0"),
                            ([1, 2], "must hold a table of settings")]:
        path = tmp_path / "run.json"
        path.write_text(json.dumps(values))
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_module.config_from_args(parser.parse_args(["--config", str(path)]))
    path.write_text('{"lr": 1e-3,')
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(path))} cannot be read"):
        config_module.config_from_args(parser.parse_args(["--config", str(path)]))
    # An integer where a number is due is a number.
    path.write_text(json.dumps({"lr": 1, "width": 1}))
    config = config_module.config_from_args(parser.parse_args(["--config", str(path)]))
    assert (config.lr, config.model.width) == (1.0, 1.0) and type(config.lr) is float


def test_a_run_folder_has_one_writer(data, tmp_path):
    from tcae.rundir import LOCK_NAME, RunLock, RunLockedError

    out = tmp_path / "run"
    with RunLock(out), pytest.raises(RunLockedError, match=f"in use by another run \\(PID {os.getpid()}\\)"):
        train(tiny(data, out, steps=1))
    assert not (out / "metrics.jsonl").exists()
    # A lock left by a process that died (its PID, no flock held) is taken over with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")
    with pytest.warns(RuntimeWarning, match=f"taking over the lock of PID {dead.pid}"):
        _, summary = train(tiny(data, out, steps=1))
    assert summary["steps"] == 1 and load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert (out / LOCK_NAME).read_text() == ""  # released


def test_resume_drops_a_torn_last_metrics_line(data, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained.parent, out)
    log = out / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "recon": 0.0')  # a run killed in the middle of a line
    with pytest.warns(RuntimeWarning, match=f"{re.escape(str(log))}: dropping its last line"):
        train(tiny(data, out, steps=3), resume="")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert log.read_text().startswith(whole) and records[-1]["step"] == 3
    # Garbage before the last line is not guessed at: the error names the file and line.
    lines = whole.splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=f"{re.escape(str(log))} line 2 is not a metrics record"):
        train(tiny(data, out, steps=4), resume="")


def test_checkpoint_refusals_name_the_file(trained, tmp_path):
    folder = trained.parent
    with pytest.raises(CheckpointError, match=f"is a folder, not a checkpoint file; its checkpoint is {trained}"):
        load_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    state = load_checkpoint(trained)
    # A checkpoint carrying a pickled object: refused, never loaded with full pickle.
    pickled = tmp_path / "pickled.pt"
    save_checkpoint(pickled, {**state, "extra": argparse.Namespace(x=1)})
    with pytest.raises(CheckpointError, match="objects other than tensors") as e:
        load_checkpoint(pickled)
    assert "weights_only" not in str(e.value)
    incomplete = tmp_path / "incomplete.pt"
    save_checkpoint(incomplete, {k: v for k, v in state.items() if k not in ("optimizer", "rng")})
    load_model(incomplete)  # the model alone is there
    with pytest.raises(CheckpointError, match="lacks optimizer, rng"):
        load_checkpoint(incomplete, keys=checkpoint_module.TRAINING_KEYS)
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, {**state, "model": {k: v for k, v in state["model"].items() if "trunk" not in k}})
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_model(wrong)


def test_disk_full_while_checkpointing_keeps_the_previous_one(data, tmp_path, monkeypatch):
    real_save = train_module.save_checkpoint

    def disk_full_at_4(path, state):
        if state["step"] == 4:
            raise OSError(28, "No space left on device")
        return real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", disk_full_at_4)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        train(tiny(data, out))
    assert str(e.value) == (f"cannot write the step-4 checkpoint {out / 'checkpoint.pt'}: No space left on device; "
                            f"the previous checkpoint {out / 'checkpoint.pt'} (step 2) is intact")
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_unreadable_frames_are_counted_across_loader_workers(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    for frame in (root / "id0000" / "vid00" / "track0").glob("*.png"):  # all 6: the first pair finds them all
        frame.write_bytes(b"not a png")
    (root / "id0001" / "vid00" / "track0" / "999998.png").mkdir()  # named like a frame, not one
    (root / "id0001" / "vid00" / "track0" / "999999.png").symlink_to(tmp_path / "gone.png")
    out = tmp_path / "run"
    # One loader worker process: its skips reach the training process through the items.
    with pytest.warns(RuntimeWarning, match="named like a frame but a broken link"):
        _, summary = train(tiny(data=root, out=out, steps=3, num_workers=1, held_out=0.0, val_every=-1,
                                pairs_per_identity=40))
    assert summary["skipped_frames"] == 6 + 2
    logged = [r["skipped_frames"] for r in metrics(out) if "recon" in r]
    assert logged[-1] == 6 + 2 and logged == sorted(logged)
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")][-1]
    assert last.startswith("step 3/3 ") and "| 8 unreadable frames skipped" in last


def test_every_frame_unreadable_is_one_clear_error(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    for frame in root.rglob("*.png"):
        frame.write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="has two readable frames: .* unreadable"):
        train(tiny(data=root, out=tmp_path / "run", panel_every=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="device cuda asked for, but"):
        train(tiny(data, tmp_path / "run", device="cuda"))


def test_eta_counts_wall_clock_since_the_start(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: clock[0])
    progress = Progress(start=20, total=120, every=10, stream=io.StringIO())
    clock[0] += 50.0  # 10 steps, validation and checkpoints included, took 50 s
    assert progress.eta(30) == pytest.approx(90 * 5.0)
    progress.update(30, "loss 1.0")
    assert "eta 7m30s" in progress.stream.getvalue()


@pytest.mark.parametrize("cores, device, expected", [(2, "cpu", (0, 1)), (4, "cpu", (0, 3)), (16, "cpu", (2, 14)),
                                                     (64, "cpu", (4, 60))])
def test_cpu_workers_and_threads_follow_the_cores(monkeypatch, cores, device, expected):
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert workers_and_threads(TrainConfig(), torch.device(device)) == expected
    # Explicit settings win.
    assert workers_and_threads(TrainConfig(num_workers=3, threads=5), torch.device(device)) == (3, 5)
