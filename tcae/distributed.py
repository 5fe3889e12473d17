"""One process or many (torchrun): the device, the rank, and the process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class Dist:
    """This process's rank among ``world``, its device, and whether it created the process group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def union(self, items: set[str]) -> set[str]:
        """The union of every rank's ``items`` (a collective: all ranks call it together)."""
        if self.world == 1:
            return items
        gathered: list[set[str] | None] = [None] * self.world
        dist.all_gather_object(gathered, items)
        return set().union(*gathered)


def check_device(requested: str | torch.device) -> torch.device:
    """``requested`` as a device ("auto": CUDA when available), or :class:`~tcae.errors.ConfigError` when it is
    not one or this machine lacks it."""
    if str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {requested} asked for, but {why}; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {requested} asked for, but only {torch.cuda.device_count()} GPUs are visible")
    return device


def setup(requested: str) -> Dist:
    """The device (``requested``: auto, cpu or cuda) and, under torchrun (WORLD_SIZE > 1), the process group."""
    cuda = check_device(requested).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"), False)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device, owns)
