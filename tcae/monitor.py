"""What a training run reports: the progress line, metrics (JSON lines, and TensorBoard when installed),
per-module gradient norms, displacement sizes, and the diagnosis of a non-finite loss."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import TCAE, TCAEOutput

# The parts of the model whose gradient norms are logged (grad_norm/<part>).
MODULES = ("encoder.trunk", "encoder.au_branch", "encoder.pose_branch", "au_decoder", "pose_decoder")


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss or gradient; the message says where."""


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


def grad_norms(model: TCAE) -> dict[str, float]:
    """L2 norm of the gradients of each part in :data:`MODULES` (0 where none has one yet)."""
    norms = {}
    for part in MODULES:
        grads = [p.grad.detach().float().norm() for p in model.get_submodule(part).parameters() if p.grad is not None]
        norms[part] = float(torch.stack(grads).norm()) if grads else 0.0
    return norms


def displacement_sizes(out: TCAEOutput) -> dict[str, float]:
    """Mean and largest |δ| in pixels of the AU, pose and merged displacements of a batch."""
    sizes = {}
    for name in ("disp_au", "disp_pose", "disp"):
        length = getattr(out, name).detach().float().norm(dim=1)
        sizes[f"{name}_mean_px"] = float(length.mean())
        sizes[f"{name}_max_px"] = float(length.max())
    return sizes


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One status line, rewritten in place on a terminal; plain lines every ``every`` steps otherwise.

    The ETA is wall-clock: everything since the first step of this call
    (validation, panels and checkpoints included) per step, times the steps left.
    """

    def __init__(self, start: int, total: int, every: int, stream=None) -> None:
        # sys.stdout as it is now, not as it was at import: it may have been redirected since.
        self.start, self.total, self.every = start, total, every
        self.stream = sys.stdout if stream is None else stream
        self.tty = self.stream.isatty()
        self.began = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start
        return (time.perf_counter() - self.began) / done * (self.total - step) if done > 0 else float("nan")

    def update(self, step: int, text: str) -> None:
        text = f"{text} | eta {_duration(self.eta(step))}" if step > self.start else text
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


def _tensorboard_writer(folder: Path):
    """A SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per record) and, when enabled and installed, TensorBoard.

    Numbers in a record become TensorBoard scalars (``grad_norm`` dicts as
    ``grad_norm/<part>``); :meth:`image` adds a panel. Only the main process
    writes: on other ranks every method does nothing.
    """

    def __init__(self, path: Path | None, append: bool, tensorboard: Path | None) -> None:
        self.file = open(path, "a" if append else "w") if path is not None else None
        self.tb = _tensorboard_writer(tensorboard) if tensorboard is not None and path is not None else None

    def __call__(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, dict):
                    for part, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{part}", v, record["step"])
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image`` [H, W, 3] uint8 to TensorBoard."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def tensorboard_note(enabled: bool) -> str | None:
    """Why TensorBoard logging is off, when it was asked for but cannot run; else None."""
    if not enabled:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return "TensorBoard logging off: pip install 'tcae-kernels[tensorboard]' to get it"
    return None
