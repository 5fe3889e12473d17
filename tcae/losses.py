"""TCAE's losses and its curriculum over per-sample losses (SPEC section 6).

:func:`compute_losses` returns every loss per sample, so that the curriculum
(:func:`select_window`, :class:`Curriculum`) can rank the samples of a batch
by their weighted total and train on a window of them::

    out = model(source, target)
    losses, total = compute_losses(model, out, source, target)   # dict name → [B], [B]
    loss = curriculum.select(total)
    loss.backward()

Embedding targets are not detached: like the original code, which computes
both sides on the fly, a consistency loss pulls the changed image's embedding
and the reference embedding toward each other. The embeddings cannot all
collapse to a constant to satisfy it, because the reconstruction loss needs
the decoders to read the source and target apart from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .model import TCAE, TCAEOutput


@dataclass
class LossWeights:
    """Weight of each loss in the total; the defaults are the original's. Names match the loss dict."""

    recon: float = 10.0  # L1(T(S, δ), target)
    pose_changed_pose: float = 1.0  # MSE(pose emb of pose-changed, target's pose emb)
    pose_changed_au: float = 1.0  # MSE(AU emb of pose-changed, source's AU emb)
    au_changed_pose: float = 1.0  # MSE(pose emb of AU-changed, source's pose emb)
    au_changed_au: float = 1.0  # MSE(AU emb of AU-changed, target's AU emb)
    recon_pose: float = 1.0  # MSE(pose emb of reconstruction, target's pose emb)
    recon_au: float = 1.0  # MSE(AU emb of reconstruction, target's AU emb)
    cycle_pose: float = 1.0  # L1(pose-changed warped back by the pose decoder, source)
    cycle_au: float = 1.0  # L1(AU-changed warped back by the AU decoder, source)
    au_sparsity: float = 0.1  # mean |δ_AU| in normalized units (pixels / ((size − 1)/2))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it already is: bfloat16 losses would round away small errors."""
    return t if t.dtype == torch.float64 else t.float()


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error, [B, ...] × 2 → [B]."""
    return (_wide(a) - _wide(b)).abs().flatten(1).mean(1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, [B, D] × 2 → [B]."""
    return (_wide(a) - _wide(b)).pow(2).flatten(1).mean(1)


def compute_losses(
    model: TCAE,
    out: TCAEOutput,
    source: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every TCAE loss per sample, and their weighted sum.

    Args:
        model: the model that produced ``out`` (its encoder and decoders are run
            again on the changed images).
        out: ``model(source, target)``.
        source, target: [B, C, S, S] the frames ``out`` was computed from.
        weights: loss weights; the original's by default.

    Returns:
        (losses, total): losses maps each name of :class:`LossWeights` to a [B]
        tensor; total is the [B] weighted sum, the quantity the curriculum ranks.
    """
    weights = weights or LossWeights()
    # One encoder pass for the three changed images.
    au, pose = model.embed(torch.cat([out.pose_changed, out.au_changed, out.reconstruction]))
    pc_au, ac_au, rc_au = au.chunk(3)
    pc_pose, ac_pose, rc_pose = pose.chunk(3)
    # Cycles: each decoder must undo its own change, reading the changed
    # image's embedding as the new source and S's as the target.
    back_pose, _ = model.decode("pose", pc_pose, out.source_pose)
    back_au, _ = model.decode("au", ac_au, out.source_au)
    losses = {
        "recon": _l1(out.reconstruction, target),
        "pose_changed_pose": _mse(pc_pose, out.target_pose),
        "pose_changed_au": _mse(pc_au, out.source_au),
        "au_changed_pose": _mse(ac_pose, out.source_pose),
        "au_changed_au": _mse(ac_au, out.target_au),
        "recon_pose": _mse(rc_pose, out.target_pose),
        "recon_au": _mse(rc_au, out.target_au),
        "cycle_pose": model.warp_l1(out.pose_changed, back_pose, source),
        "cycle_au": model.warp_l1(out.au_changed, back_au, source),
        "au_sparsity": out.disp_au.abs().flatten(1).mean(1) / model.config.disp_scale,
    }
    total = sum(w * losses[name] for name, w in asdict(weights).items())
    return losses, total


def select_window(per_sample_total: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Mean of the sorted per-sample losses [B] in the window [⌊lo·B⌋, ⌊hi·B⌋), ascending.

    The window holds at least one sample. Sorting ascending means the window
    starts at the easiest samples and, as the curriculum slides, moves toward
    harder ones; the hardest (above hi) are left out, which also keeps out
    broken pairs such as a lost face track.
    """
    if per_sample_total.dim() != 1 or per_sample_total.numel() == 0:
        raise ValueError(
            f"per_sample_total must be a non-empty [B] tensor, got shape {tuple(per_sample_total.shape)}"
        )
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    b = per_sample_total.numel()
    # Bounds built by repeated additions land just below the intended value
    # (0.5 + 0.1 + 0.1 + 0.1 = 0.7999999999999999); the epsilon keeps them from
    # cutting one sample short.
    start = min(math.floor(lo * b + 1e-6), b - 1)
    end = min(max(math.floor(hi * b + 1e-6), start + 1), b)
    return per_sample_total.sort().values[start:end].mean()


@dataclass
class Curriculum:
    """The window [lo, hi) of :func:`select_window`, sliding toward harder samples.

    Starts at [0, 0.5). Each :meth:`slide` (call it when validation loss stops
    improving) moves both ends up by ``step``, the last move only as far as
    hi = ``hi_max``; after that it stays put.
    """

    lo: float = 0.0
    hi: float = 0.5
    step: float = 0.1
    hi_max: float = 0.85

    @property
    def done(self) -> bool:
        """Whether the window has reached hi_max."""
        return self.hi >= self.hi_max - 1e-9

    def slide(self) -> bool:
        """Move the window up; return False (and do nothing) once it is at hi_max."""
        if self.done:
            return False
        shift = min(self.step, self.hi_max - self.hi)
        # Rounding keeps repeated float additions from drifting.
        self.lo = round(self.lo + shift, 9)
        self.hi = round(self.hi + shift, 9)
        return True

    def select(self, per_sample_total: torch.Tensor) -> torch.Tensor:
        """:func:`select_window` with this window: [B] → scalar."""
        return select_window(per_sample_total, self.lo, self.hi)
