"""A training run's settings: :class:`TrainConfig` (nesting the model's :class:`~tcae.model.TCAEConfig`),
the named recipes, and their files and command-line flags.

    config = TrainConfig.from_recipe("fast", data="data/synth", model={"image_size": 64, "width": 0.25})
    tcae train --recipe fast --data data/synth --image-size 64 --width 0.25

Precedence, lowest first: the dataclass defaults (SPEC section 6, the
"faithful" recipe), the recipe's settings, the resumed checkpoint's config,
the ``--config`` file, the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, check_range, check_types
from .model import TCAEConfig

CHECKPOINT_NAME = "checkpoint.pt"
MAX_THREADS = 1024  # torch.set_num_threads(100_000) crashes the process
MAX_WORKERS = 256


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


# What each recipe changes from the dataclass defaults (which are SPEC section 6's, the authors').
RECIPES: dict[str, dict[str, Any]] = {
    "faithful": {},
    # The smallest change found to learn within minutes on two CPU cores (README, "Learning check").
    # TCAE's cycle and consistency losses, on from the first step, hold both displacements at zero; so
    # the AU displacement waits while the pose one learns the head's motion, and those losses come in
    # once both move (docs/learning.md, "The other losses hold the displacements at zero").
    "fast": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "curriculum": False, "still_start": True,
             "warmup_steps": 100, "schedule": "cosine", "min_lr_ratio": 0.05, "au_delay_steps": 600,
             "aux_delay_steps": 1500, "aux_ramp_steps": 1000, "model": {"pose_grid": 4, "merge": "sum"}},
}


@dataclass
class TrainConfig:
    """One training run. Defaults are SPEC section 6's: the "faithful" recipe (SGD, lr 1e-3, momentum
    0.9, batch 64, 256 px, the curriculum); :meth:`from_recipe` starts from another recipe."""

    recipe: str = _opt("faithful", f"named settings to start from: {', '.join(RECIPES)}")
    model: TCAEConfig = field(default_factory=TCAEConfig, metadata={"help": "the model (TCAEConfig)"})
    # data
    data: str = _opt("data", "root/<identity>/<video>/<track>/*.png (tcae synth / tcae prepare write it)")
    pairs_per_identity: int = _opt(1, "(source, target) pairs per training identity per epoch (the original: 1)")
    max_offset: int = _opt(0, "largest frame distance between source and target; 0 = any two frames")
    jitter: bool = _opt(True, "SPEC's random crops, drawn independently for source and target")
    held_out: float = _opt(0.25, "fraction of identities held out for validation and the probe; 0 = none")
    num_workers: int = _opt(-1, "DataLoader worker processes (-1 = chosen from the device and cores)")
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
    curriculum: bool = _opt(True, "each loss term's curriculum window (else the batch mean)")
    still_start: bool = _opt(False, "zero the decoders' output convs: training starts from δ = 0 (identity)")
    sparsity_weight: float = _opt(0.1, "weight of the AU displacement sparsity loss (the original's: 0.1)")
    blur_weight: float = _opt(0.0, "weight of the reconstruction L1 after Gaussian blurs of 1/32 and 1/16 of the "
                                   "image side, which reaches motions larger than a thin feature (0 = off, the "
                                   "original)")
    au_delay_steps: int = _opt(0, "first steps with δ_AU held at 0 (its decoder's output conv, zeroed by "
                                  "still_start, is not updated): the pose displacement learns first")
    aux_delay_steps: int = _opt(0, "first steps with the cycle and embedding-consistency losses' weights at 0")
    aux_ramp_steps: int = _opt(0, "then those weights rise linearly to full over this many steps")
    patience: int = _opt(15, "validations without improvement, more than which slide the window")
    lr_patience: int = _opt(10, "the same, once the window has stopped: LR × 0.1")
    sync_bn: bool = _opt(True, "SyncBatchNorm under DDP on CUDA")
    # bookkeeping
    val_every: int = _opt(0, "steps between validations (0 = once per epoch, the original; -1 = never)")
    val_batches: int = _opt(8, "validation size, in batches of batch_size")
    ckpt_every: int = _opt(1000, "steps between checkpoints (one is always written at the end)")
    panel_every: int = _opt(500, "steps between PNG panels (0 = never; one at the end otherwise)")
    panel_samples: int = _opt(4, "rows in a panel")
    panel_arrows: bool = _opt(False, "draw each displacement's arrows over its colours (needs matplotlib)")
    log_every: int = _opt(10, "steps between metrics lines")
    tensorboard: bool = _opt(True, "also log to OUT/tensorboard when the tensorboard package is installed")
    out: str = _opt("runs/tcae", "output folder")
    seed: int = _opt(0, "seeds the model, the pairs and the split")
    device: str = _opt("auto", "auto (CUDA if available), cpu, cuda")
    threads: int = _opt(0, f"CPU intra-op threads (0 = chosen from the cores and loader workers), "
                           f"at most {MAX_THREADS}")
    max_frame_pixels: int = _opt(4096 * 4096, "larger frames (width × height, read from the file's header before "
                                              "decoding) are skipped as unreadable")

    def __post_init__(self) -> None:
        """Checks every setting's type and range (the flags, config files and checkpoints all come here)."""
        if isinstance(self.model, dict):  # from asdict(), a checkpoint or a config file
            self.model = TCAEConfig(**self.model)
        if not isinstance(self.model, TCAEConfig):
            raise ConfigError(f"model must be a TCAEConfig or a table of its settings, got {self.model!r}")
        check_types(self, skip=("model",))
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        choices = {
            "optimizer": ("sgd", "adam"),
            "schedule": ("none", "cosine"),
            "amp": ("auto", "bf16", "off"),
            "device": ("auto", "cpu", "cuda"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("pairs_per_identity", "batch_size", "steps", "val_batches", "panel_samples", "log_every",
                     "max_frame_pixels"):
            check_range(name, getattr(self, name), 1)
        for name in ("max_offset", "warmup_steps", "ckpt_every", "panel_every", "patience", "lr_patience", "seed",
                     "au_delay_steps", "aux_delay_steps", "aux_ramp_steps"):
            check_range(name, getattr(self, name), 0)
        for name in ("num_workers", "val_every"):
            check_range(name, getattr(self, name), -1)
        check_range("num_workers", self.num_workers, hi=MAX_WORKERS)
        check_range("threads", self.threads, 0, MAX_THREADS, meaning="0 = chosen from the cores")
        check_range("held_out", self.held_out, 0.0, 1.0, hi_open=True)
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True, meaning="SGD momentum or Adam's beta1")
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, meaning="the cosine's final fraction of lr")
        check_range("grad_clip", self.grad_clip, 0.0, meaning="0 = no clipping")
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("sparsity_weight", self.sparsity_weight, 0.0)
        check_range("blur_weight", self.blur_weight, 0.0)
        if self.au_delay_steps and not self.still_start:
            raise ConfigError(f"au_delay_steps ({self.au_delay_steps}) holds δ_AU at 0 by not updating the zeroed "
                              "output conv of still_start: it needs still_start")
        for name in ("data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must name a folder, got an empty string")

    @classmethod
    def from_recipe(cls, recipe: str = "faithful", **changes: Any) -> TrainConfig:
        """The recipe's settings with ``changes`` on top. A ``model`` dict in ``changes`` changes the
        recipe's model settings field by field; a :class:`TCAEConfig` replaces them."""
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
        settings = {**RECIPES[recipe], **changes, "recipe": recipe}
        if isinstance(changes.get("model"), dict):
            settings["model"] = {**RECIPES[recipe].get("model", {}), **changes["model"]}
        return cls(**settings)

    def as_dict(self) -> dict:
        """Plain values (the model's nested), as stored in checkpoints and config.json."""
        return dataclasses.asdict(self)


def workers_and_threads(config: TrainConfig, device: torch.device) -> tuple[int, int]:
    """DataLoader workers and CPU intra-op threads for ``config`` on ``device``.

    On a CPU the model and the loader share the cores: with 4 or fewer, the
    loader runs in the training process (its per-pair work is small next to
    a step, and worker processes would take cores the convolutions need) and
    training gets one thread per core minus one for the rest of the machine,
    at least one; with more cores, one worker per 8 cores (at most 4). On CUDA
    the GPU computes, so the loader gets up to 8 workers and torch keeps its
    own thread count. Explicit settings (``num_workers`` ≥ 0,
    ``threads`` > 0) are kept.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        workers = min(8, max(cores - 1, 0))
        threads = torch.get_num_threads()
    else:
        workers = 0 if cores <= 4 else min(4, cores // 8 or 1)
        threads = max(1, cores - workers - 1) if cores <= 4 else max(1, cores - workers)
    return (config.num_workers if config.num_workers >= 0 else workers,
            config.threads if config.threads > 0 else threads)


def _model_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TCAEConfig)}


def _train_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}


def nest(values: dict) -> dict:
    """Settings with the model's fields (flat, like ``image_size``, or under ``model``) gathered under ``model``.

    Raises ``ValueError`` naming any unknown setting.
    """
    values = dict(values)
    model = dict(values.pop("model", None) or {})
    for name in _model_fields() & set(values):
        model[name] = values.pop(name)
    unknown = sorted(set(values) - _train_fields()) + sorted(f"model.{k}" for k in set(model) - _model_fields())
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(_train_fields())} and model "
                         f"{sorted(_model_fields())}")
    return {**values, "model": model} if model else values


def load_config_file(path: str | Path) -> dict:
    """Settings from a .json or .toml file: TrainConfig's field names; the model's flat or under ``model``."""
    path = Path(path)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise ConfigError(f"reading {path} needs Python 3.11+ (tomllib); use a .json config") from e
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model", {}), dict):
        raise ConfigError(f"config file {path} must hold a table of settings (with the model's flat or in a "
                          f"table 'model'), got {type(values).__name__}")
    try:
        return nest(values)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _add_flags(parser: argparse.ArgumentParser, fields: tuple[dataclasses.Field, ...], helps: dict[str, str]) -> None:
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        help = f"{helps.get(f.name) or f.metadata.get('help', '')} (default {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=help)


MODEL_HELP = {
    "image_size": "side of the square crops: 64, 128 or 256 px",
    "in_channels": "image channels",
    "embed_dim": "size of the AU and of the pose embedding",
    "width": "multiplier on every hidden channel count",
    "backend": "warp implementation: triton, grid_sample or naive",
    "padding": "the warp's padding: border (the original) or zeros",
    "pose_grid": "0 (the original) or n: the pose displacement interpolates an n × n grid of vectors",
    "merge": "how δ_AU and δ_pose make δ: attention (the original) or sum",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` per TrainConfig and TCAEConfig field (``image_size`` → ``--image-size``), ``--config``
    and ``--resume``. Defaults shown are the faithful recipe's."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of settings; flags override it")
    parser.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                        help="continue from CKPT (default: OUT/checkpoint.pt)")
    _add_flags(parser, tuple(f for f in dataclasses.fields(TrainConfig) if f.name != "model"), {})
    _add_flags(parser, dataclasses.fields(TCAEConfig), MODEL_HELP)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from, in rising precedence: the recipe, the resumed checkpoint's config (with
    ``--resume``), the ``--config`` file, and the flags that were given."""
    from .checkpoint import load_checkpoint

    given = load_config_file(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in _train_fields() | _model_fields() if hasattr(args, name)}
    flags = nest(flags)
    given = {**given, **flags, "model": {**given.get("model", {}), **flags.get("model", {})}}
    if args.resume is not None:
        saved = load_checkpoint(resume_path(args.resume, given.get("out", TrainConfig.out)))["config"]
        given = {**saved, **given, "model": {**saved["model"], **given["model"]}}
    recipe = given.pop("recipe", "faithful")
    return TrainConfig.from_recipe(recipe, **given)


def resume_path(resume: str | Path, out: str | Path) -> Path:
    """The checkpoint ``--resume`` names: its argument, or ``out/checkpoint.pt`` when it has none."""
    return Path(resume) if str(resume) else Path(out) / CHECKPOINT_NAME
