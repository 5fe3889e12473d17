"""The training data stream: a seeded, resumable order of pairs, sharded across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class GlobalBatches(Sampler[list[int]]):
    """This rank's slice of each global batch of a seeded per-epoch permutation.

    Epoch e's order is ``randperm(n)`` drawn from (seed, e); global batch k is
    positions [k·B, (k+1)·B) of it (the last partial batch is dropped) and
    rank r takes the r-th of its ``world`` equal slices. :meth:`set_position`
    starts the next iteration at (epoch, batch), which is how a resumed run
    skips what it has already seen.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
        if n < batch_size:
            raise ValueError(f"{n} training pairs per epoch, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        # (seed, epoch) through a SeedSequence: seed 0 epoch 1 and seed 1 epoch 0 must not share an order.
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.n, generator=g).tolist()
        local = self.batch_size // self.world
        for k in range(self.start, self.batches_per_epoch):
            lo = k * self.batch_size + self.rank * local
            yield order[lo : lo + local]


def stream(loader: DataLoader, sampler: GlobalBatches, epoch: int, start: int) -> Iterator[tuple[int, int, dict]]:
    """Batches forever from (epoch, start): yields (epoch, batches consumed in it, batch)."""
    while True:
        loader.dataset.set_epoch(epoch)
        sampler.set_position(epoch, start)
        for k, batch in enumerate(loader, start + 1):
            yield epoch, k, batch
        epoch, start = epoch + 1, 0


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread over range(n) (all of them if k >= n); pairs are grouped by track, so this spans tracks."""
    if k >= n:
        return list(range(n))
    return [round(i * (n - 1) / max(k - 1, 1)) for i in range(k)]
