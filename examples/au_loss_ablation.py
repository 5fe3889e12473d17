"""Which of TCAE's losses keep it from learning the synthetic AUs? Train it with a chosen set.

On synthetic pairs where only the AUs move (the head still, no crop jitter),
the whole TCAE stays at the identity baseline (docs/learning.md, "Where the
self-supervised loop breaks"), yet its AU decoder can learn these AUs
(``examples/au_oracle.py``). This example trains the whole model, both
branches and the paper's attention merge, from δ = 0 with Adam 1e-3, on the
reconstruction loss (10 × L1, always on) plus the groups of the other terms
named by ``--keep``, at their original weights:

- ``consistency``: the six embedding-consistency MSE terms;
- ``cycles``: the two cycle L1 terms (each decoder undoing its own change);
- ``sparsity``: the AU displacement's L1 sparsity (0.1).

Printed every 250 steps: held-out reconstruction L1 over the identity
baseline (returning the source unchanged; below 1 is learning), and each
branch's mean displacement in pixels.

    python examples/au_loss_ablation.py --keep consistency cycles sparsity   # the whole loss
    python examples/au_loss_ablation.py --keep                               # reconstruction alone
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from tcae.frames import FramePairDataset, split_identities
from tcae.losses import CONSISTENCY_TERMS, CYCLE_TERMS, LossWeights, compute_losses
from tcae.model import TCAE, TCAEConfig
from tcae.synthetic import SyntheticConfig, generate_dataset

GROUPS = {"consistency": CONSISTENCY_TERMS, "cycles": CYCLE_TERMS, "sparsity": ("au_sparsity",)}


def weights(keep: tuple[str, ...]) -> LossWeights:
    """The original weights for the reconstruction and the kept groups, 0 for the rest."""
    kept = {"recon", *(name for group in keep for name in GROUPS[group])}
    return LossWeights(**{f.name: f.default if f.name in kept else 0.0 for f in fields(LossWeights)})


def stack(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it["source"] for it in items]), torch.stack([it["target"] for it in items])


def held_out_ratio(model: TCAE, pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """(reconstruction L1 / identity L1, mean |δ_AU| px, mean |δ_pose| px) on held-out pairs, eval mode."""
    model.eval()
    source, target = pairs
    with torch.no_grad():
        out = model(source, target)
    model.train()
    ratio = ((out.reconstruction - target).abs().mean() / (source - target).abs().mean()).item()
    return ratio, out.disp_au.norm(dim=1).mean().item(), out.disp_pose.norm(dim=1).mean().item()


def main(keep: tuple[str, ...] = tuple(GROUPS), steps: int = 1500, identities: int = 96, frames: int = 32,
         batch_size: int = 16, seed: int = 0, data: Path | None = None) -> dict[str, float]:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data) if data else Path(tmp) / "still_heads"
        if not data:
            print(f"rendering {identities} identities × 2 videos × {frames} frames, head still ...", flush=True)
            generate_dataset(root, SyntheticConfig(identities=identities, frames_per_video=frames, size=64,
                                                   seed=seed, head_motion=0.0))
        names = FramePairDataset(root, size=64, seed=seed).identities
        train_ids, test_ids = split_identities(names, 0.25, seed)
        train = FramePairDataset(root, size=64, identities=train_ids, seed=seed, jitter=False, pairs_per_identity=8)
        test = FramePairDataset(root, size=64, identities=test_ids, seed=seed + 1, jitter=False,
                                pairs_per_identity=4)
        held_out = stack([test[i] for i in range(len(test))])

        model = TCAE(TCAEConfig(image_size=64, width=0.25))
        model.au_decoder.still()
        model.pose_decoder.still()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_weights = weights(keep)
        gen = torch.Generator().manual_seed(seed)
        print(f"losses: reconstruction{''.join(' + ' + g for g in keep)}", flush=True)
        start, step, epoch = time.perf_counter(), 0, 0
        ratio, au_px, pose_px = held_out_ratio(model, held_out)
        while step < steps:
            train.set_epoch(epoch)
            order = torch.randperm(len(train), generator=gen).tolist()
            for i in range(0, len(order) - batch_size + 1, batch_size):
                source, target = stack([train[j] for j in order[i : i + batch_size]])
                _, total = compute_losses(model, model(source, target), source, target, loss_weights)
                optimizer.zero_grad()
                total.mean().backward()
                optimizer.step()
                step += 1
                if step % 250 == 0 or step == steps:
                    ratio, au_px, pose_px = held_out_ratio(model, held_out)
                    print(f"step {step}: held-out reconstruction {ratio:.3f} × identity; mean |δ_AU| "
                          f"{au_px:.3f} px, |δ_pose| {pose_px:.3f} px ({time.perf_counter() - start:.0f} s)",
                          flush=True)
                if step == steps:
                    break
            epoch += 1
    return {"ratio": ratio, "disp_au_px": au_px, "disp_pose_px": pose_px, "held_out_pairs": len(test),
            "steps": steps}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", nargs="*", choices=tuple(GROUPS), default=list(GROUPS),
                        help="loss groups trained beside the reconstruction (default: all, the whole loss)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--identities", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path,
                        help="a synthetic data set rendered with --head-motion 0 (default: render one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(keep=tuple(args.keep), steps=args.steps, identities=args.identities, seed=args.seed, data=args.data)
