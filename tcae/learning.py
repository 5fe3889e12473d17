"""The learning check: synthetic faces → training → probes, each number beside the baseline it must beat.

    tcae check-learning --out runs/check           # ≈ 30 min on two CPU cores
    report = check_learning(Path("runs/check"))    # from Python; LearningCheck() sets the sizes

It passes when, on identities never trained on,

- the reconstruction L1 is at most ``recon_ratio_max`` (0.5) × the identity
  baseline (the L1 of returning the source unchanged, on the same pairs);
- AU F1 from the AU embedding beats both the always-present detector and the
  same probe on a randomly initialised encoder;
- pose R² from the pose embedding beats pose R² from the AU embedding.

It writes ``OUT/checkpoint.pt``, ``OUT/panel.png`` (the final panel, and a
``.txt`` caption without matplotlib), ``OUT/learning.json`` and the run's
folder ``OUT/run`` (metrics, panels over time).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .frames import FramePairDataset
from .model import TCAE
from .probe import probe
from .synthetic import SyntheticConfig, generate_dataset
from .train import panel, train


@dataclass
class LearningCheck:
    """Sizes of the check. Synthetic identities are cheap, and 12 training identities are too few to
    generalise from (the issue's run): the default trains on 72 and holds out 24. ``head_motion`` scales
    the synthetic head's pose: with the full motion (1.0) even an encoder trained on the AU labels
    barely beats a random one on new identities (docs/learning.md, "Why the AU criterion fails")."""

    identities: int = 96
    videos: int = 2
    frames: int = 32
    head_motion: float = 0.5
    au_style: str = "drawn"
    jitter: bool = True
    image_size: int = 64
    width: float = 0.25
    batch_size: int = 16
    steps: int = 12000
    recipe: str = "fast"
    val_every: int = 500
    val_batches: int = 16
    probe_epochs: int = 30
    recon_ratio_max: float = 0.5
    backend: str = "triton"
    seed: int = 0


def check_learning(out: Path, check: LearningCheck = LearningCheck(), threads: int = 0) -> dict:
    """Run the check into ``out``; returns what ``learning.json`` holds (``passed`` and each criterion)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    print(f"[1/4] synthetic data: {check.identities} identities × {check.videos} videos × {check.frames} frames, "
          f"{check.image_size} px, AUs {check.au_style}", flush=True)
    generate_dataset(data, SyntheticConfig(identities=check.identities, videos_per_identity=check.videos,
                                           frames_per_video=check.frames, size=check.image_size, seed=check.seed,
                                           head_motion=check.head_motion, au_style=check.au_style))
    print(f"[2/4] training: recipe {check.recipe}, {check.steps} steps of {check.batch_size}", flush=True)
    config = TrainConfig.from_recipe(
        check.recipe, data=str(data), out=str(out / "run"),
        model={"image_size": check.image_size, "width": check.width, "backend": check.backend},
        batch_size=check.batch_size, jitter=check.jitter, steps=check.steps, val_every=check.val_every,
        val_batches=check.val_batches, panel_every=check.val_every, ckpt_every=check.val_every, log_every=50,
        seed=check.seed, threads=threads)
    model, run = train(config)
    shutil.copy(run["checkpoint"], out / "checkpoint.pt")
    val = run["val"]
    device = next(model.parameters()).device

    print("[3/4] AU and pose probes: the trained encoder, then a randomly initialised one", flush=True)
    learned = probe(model, data, held_out=config.held_out, seed=config.seed, epochs=check.probe_epochs, device=device)
    torch.manual_seed(config.seed)
    random = probe(TCAE(config.model).to(device), data, held_out=config.held_out, seed=config.seed,
                   epochs=check.probe_epochs, device=device)

    print("[4/4] final panel", flush=True)
    held_out_pairs = FramePairDataset(data, size=check.image_size, identities=learned["test_identities"],
                                      seed=config.seed)
    panel(model, [held_out_pairs[i] for i in range(min(6, len(held_out_pairs)))], config, device, out / "panel.png")

    au_f1 = learned["f1"]["au_embedding"]["mean"]
    report = {
        "recon_l1": val["recon"],
        "identity_l1": val["identity"],
        "recon_ratio": val["recon"] / val["identity"],
        "au_f1": au_f1,
        "au_f1_pose_embedding": learned["f1"]["pose_embedding"]["mean"],
        "au_f1_always_present": learned["f1_always_present"]["mean"],
        "au_f1_random_encoder": random["f1"]["au_embedding"]["mean"],
        "pose_r2_pose_embedding": learned["pose_r2"]["pose_embedding"]["mean"],
        "pose_r2_au_embedding": learned["pose_r2"]["au_embedding"]["mean"],
        "recipe": check.recipe,
        "minutes": (time.perf_counter() - start) / 60,
        "train_minutes": run["wall_seconds"] / 60,
        "steps": run["steps"],
        "implementation": run["implementation"],
        "threads": run["threads"],
        "held_out_identities": len(learned["test_identities"]),
        "au_f1_per_au": {k: v for k, v in learned["f1"]["au_embedding"].items() if k != "mean"},
        "settings": asdict(check),
        # Paths relative to ``out``: the JSON is committed and compared across machines.
        "train_config": {**config.as_dict(), "data": "data", "out": "run"},
    }
    report["criteria"] = {
        "recon_ratio <= recon_ratio_max": report["recon_ratio"] <= check.recon_ratio_max,
        "au_f1 > au_f1_always_present": au_f1 > report["au_f1_always_present"],
        "au_f1 > au_f1_random_encoder": au_f1 > report["au_f1_random_encoder"],
        "pose_r2_pose_embedding > pose_r2_au_embedding":
            report["pose_r2_pose_embedding"] > report["pose_r2_au_embedding"],
    }
    report["passed"] = all(report["criteria"].values())
    (out / "learning.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_learning(report: dict) -> str:
    """The check's numbers as a short table, each beside its baseline."""
    ok = {True: "PASS", False: "FAIL"}
    c = report["criteria"]
    lines = [
        f"learning check ({report['recipe']} recipe, {report['steps']} steps, {report['minutes']:.1f} min, "
        f"warp implementation {report['implementation']}), on {report['held_out_identities']} held-out identities:",
        f"  reconstruction L1 {report['recon_l1']:.4f} = {report['recon_ratio']:.2f} × identity baseline "
        f"{report['identity_l1']:.4f} (needs ≤ {report['settings']['recon_ratio_max']})  "
        f"{ok[c['recon_ratio <= recon_ratio_max']]}",
        f"  AU F1 (AU embedding) {report['au_f1']:.3f} vs always-present {report['au_f1_always_present']:.3f}  "
        f"{ok[c['au_f1 > au_f1_always_present']]}, vs random encoder {report['au_f1_random_encoder']:.3f}  "
        f"{ok[c['au_f1 > au_f1_random_encoder']]} (pose embedding: {report['au_f1_pose_embedding']:.3f})",
        f"  pose R² from the pose embedding {report['pose_r2_pose_embedding']:.3f} vs from the AU embedding "
        f"{report['pose_r2_au_embedding']:.3f}  {ok[c['pose_r2_pose_embedding > pose_r2_au_embedding']]}",
        f"  overall: {ok[report['passed']]}",
    ]
    return "\n".join(lines)
