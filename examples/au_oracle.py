"""Can TCAE's AU decoder learn the synthetic AUs' motion? Told the AUs, yes.

TCAE learns an AU's motion only through its AU embedding: the AU decoder turns
the (source, target) AU embeddings into δ_AU (pixels, sampled at x − δ_AU), and
the reconstruction loss trains decoder and encoder together. This example cuts
the encoder out. The AU decoder reads the true AU intensities of source and
target instead (7 numbers per frame, through a learned linear map to the
embedding size), and trains on TCAE's reconstruction loss (10 × L1) alone, on
synthetic pairs where only the AUs move: the head still, no crop jitter.

Printed: the reconstruction L1 on held-out identities beside the identity
baseline (returning the source unchanged). A ratio well below 1 says that the
warp can express these AUs and that the reconstruction loss can teach a
decoder them, when its input carries them. ``tcae check-learning
--head-motion 0 --no-jitter`` trains the whole TCAE on the same kind of pairs
(docs/learning.md, "Why the AU criterion fails").

    python examples/au_oracle.py --steps 1500
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import tcae_kernels
from tcae.common import AU_NAMES
from tcae.frames import FramePairDataset, split_identities
from tcae.model import Decoder, TCAEConfig
from tcae.synthetic import SyntheticConfig, generate_dataset


class OracleAUDecoder(nn.Module):
    """True AU intensities [B, 7] of source and target → δ_AU [B, 2, S, S] in pixels, by TCAE's AU decoder."""

    def __init__(self, config: TCAEConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(len(AU_NAMES), config.embed_dim)
        self.decoder = Decoder(config)
        self.decoder.still()  # δ = 0 at the start: the reconstruction starts at the identity baseline

    def forward(self, source_au: torch.Tensor, target_au: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(source_au), self.embed(target_au))[0]


def au_intensities(root: Path) -> dict[str, torch.Tensor]:
    """Track key (``identity/video/track``) → [frames, 7] AU intensities from its labels.csv."""
    table = {}
    for path in root.glob("*/*/*/labels.csv"):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        table[str(path.parent.relative_to(root))] = torch.tensor([[float(r[a]) for a in AU_NAMES] for r in rows])
    return table


def batches(pairs: FramePairDataset, labels: dict[str, torch.Tensor], batch_size: int, gen: torch.Generator):
    """Endless shuffled batches: (source, target, source AUs, target AUs); a fresh epoch of pairs each pass."""
    epoch = 0
    while True:
        pairs.set_epoch(epoch)
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([pairs[j] for j in order[i : i + batch_size]], labels)
        epoch += 1


def collate(items: list[dict], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (torch.stack([it["source"] for it in items]), torch.stack([it["target"] for it in items]),
            torch.stack([labels[it["track"]][it["source_index"]] for it in items]),
            torch.stack([labels[it["track"]][it["target_index"]] for it in items]))


def main(steps: int = 1500, identities: int = 48, frames: int = 32, size: int = 64, width: float = 0.25,
         batch_size: int = 16, seed: int = 0, data: Path | None = None) -> dict[str, float]:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data) if data else Path(tmp) / "still_heads"
        if not data:
            print(f"rendering {identities} identities × 2 videos × {frames} frames, head still ...", flush=True)
            generate_dataset(root, SyntheticConfig(identities=identities, frames_per_video=frames, size=size,
                                                   seed=seed, head_motion=0.0))
        names = FramePairDataset(root, size=size, seed=seed).identities
        train_ids, test_ids = split_identities(names, 0.25, seed)
        labels = au_intensities(root)
        train = FramePairDataset(root, size=size, identities=train_ids, seed=seed, jitter=False, pairs_per_identity=8)
        test = FramePairDataset(root, size=size, identities=test_ids, seed=seed + 1, jitter=False,
                                pairs_per_identity=8)
        held_out = collate([test[i] for i in range(len(test))], labels)

        model = OracleAUDecoder(TCAEConfig(image_size=size, width=width))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        stream = batches(train, labels, batch_size, torch.Generator().manual_seed(seed))
        for step in range(1, steps + 1):
            source, target, au_s, au_t = next(stream)
            reconstruction = tcae_kernels.warp(source, model(au_s, au_t), "border")
            loss = 10 * (reconstruction - target).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"step {step}/{steps}: training L1 {loss.item() / 10:.4f} "
                      f"vs identity {(source - target).abs().mean():.4f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)

        model.eval()
        source, target, au_s, au_t = held_out
        with torch.no_grad():
            disp = model(au_s, au_t)
            oracle = (tcae_kernels.warp(source, disp, "border") - target).abs().mean().item()
        identity = (source - target).abs().mean().item()
    result = {"oracle_recon_l1": oracle, "identity_l1": identity, "ratio": oracle / identity,
              "mean_disp_px": disp.norm(dim=1).mean().item(), "held_out_pairs": len(test), "steps": steps}
    print(f"held-out identities ({len(test_ids)}, {len(test)} pairs): reconstruction L1 {oracle:.4f} = "
          f"{oracle / identity:.2f} × identity baseline {identity:.4f}; mean |δ_AU| {result['mean_disp_px']:.2f} px")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--identities", type=int, default=48)
    parser.add_argument("--frames", type=int, default=32, help="frames per video")
    parser.add_argument("--size", type=int, default=64, choices=(64, 128, 256))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="a synthetic data set rendered with --head-motion 0 (default: render one)")
    args = parser.parse_args()
    main(steps=args.steps, identities=args.identities, frames=args.frames, size=args.size, seed=args.seed,
         data=args.data)
