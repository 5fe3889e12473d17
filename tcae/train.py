"""Training the TCAE: config, data stream, loop, validation, checkpoints, DDP.

    tcae train --data DATA --image-size 64 --width 0.25 --steps 2000
    tcae train --resume runs/a/checkpoint.pt               # continue, with the run's own settings
    torchrun --nproc_per_node 4 -m tcae.train --config run.toml

Everything a run writes goes to ``out``: ``config.json``, ``metrics.jsonl``
(one JSON object per log or validation step), ``checkpoint.pt`` (the latest
checkpoint, see :mod:`tcae.checkpoint`) and ``panels/step_NNNNNN.png``
(:mod:`tcae.panels`, on held-out identities).

Resuming is exact: the checkpoint holds the model, optimizer, LR schedule,
curriculum, validation state, RNG states (python, numpy, torch, CUDA) and the
data position (epoch and batches consumed in it); the pairs of an epoch and
their order depend only on (seed, epoch), so a resumed run sees the batches
the uninterrupted one would have and computes the same losses.

Distributed (``torchrun``): one process per device, NCCL on CUDA and gloo on
CPU. ``batch_size`` is global: every optimizer step consumes the same
``batch_size`` pairs whatever the world size, rank r taking its slice of each
global batch, so a run can resume on a different number of devices. The
curriculum window is taken over each rank's slice (per-sample losses are not
gathered: only the selected samples carry gradients). BatchNorm is
SyncBatchNorm on CUDA (``sync_bn``) so statistics are over the global batch as
in single-device training; PyTorch's SyncBatchNorm has no CPU implementation,
so CPU ranks normalize over their own slice, with rank 0's running statistics
broadcast at every forward. Only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset

from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .data import FramePairDataset, list_identities, split_identities
from .losses import Curriculum, compute_losses
from .model import TCAE, TCAEConfig
from .panels import write_panel


CHECKPOINT_NAME = "checkpoint.pt"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run. Defaults are SPEC section 6's (SGD, lr 1e-3, momentum 0.9, batch 64, 256 px)."""

    # data
    data: str = _opt("data", "root/<identity>/<video>/<track>/*.png (tcae synth / tcae prepare write it)")
    image_size: int = _opt(256, "side of the square crops: 64, 128 or 256 px")
    pairs_per_track: int = _opt(10, "(source, target) pairs drawn per track per epoch")
    max_offset: int = _opt(0, "largest frame distance between source and target; 0 = any two frames")
    held_out: float = _opt(0.25, "fraction of identities held out for validation; 0 = validate on training ones")
    num_workers: int = _opt(2, "DataLoader worker processes")
    # model
    width: float = _opt(1.0, "multiplier on every hidden channel count")
    embed_dim: int = _opt(256, "size of the AU and of the pose embedding")
    backend: str = _opt("triton", "warp implementation: triton, grid_sample or naive")
    sync_bn: bool = _opt(True, "SyncBatchNorm under DDP on CUDA")
    # optimisation
    batch_size: int = _opt(64, "global batch, split evenly across DDP ranks")
    steps: int = _opt(10_000, "optimizer steps")
    optimizer: str = _opt("sgd", "sgd or adam")
    lr: float = _opt(1e-3, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum (adam: beta1)")
    weight_decay: float = _opt(0.0, "L2 penalty")
    schedule: str = _opt("none", "learning-rate schedule after warmup: none or cosine")
    warmup_steps: int = _opt(0, "linear warmup from 0")
    min_lr_ratio: float = _opt(0.1, "cosine ends at lr × this")
    grad_clip: float = _opt(0.0, "largest global gradient norm; 0 = no clipping")
    amp: str = _opt("auto", "bf16 autocast: auto (on for CUDA, off on CPU), bf16 or off")
    curriculum: bool = _opt(True, "train on the curriculum window of each batch (else its mean)")
    patience: int = _opt(1, "validations without improvement before the window slides")
    # bookkeeping
    val_every: int = _opt(500, "steps between validations (0 = never)")
    val_batches: int = _opt(8, "validation size, in batches of batch_size")
    ckpt_every: int = _opt(1000, "steps between checkpoints (one is always written at the end)")
    panel_every: int = _opt(500, "steps between PNG panels (0 = never; one at the end otherwise)")
    panel_samples: int = _opt(4, "rows in a panel")
    log_every: int = _opt(10, "steps between metrics lines")
    out: str = _opt("runs/tcae", "output folder")
    seed: int = _opt(0, "seeds the model, the pairs and the split")
    device: str = _opt("auto", "auto (CUDA if available), cpu, cuda")
    threads: int = _opt(0, "CPU intra-op threads (0 = torch's default)")

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("sgd", "adam"),
            "schedule": ("none", "cosine"),
            "amp": ("auto", "bf16", "off"),
            "device": ("auto", "cpu", "cuda"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("pairs_per_track", "batch_size", "steps", "val_batches", "panel_samples", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_offset", "num_workers", "warmup_steps", "val_every", "ckpt_every", "panel_every",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.held_out < 1.0:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")
        self.model_config()  # image_size, width, embed_dim, backend

    def model_config(self) -> TCAEConfig:
        return TCAEConfig(image_size=self.image_size, embed_dim=self.embed_dim, width=self.width,
                          backend=self.backend)


def load_config_file(path: str | Path) -> dict:
    """Settings from a .json or .toml file (flat keys, TrainConfig's field names)."""
    path = Path(path)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise RuntimeError(f"reading {path} needs Python 3.11+ (tomllib); use a .json config") from e
        values = tomllib.loads(path.read_text())
    else:
        values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return values


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` per TrainConfig field (``image_size`` → ``--image-size``), ``--config`` and ``--resume``."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of settings; flags override it")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue from CKPT (default: OUT/checkpoint.pt)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=help)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from, in rising precedence: the resumed checkpoint's config (with ``--resume``),
    the ``--config`` file, and the flags that were given."""
    values = load_config_file(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    if args.resume is not None:
        saved = load_checkpoint(resume_path(args.resume, values.get("out", TrainConfig.out)))["config"]
        values = {**saved, **values}
    return TrainConfig(**values)


def resume_path(resume: str | Path, out: str | Path) -> Path:
    """The checkpoint ``--resume`` names: its argument, or ``out/checkpoint.pt`` when it has none."""
    return Path(resume) if str(resume) else Path(out) / CHECKPOINT_NAME


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss or gradient; the message says where."""


# --- data ------------------------------------------------------------------------


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


# --- state -----------------------------------------------------------------------


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states, as tensors and plain values (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier on ``lr`` for 0-based optimizer step ``step``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "none":
        return 1.0
    progress = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.momentum, 0.999),
                            weight_decay=config.weight_decay)


# --- diagnostics and output ------------------------------------------------------


def describe_samples(batch: Mapping[str, Any], indices: Iterable[int]) -> list[str]:
    """One line per sample of a FramePairDataset batch: identity, track, frame positions."""
    return [
        f"sample {i}: identity {batch['identity'][i]}, track {batch['track'][i]}, "
        f"frames {int(batch['source_index'][i])} -> {int(batch['target_index'][i])}"
        for i in indices
    ]


def non_finite_report(step: int, losses: Mapping[str, torch.Tensor], batch: Mapping[str, Any], rank: int) -> str:
    """Which loss terms are non-finite for which samples of this rank's batch."""
    lines = [f"non-finite loss at step {step} (rank {rank}); training stopped, the last checkpoint is intact"]
    bad_samples: set[int] = set()
    for name, value in losses.items():
        bad = (~torch.isfinite(value.detach())).nonzero().flatten().tolist()
        if bad:
            lines.append(f"  {name}: {value.detach()[bad].tolist()} at samples {bad}")
            bad_samples.update(bad)
    return "\n".join(lines + ["  " + s for s in describe_samples(batch, sorted(bad_samples))])


class Progress:
    """One status line, rewritten in place on a terminal; plain lines every ``every`` steps otherwise."""

    def __init__(self, total: int, every: int, stream=sys.stdout) -> None:
        self.total, self.every, self.stream = total, every, stream
        self.tty = stream.isatty()

    def update(self, step: int, text: str) -> None:
        if self.tty:
            filled = int(20 * step / self.total)
            bar = "#" * filled + "-" * (20 - filled)
            self.stream.write(f"\r{step:>6}/{self.total} [{bar}] {text}\033[K")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that stays, above the status line."""
        print(("\r\033[K" if self.tty else "") + text, file=self.stream, flush=True)


def _seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- the run ---------------------------------------------------------------------


@dataclass
class _Dist:
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


def _setup(config: TrainConfig) -> _Dist:
    """Device and, under torchrun (WORLD_SIZE > 1), the process group."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(0, 1, torch.device("cuda" if cuda else "cpu"), False)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return _Dist(rank, world, device, owns)


def _datasets(config: TrainConfig) -> tuple[FramePairDataset, FramePairDataset]:
    identities = list_identities(config.data)
    if config.held_out == 0:
        train_ids = val_ids = identities
    else:
        train_ids, val_ids = split_identities(identities, config.held_out, config.seed)
    kwargs = dict(size=config.image_size, pairs_per_track=config.pairs_per_track,
                  max_offset=config.max_offset or None, seed=config.seed)
    return FramePairDataset(config.data, identities=train_ids, **kwargs), FramePairDataset(
        config.data, identities=val_ids, **kwargs)


def _autocast(config: TrainConfig, device: torch.device):
    on = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def validate(model: TCAE, loader: DataLoader, config: TrainConfig, d: _Dist) -> float:
    """Mean per-sample total loss over the validation pairs (all ranks' shards), in eval mode."""
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=d.device)
    for batch in loader:
        source, target = batch["source"].to(d.device), batch["target"].to(d.device)
        with _autocast(config, d.device):
            _, total = compute_losses(model, model(source, target), source, target)
        acc += torch.stack([total.double().sum(), torch.tensor(float(total.numel()), device=d.device)])
    model.train()
    total_loss, count = d.all_sum(acc).tolist()
    return total_loss / max(count, 1.0)


@torch.no_grad()
def panel(model: TCAE, samples: list[dict], config: TrainConfig, device: torch.device, path: Path) -> float:
    """Write the panel of ``samples`` (FramePairDataset items); returns its full-saturation |δ| in pixels."""
    model.eval()
    source = torch.stack([s["source"] for s in samples]).to(device)
    target = torch.stack([s["target"] for s in samples]).to(device)
    with _autocast(config, device):
        out = model(source, target)
    model.train()
    return write_panel(path, source, target, out)


def record_validation(val: float, state: dict, curriculum: Curriculum | None, patience: int) -> bool:
    """Note a validation loss in ``state`` (best, last, validations since the best); after ``patience``
    validations without improvement slide the curriculum window. Returns whether it slid."""
    state["stale"] = 0 if val < state["best"] else state["stale"] + 1
    state["best"] = min(val, state["best"])
    state["last"] = val
    if curriculum is None or state["stale"] < patience:
        return False
    state["stale"] = 0
    return curriculum.slide()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` by a run that died after its last checkpoint."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def train(config: TrainConfig, resume: str | Path | None = None) -> tuple[TCAE, dict]:
    """Run (or, with ``resume``, continue) training; returns the model (this rank's replica) and a summary.

    Summary keys: ``steps``, ``losses`` (last logged batch means per term,
    ``total``, ``loss`` = the curriculum window's), ``val_loss``, ``window``,
    ``train_seconds`` (optimizer steps and data only), ``img_per_s``,
    ``checkpoint``, ``metrics``, ``panels`` (paths written by this call).

    ``resume``: a checkpoint path, or "" for ``out/checkpoint.pt``. Its model
    shape fields must match ``config``; other settings may change.

    Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient, and
    :class:`tcae.checkpoint.CheckpointError` for a damaged or incompatible
    ``resume`` checkpoint.
    """
    d = _setup(config)
    try:
        return _train(config, resume, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, resume: str | Path | None, d: _Dist) -> tuple[TCAE, dict]:
    out = Path(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    train_set, val_set = _datasets(config)
    sampler = GlobalBatches(len(train_set), config.batch_size, d.rank, d.world, config.seed)
    # Our own generator: creating an iterator must not draw from the global RNG.
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=d.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))
    val_idx = evenly_spaced(len(val_set), config.val_batches * config.batch_size)
    val_loader = DataLoader(Subset(val_set, val_idx[d.rank :: d.world]), batch_size=config.batch_size // d.world,
                            num_workers=config.num_workers)
    panel_samples = [val_set[i] for i in evenly_spaced(len(val_set), config.panel_samples)] if d.main else []

    model = TCAE(config.model_config()).to(d.device)
    if d.world > 1 and d.device.type == "cuda" and config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    curriculum = Curriculum()
    val_state = {"best": math.inf, "stale": 0, "last": None}
    step, epoch, consumed = 0, 0, 0

    metrics_path = out / "metrics.jsonl"
    ckpt_path = out / CHECKPOINT_NAME
    if resume is not None:
        resume = resume_path(resume, out)
        state = load_checkpoint(resume)
        check_compatible(state["config"], asdict(config), resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        curriculum = Curriculum(**state["curriculum"])
        val_state = dict(state["val"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        set_rng_state(state["rng"])
        changed = {k: (v, getattr(config, k)) for k, v in state["config"].items() if getattr(config, k, v) != v}
        if d.main:
            print(f"resuming from {resume} at step {step}"
                  + (f"; changed settings: {changed}" if changed else ""), flush=True)
            _truncate_metrics(metrics_path, step)
    elif d.main and ckpt_path.exists():
        print(f"note: {ckpt_path} exists; this fresh run replaces it (--resume continues it)", flush=True)

    ddp = model
    if d.world > 1:
        ddp = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    # A fresh run starts a fresh log; a resumed one continues its (truncated) log.
    metrics = open(metrics_path, "a" if resume is not None else "w") if d.main else None

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "step": step, "epoch": epoch, "consumed": consumed, "config": asdict(config),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "curriculum": asdict(curriculum), "val": val_state, "rng": rng_state(), "world_size": d.world,
        })

    def due(every: int) -> bool:
        """Every ``every`` steps and at the last one; 0 = never."""
        return every > 0 and (step % every == 0 or step == config.steps)

    progress = Progress(config.steps, config.log_every)
    summary: dict[str, Any] = {"losses": {}, "panels": [], "val_loss": val_state["last"]}
    train_seconds, window_seconds, window_images = 0.0, 0.0, 0
    params = list(model.parameters())
    start_step = step
    batches = stream(loader, sampler, epoch, consumed)
    model.train()
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            epoch, consumed, batch = next(batches)
            source = batch["source"].to(d.device, non_blocking=True)
            target = batch["target"].to(d.device, non_blocking=True)
            with _autocast(config, d.device):
                result = ddp(source, target)
                losses, total = compute_losses(model, result, source, target)
            # Every rank must stop together, or the others wait forever in the next all-reduce.
            local_bad = not bool(torch.isfinite(total).all())
            if d.all_sum(torch.tensor(float(local_bad), device=d.device)).item():
                raise NonFiniteLossError(non_finite_report(step + 1, losses, batch, d.rank) if local_bad
                                         else f"non-finite loss at step {step + 1} on another rank")
            loss = curriculum.select(total) if config.curriculum else total.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or math.inf)
            if not torch.isfinite(grad_norm):
                names = [n for n, p in model.named_parameters() if p.grad is not None
                         and not torch.isfinite(p.grad).all()]
                raise NonFiniteLossError(
                    f"non-finite gradient at step {step + 1} (finite losses) in {len(names)} parameters, "
                    f"first {names[:5]}\n" + "\n".join("  " + s for s in describe_samples(batch, range(len(total)))))
            optimizer.step()
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            window_seconds += dt
            window_images += config.batch_size

            if due(config.log_every):
                names = list(losses)
                means = torch.stack([losses[n].detach().float().mean() for n in names]
                                    + [total.detach().float().mean(), loss.detach().float()])
                means = (d.all_sum(means) / d.world).tolist()
                values = dict(zip(names + ["total", "loss"], means))
                rate = window_images / window_seconds
                summary["losses"] = values
                log({"step": step, "epoch": epoch, **values, "lr": scheduler.get_last_lr()[0],
                     "img_per_s": rate, "window": [curriculum.lo, curriculum.hi], "grad_norm": float(grad_norm),
                     "time": train_seconds})
                window_seconds, window_images = 0.0, 0
                summary["img_per_s"] = rate
            if d.main:
                shown = summary["losses"] or {"loss": loss.item()}
                eta = train_seconds / (step - start_step) * (config.steps - step)
                progress.update(step, f"loss {shown['loss']:.4f} recon {shown.get('recon', math.nan):.4f} "
                                      f"| {summary.get('img_per_s', math.nan):.1f} img/s | eta {_seconds(eta)}")

            if due(config.val_every):
                val = validate(model, val_loader, config, d)
                slid = record_validation(val, val_state, curriculum if config.curriculum else None, config.patience)
                log({"step": step, "val_loss": val, "best_val_loss": val_state["best"], "slid": slid,
                     "window": [curriculum.lo, curriculum.hi]})
                summary["val_loss"] = val
                if d.main:
                    progress.message(f"step {step}: val loss {val:.4f} (best {val_state['best']:.4f})"
                                     + (f", curriculum window now [{curriculum.lo:.2f}, {curriculum.hi:.2f})"
                                        if slid else ""))
            if d.main and due(config.panel_every):
                path = out / "panels" / f"step_{step:06d}.png"
                max_disp = panel(model, panel_samples, config, d.device, path)
                log({"step": step, "panel": str(path), "panel_max_disp_px": max_disp})
                summary["panels"].append(str(path))
            if d.main and (due(config.ckpt_every) or step == config.steps):
                checkpoint()
    finally:
        if metrics is not None:
            metrics.close()
    summary.update(steps=step, window=[curriculum.lo, curriculum.hi], train_seconds=train_seconds,
                   checkpoint=str(ckpt_path), metrics=str(metrics_path))
    return model, summary


def train_from_args(args: argparse.Namespace) -> int:
    """Train with the settings of :func:`add_config_arguments`' flags; rank 0 prints the summary as JSON."""
    _, summary = train(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tcae.train`` (what torchrun runs); the same as ``tcae train``."""
    parser = argparse.ArgumentParser(prog="python -m tcae.train", description="Train the TCAE (SPEC section 6).")
    add_config_arguments(parser)
    return train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
