"""The TCAE training loop (SPEC section 6): one function, :func:`train`, and its command line.

    tcae train --data DATA --image-size 64 --width 0.25 --steps 2000
    tcae train --recipe fast --data DATA ...                # the recipe that learns in minutes on a CPU
    tcae train --resume runs/a/checkpoint.pt               # continue, with the run's own settings
    torchrun --nproc_per_node 4 -m tcae.cli train --config run.toml

Everything a run writes goes to ``out``, which one run at a time may write
(:class:`tcae.rundir.RunLock`): ``config.json``, ``metrics.jsonl``
(one JSON object per log or validation step), ``checkpoint.pt`` (the latest
checkpoint, with the model config inside, see :mod:`tcae.checkpoint`),
``panels/step_NNNNNN.png`` (:mod:`tcae.panels`, on held-out identities) and,
when the tensorboard package is installed, ``tensorboard/``.

The pieces live beside it: settings and recipes in :mod:`tcae.config`, the
data stream in :mod:`tcae.batches`, the curriculum in :mod:`tcae.losses`,
progress and metrics in :mod:`tcae.monitor`, processes in
:mod:`tcae.distributed`.

Resuming is exact: the checkpoint holds the model, optimizer, LR schedule,
curriculum (window, best score, LR scale), RNG states (python, numpy, torch,
CUDA) and the data position (epoch and batches consumed in it); the pairs of
an epoch, their crops and their order depend only on (seed, epoch), so a
resumed run sees the batches the uninterrupted one would have and computes
the same losses.

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
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

import tcae_kernels

from .batches import GlobalBatches, evenly_spaced, stream
from .checkpoint import (
    TRAINING_KEYS,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import (
    CHECKPOINT_NAME,
    TrainConfig,
    config_from_args,
    resume_path,
    workers_and_threads,
)
from .distributed import Dist, setup
from .frames import FramePairDataset, list_identities, split_identities
from .losses import Curriculum, LossWeights, compute_losses, pixel_criterion, scale_aux
from .model import TCAE
from .monitor import (
    MetricsLog,
    NonFiniteLossError,
    Progress,
    describe_samples,
    displacement_sizes,
    grad_norms,
    non_finite_report,
    tensorboard_note,
)
from .panels import write_panel
from .rundir import RunLock, truncate_metrics


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier on ``lr`` for 0-based optimizer step ``step`` (warmup, then the schedule)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "none":
        return 1.0
    progress = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def aux_factor(config: TrainConfig, step: int) -> float:
    """Multiplier on the cycle and consistency losses' weights after ``step`` optimizer steps: 0 for
    ``aux_delay_steps``, then a linear ramp to 1 over ``aux_ramp_steps``."""
    if step < config.aux_delay_steps:
        return 0.0
    return min(1.0, (step - config.aux_delay_steps) / config.aux_ramp_steps) if config.aux_ramp_steps else 1.0


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.momentum, 0.999),
                            weight_decay=config.weight_decay)


def datasets(config: TrainConfig) -> tuple[FramePairDataset, FramePairDataset]:
    """Training and validation pairs of the identity split.

    An epoch is ``pairs_per_identity`` pairs per training identity (the
    original: one), raised to fill at least one global batch on small data.
    """
    identities = list_identities(config.data)
    if config.held_out == 0:
        train_ids = val_ids = identities
    else:
        train_ids, val_ids = split_identities(identities, config.held_out, config.seed)
    per_identity = max(config.pairs_per_identity, math.ceil(config.batch_size / len(train_ids)))
    kwargs = dict(size=config.model.image_size, max_offset=config.max_offset or None, seed=config.seed,
                  jitter=config.jitter, max_pixels=config.max_frame_pixels)
    return (FramePairDataset(config.data, identities=train_ids, pairs_per_identity=per_identity, **kwargs),
            FramePairDataset(config.data, identities=val_ids,
                             pairs_per_identity=max(1, math.ceil(config.val_batches * config.batch_size
                                                                 / len(val_ids))), **kwargs))


def _autocast(config: TrainConfig, device: torch.device):
    on = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def note_skipped(skipped: set[str], batch: dict) -> None:
    """Add the frames a batch's items found unreadable (in whichever process loaded them) to ``skipped``."""
    skipped.update(path for paths in batch["skipped"] for path in paths.split("\n") if path)


@torch.no_grad()
def validate(model: TCAE, loader: DataLoader, config: TrainConfig, d: Dist, skipped: set[str],
             weights: LossWeights) -> dict[str, float]:
    """Means over the validation pairs (all ranks' shards), in eval mode: ``pixel_loss`` (the
    curriculum's criterion, :func:`tcae.losses.pixel_criterion`), ``recon`` (L1 of the
    reconstruction), ``identity`` (L1 of the source itself: the baseline recon must beat) and ``total``,
    with the loss ``weights`` training uses at this step. Unreadable frames met go to ``skipped``."""
    model.eval()
    acc = torch.zeros(5, dtype=torch.float64, device=d.device)
    for batch in loader:
        note_skipped(skipped, batch)
        source, target = batch["source"].to(d.device), batch["target"].to(d.device)
        with _autocast(config, d.device):
            losses, total = compute_losses(model, model(source, target), source, target, weights)
        identity = (source.float() - target.float()).abs().flatten(1).mean(1)
        acc += torch.stack([pixel_criterion(losses, weights).double().sum(), losses["recon"].double().sum(),
                            identity.double().sum(), total.double().sum(),
                            torch.tensor(float(total.numel()), dtype=torch.float64, device=d.device)])
    model.train()
    *sums, count = d.all_sum(acc).tolist()
    return dict(zip(("pixel_loss", "recon", "identity", "total"), (s / max(count, 1.0) for s in sums)))


@torch.no_grad()
def panel(model: TCAE, samples: list[dict], config: TrainConfig, device: torch.device, path: Path) -> np.ndarray:
    """Write the panel of ``samples`` (FramePairDataset items) to ``path``; returns its image."""
    model.eval()
    source = torch.stack([s["source"] for s in samples]).to(device)
    target = torch.stack([s["target"] for s in samples]).to(device)
    with _autocast(config, device):
        out = model(source, target)
    model.train()
    return write_panel(path, source, target, out, arrows=config.panel_arrows, merge=config.model.merge)


def train(config: TrainConfig, resume: str | Path | None = None) -> tuple[TCAE, dict]:
    """Run (or, with ``resume``, continue) training; returns the model (this rank's replica) and a summary.

    Summary keys: ``steps``, ``losses`` (last logged batch means per term,
    ``identity`` = mean |source − target| of that batch, ``total``, ``loss``
    = the curriculum's), ``val`` (the last validation, see :func:`validate`,
    or None), ``window``, ``lr_scale``, ``train_seconds`` (optimizer steps
    and data only), ``wall_seconds``, ``img_per_s``, ``workers``,
    ``threads``, ``implementation`` (the warp code that ran,
    :func:`tcae_kernels.implementation`), ``checkpoint``, ``metrics``,
    ``panels`` (paths written by this call), ``skipped_frames`` (distinct
    unreadable frames met, in every loader process and rank). A resumed run
    that has already reached ``steps`` trains nothing, writes nothing and
    says so in ``note``.

    ``resume``: a checkpoint path, or "" for ``out/checkpoint.pt``. Its model
    shape fields must match ``config``; other settings may change.

    Raises :class:`~tcae.monitor.NonFiniteLossError` on a NaN/inf loss or
    gradient, :class:`tcae.checkpoint.CheckpointError` for a damaged or
    incompatible ``resume`` checkpoint or one that cannot be written (the
    previous one stays), :class:`tcae.rundir.RunLockedError` when another run
    writes to ``out``, and :class:`tcae.errors.TCAEError` subclasses for
    unusable settings or data.
    """
    # Rank 0 alone writes; it locks the folder before the process group forms, so that a refusal
    # ends the run instead of leaving the other ranks waiting for it.
    with RunLock(config.out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        d = setup(config.device)
        try:
            return _train(config, resume, d)
        finally:
            if d.owns_group:
                dist.destroy_process_group()


def _train(config: TrainConfig, resume: str | Path | None, d: Dist) -> tuple[TCAE, dict]:
    wall_start = time.perf_counter()
    out = Path(config.out)
    workers, threads = workers_and_threads(config, d.device)
    if d.device.type == "cpu" or config.threads:
        torch.set_num_threads(threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    model = TCAE(config.model).to(d.device)
    if config.still_start:
        model.au_decoder.still()
        model.pose_decoder.still()
    metrics_path = out / "metrics.jsonl"
    ckpt_path = out / CHECKPOINT_NAME
    state = None
    if resume is not None:
        resume = resume_path(resume, out)
        state = load_checkpoint(resume, keys=TRAINING_KEYS)
        check_compatible(state["config"], config.as_dict(), resume)
        if state["step"] >= config.steps:
            load_weights(model, state["model"], resume)
            note = (f"nothing to do: the run already reached step {state['step']} (steps is {config.steps}); "
                    "give a larger --steps to continue it")
            if d.main:
                print(note, flush=True)
            return model, {"steps": state["step"], "note": note, "checkpoint": str(resume), "panels": []}

    train_set, val_set = datasets(config)
    sampler = GlobalBatches(len(train_set), config.batch_size, d.rank, d.world, config.seed)
    # Our own generator: creating an iterator must not draw from the global RNG.
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        pin_memory=d.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))
    val_idx = evenly_spaced(len(val_set), config.val_batches * config.batch_size)
    val_loader = DataLoader(Subset(val_set, val_idx[d.rank :: d.world]), batch_size=config.batch_size // d.world,
                            num_workers=workers)
    panel_samples = []
    if d.main and config.panel_every > 0:
        panel_samples = [val_set[i] for i in evenly_spaced(len(val_set), config.panel_samples)]
    # Distinct unreadable frames met by this rank: those this process found (scanning the folders, loading
    # the panel's pairs), then those the items of each batch name (loaded here or in a worker process).
    skipped = {str(path) for dataset in (train_set, val_set) for path in dataset.skipped_paths}

    if d.world > 1 and d.device.type == "cuda" and config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(config, model)
    # Without the curriculum every term is averaged over the whole batch: the window [0, 1), which
    # has stopped moving, so validation steps the LR decay from the start.
    curriculum = Curriculum(patience=config.patience, lr_patience=config.lr_patience,
                            **({} if config.curriculum else {"hi": 1.0}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s) * curriculum.lr_scale)
    weights = LossWeights(au_sparsity=config.sparsity_weight, recon_blur=config.blur_weight)
    step, epoch, consumed = 0, 0, 0
    saved_step = None  # the step the checkpoint on disk holds, for a failed write's message

    if state is not None:
        load_weights(model, state["model"], resume)
        optimizer.load_state_dict(state["optimizer"])
        curriculum = Curriculum(**state["curriculum"])  # the scheduler's lambda reads this name when it steps
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        saved_step = step if Path(resume).resolve() == ckpt_path.resolve() else None
        set_rng_state(state["rng"])
        saved = state["config"]
        changed = {k: (v, getattr(config, k)) for k, v in saved.items() if k != "model" and getattr(config, k, v) != v}
        if d.main:
            print(f"resuming from {resume} at step {step}"
                  + (f"; changed settings: {changed}" if changed else ""), flush=True)
            truncate_metrics(metrics_path, step)
    elif d.main and ckpt_path.exists():
        print(f"note: {ckpt_path} exists; this fresh run replaces it (--resume continues it)", flush=True)

    implementation = tcae_kernels.implementation(d.device) if config.model.backend == "triton" \
        else config.model.backend
    if d.main:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = torch.get_num_threads()
        print(f"device {d.device} ({cores} cores): {workers} loader workers, {n} thread{'s' * (n != 1)}; "
              f"warp {config.model.backend} → {implementation}; recipe {config.recipe}; "
              f"{len(train_set.identities)} training identities, {len(train_set)} pairs per epoch "
              f"({sampler.batches_per_epoch} steps)", flush=True)
        note = tensorboard_note(config.tensorboard)
        if note:
            print(note, flush=True)

    ddp = model
    if d.world > 1:
        ddp = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.as_dict(), indent=1) + "\n")
    # A fresh run starts a fresh log; a resumed one continues its (truncated) log.
    log = MetricsLog(metrics_path if d.main else None, append=resume is not None,
                     tensorboard=out / "tensorboard" if config.tensorboard else None)

    def checkpoint() -> None:
        nonlocal saved_step
        try:
            save_checkpoint(ckpt_path, {
                "step": step, "epoch": epoch, "consumed": consumed, "config": config.as_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "curriculum": vars(curriculum).copy(), "rng": rng_state(),
                "world_size": d.world,
            })
        except OSError as e:  # a full disk, a lost mount: the write went to a temporary file, the old one stays
            kept = (f"the previous checkpoint {ckpt_path} (step {saved_step}) is intact" if saved_step is not None
                    else f"the earlier file {ckpt_path} is left as it was" if ckpt_path.exists()
                    else "no checkpoint has been written")
            raise CheckpointError(f"cannot write the step-{step} checkpoint {ckpt_path}: {e.strerror or e}; "
                                  f"{kept}") from e
        saved_step = step

    def due(every: int) -> bool:
        """Every ``every`` steps and at the last one; 0 = never."""
        return every > 0 and (step % every == 0 or step == config.steps)

    def validation_due() -> bool:
        if config.val_every == 0:  # once per epoch, and at the end
            return consumed == sampler.batches_per_epoch or step == config.steps
        return due(config.val_every)

    progress = Progress(step, config.steps, config.log_every)
    summary: dict[str, Any] = {"losses": {}, "panels": [], "val": None}
    train_seconds, window_seconds, window_images = 0.0, 0.0, 0
    skipped_count = 0  # all ranks' distinct skips, as of the last log step
    params = list(model.parameters())
    batches = stream(loader, sampler, epoch, consumed)
    model.train()
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            epoch, consumed, batch = next(batches)
            note_skipped(skipped, batch)
            source = batch["source"].to(d.device, non_blocking=True)
            target = batch["target"].to(d.device, non_blocking=True)
            step_weights = scale_aux(weights, aux_factor(config, step))
            with _autocast(config, d.device):
                result = ddp(source, target)
                losses, total = compute_losses(model, result, source, target, step_weights)
            # Every rank must stop together, or the others wait forever in the next all-reduce.
            local_bad = not bool(torch.isfinite(total).all())
            if d.all_sum(torch.tensor(float(local_bad), device=d.device)).item():
                raise NonFiniteLossError(non_finite_report(step + 1, losses, batch, d.rank) if local_bad
                                         else f"non-finite loss at step {step + 1} on another rank")
            loss = curriculum.select(losses, step_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < config.au_delay_steps:
                # Zero, not None: the optimizer counts the step for these parameters like the others.
                for p in model.au_decoder.output.parameters():
                    p.grad.zero_()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or math.inf)
            if not torch.isfinite(grad_norm):
                names = [n for n, p in model.named_parameters() if p.grad is not None
                         and not torch.isfinite(p.grad).all()]
                raise NonFiniteLossError(
                    f"non-finite gradient at step {step + 1} (finite losses) in {len(names)} parameters, "
                    f"first {names[:5]}\n" + "\n".join("  " + s for s in describe_samples(batch, range(len(total)))))
            step += 1
            logging = due(config.log_every)
            parts = grad_norms(model) if logging else {}
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t0
            train_seconds += dt
            window_seconds += dt
            window_images += config.batch_size

            if logging:
                names = list(losses)
                identity = (source.float() - target.float()).abs().flatten(1).mean(1)
                means = torch.stack([losses[n].detach().float().mean() for n in names]
                                    + [identity.mean(), total.detach().float().mean(), loss.detach().float()])
                means = (d.all_sum(means) / d.world).tolist()
                values = dict(zip(names + ["identity", "total", "loss"], means))
                rate = window_images / window_seconds
                summary["losses"] = values
                skipped_count = len(d.union(skipped))
                log({"step": step, "epoch": epoch, **values, "recon_ratio": values["recon"] / values["identity"],
                     "lr": scheduler.get_last_lr()[0], "img_per_s": rate, "window": [curriculum.lo, curriculum.hi],
                     "grad_norm": float(grad_norm), "grad_norms": parts, **displacement_sizes(result),
                     "skipped_frames": skipped_count, "time": train_seconds})
                window_seconds, window_images = 0.0, 0
                summary["img_per_s"] = rate
            if d.main:
                shown = summary["losses"] or {"loss": loss.item()}
                recon = (f"recon {shown['recon']:.4f} vs identity {shown['identity']:.4f}" if "recon" in shown
                         else "")
                unreadable = f" | {skipped_count} unreadable frames skipped" if skipped_count else ""
                progress.update(step, f"loss {shown['loss']:.4f} {recon} "
                                      f"| {summary.get('img_per_s', math.nan):.1f} img/s{unreadable}")

            if config.val_every >= 0 and validation_due():
                val = validate(model, val_loader, config, d, skipped, scale_aux(weights, aux_factor(config, step)))
                event = curriculum.record(val["pixel_loss"])
                log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val.items()},
                     "val_recon_ratio": val["recon"] / val["identity"], "best_val_pixel_loss": curriculum.best,
                     "event": event, "window": [curriculum.lo, curriculum.hi], "lr_scale": curriculum.lr_scale})
                summary["val"] = val
                if d.main:
                    what = {"slid": f", curriculum window now [{curriculum.lo:.2f}, {curriculum.hi:.2f})",
                            "lr": f", learning rate now × {curriculum.lr_scale:g}"}.get(event, "")
                    progress.message(f"step {step}: held-out pixel loss {val['pixel_loss']:.4f}, recon "
                                     f"{val['recon']:.4f} = {val['recon'] / val['identity']:.2f} × identity "
                                     f"{val['identity']:.4f}" + what)
            if d.main and due(config.panel_every):
                path = out / "panels" / f"step_{step:06d}.png"
                image = panel(model, panel_samples, config, d.device, path)
                log({"step": step, "panel": str(path)})
                log.image("panel", image, step)
                summary["panels"].append(str(path))
            if d.main and (due(config.ckpt_every) or step == config.steps):
                checkpoint()
    finally:
        log.close()
    summary.update(steps=step, skipped_frames=len(d.union(skipped)), window=[curriculum.lo, curriculum.hi],
                   lr_scale=curriculum.lr_scale,
                   train_seconds=train_seconds, wall_seconds=time.perf_counter() - wall_start, workers=workers,
                   threads=torch.get_num_threads(), implementation=implementation, checkpoint=str(ckpt_path),
                   metrics=str(metrics_path))
    return model, summary


def train_from_args(args: argparse.Namespace) -> int:
    """Train with the settings of :func:`~tcae.config.add_config_arguments`' flags; rank 0 prints the summary."""
    _, summary = train(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tcae.train``: the same as ``tcae train`` (``python -m tcae.cli train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
