"""TCAE's losses and its curriculum over per-sample losses (SPEC section 6).

:func:`compute_losses` returns every loss per sample, so that the curriculum
(:func:`window_loss`, :class:`Curriculum`) can rank the samples of a batch,
term by term, and train on a window of them::

    out = model(source, target)
    losses, total = compute_losses(model, out, source, target)   # dict name → [B], [B]
    loss = curriculum.select(losses, LossWeights())             # each term's window, weighted
    loss.backward()

Embedding targets are not detached: like the original code, which computes
both sides on the fly, a consistency loss pulls the changed image's embedding
and the reference embedding toward each other. The embeddings cannot all
collapse to a constant to satisfy it, because the reconstruction loss needs
the decoders to read the source and target apart from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .model import TCAE, TCAEOutput


@dataclass
class LossWeights:
    """Weight of each loss in the total; the defaults are the original's. Names match the loss dict."""

    recon: float = 10.0  # L1(T(S, δ), target)
    recon_blur: float = 0.0  # the same L1 after Gaussian blurs (blurred_l1); 0 = off (then not computed: 0)
    pose_changed_pose: float = 1.0  # MSE(pose emb of pose-changed, target's pose emb)
    pose_changed_au: float = 1.0  # MSE(AU emb of pose-changed, source's AU emb)
    au_changed_pose: float = 1.0  # MSE(pose emb of AU-changed, source's pose emb)
    au_changed_au: float = 1.0  # MSE(AU emb of AU-changed, target's AU emb)
    recon_pose: float = 1.0  # MSE(pose emb of reconstruction, target's pose emb)
    recon_au: float = 1.0  # MSE(AU emb of reconstruction, target's AU emb)
    cycle_pose: float = 1.0  # L1(pose-changed warped back by the pose decoder, source)
    cycle_au: float = 1.0  # L1(AU-changed warped back by the AU decoder, source)
    au_sparsity: float = 0.1  # mean |clamp(x − δ_AU) − x| in normalized units (pixels / ((size − 1)/2))


# The terms that tie the two displacements to each other and to the embeddings: the six embedding
# consistency terms and the two cycles.
CONSISTENCY_TERMS = ("pose_changed_pose", "pose_changed_au", "au_changed_pose", "au_changed_au", "recon_pose",
                     "recon_au")
CYCLE_TERMS = ("cycle_pose", "cycle_au")
AUX_TERMS = CONSISTENCY_TERMS + CYCLE_TERMS


def scale_aux(weights: LossWeights, factor: float) -> LossWeights:
    """``weights`` with the :data:`AUX_TERMS`' weights multiplied by ``factor`` (a warm-up's)."""
    return dataclasses.replace(weights, **{name: getattr(weights, name) * factor for name in AUX_TERMS})


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it already is: bfloat16 losses would round away small errors."""
    return t if t.dtype == torch.float64 else t.float()


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error, [B, ...] × 2 → [B]."""
    return (_wide(a) - _wide(b)).abs().flatten(1).mean(1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, [B, D] × 2 → [B]."""
    return (_wide(a) - _wide(b)).pow(2).flatten(1).mean(1)


BLUR_FRACTIONS = (1 / 32, 1 / 16)  # σ of blurred_l1's blurs, as fractions of the image side: 2 and 4 px at 64 px


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """images [B, C, H, W] blurred by a Gaussian of σ = ``sigma`` pixels (separable, ±3σ taps, edges replicated)."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    images = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                      groups=c)
    return F.conv2d(F.pad(images, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def blurred_l1(a: torch.Tensor, b: torch.Tensor, fractions: tuple[float, ...] = BLUR_FRACTIONS) -> torch.Tensor:
    """Per-sample L1 of a and b [B, C, S, S] after a Gaussian blur of σ = f · S pixels, summed over
    ``fractions`` → [B].

    The plain L1 of a warped image has a slope toward the true motion only
    where the moved feature overlaps its target: a brow 2 px thick, raised by
    4 px, gives the displacement no gradient toward it. Blurred, the feature
    overlaps, and the loss leads the displacement there (the coarse levels of
    an optical-flow pyramid do the same).
    """
    with torch.autocast(a.device.type, enabled=False):  # bfloat16 would round away the blurred differences
        a, b = _wide(a), _wide(b)
        return sum(_l1(gaussian_blur(a, f * a.shape[-1]), gaussian_blur(b, f * a.shape[-1])) for f in fractions)


def au_sparsity(disp: torch.Tensor, disp_scale: float) -> torch.Tensor:
    """Per-sample mean |clamp(x − δ) − x| over pixels and both axes → [B], in normalized units.

    disp [B, 2, H, W] in pixels; ``disp_scale`` pixels per normalized unit.
    Measured after the border clamp, as the original (which clamps its
    normalized grid to [−1, 1]): pushing a sample position beyond the image
    edge costs nothing more and gets no gradient.
    """
    h, w = disp.shape[-2:]
    ys = torch.arange(h, device=disp.device, dtype=disp.dtype).view(h, 1)
    xs = torch.arange(w, device=disp.device, dtype=disp.dtype).view(1, w)
    moved_x = (xs - disp[:, 0]).clamp(0, w - 1) - xs
    moved_y = (ys - disp[:, 1]).clamp(0, h - 1) - ys
    return (moved_x.abs() + moved_y.abs()).flatten(1).mean(1) / (2 * disp_scale)


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
    # One encoder pass per image group (BatchNorm statistics per group, as the original).
    pc_au, pc_pose = model.embed(out.pose_changed)
    ac_au, ac_pose = model.embed(out.au_changed)
    rc_au, rc_pose = model.embed(out.reconstruction)
    # Cycles: each decoder must undo its own change, reading the changed
    # image's embedding as the new source and S's as the target.
    back_pose, _ = model.decode("pose", pc_pose, out.source_pose)
    back_au, _ = model.decode("au", ac_au, out.source_au)
    recon = _l1(out.reconstruction, target)
    losses = {
        "recon": recon,
        # Not computed when off: its blurs are about 15 % of a 64-px training step on a CPU.
        "recon_blur": blurred_l1(out.reconstruction, target) if weights.recon_blur else torch.zeros_like(recon),
        "pose_changed_pose": _mse(pc_pose, out.target_pose),
        "pose_changed_au": _mse(pc_au, out.source_au),
        "au_changed_pose": _mse(ac_pose, out.source_pose),
        "au_changed_au": _mse(ac_au, out.target_au),
        "recon_pose": _mse(rc_pose, out.target_pose),
        "recon_au": _mse(rc_au, out.target_au),
        "cycle_pose": model.warp_l1(out.pose_changed, back_pose, source),
        "cycle_au": model.warp_l1(out.au_changed, back_au, source),
        "au_sparsity": au_sparsity(out.disp_au, model.config.disp_scale),
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


def window_loss(losses: Mapping[str, torch.Tensor], weights: LossWeights, lo: float, hi: float) -> torch.Tensor:
    """SPEC's curriculum loss: for each term separately, the mean of its sorted per-sample values in the
    window [lo, hi) (:func:`select_window`), weighted and summed → scalar. ``losses``: name → [B]."""
    return sum(w * select_window(losses[name], lo, hi) for name, w in asdict(weights).items())


def pixel_criterion(losses: Mapping[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """The validation criterion: the weighted pixel losses (reconstruction and both cycles) per sample → [B].

    The original divides the six embedding terms by B·256 when it validates,
    which leaves, in effect, these three; we name it for what it is.
    """
    return (weights.recon * losses["recon"] + weights.cycle_pose * losses["cycle_pose"]
            + weights.cycle_au * losses["cycle_au"])


@dataclass
class Curriculum:
    """The original's schedule, driven by one validation score per epoch (:meth:`record`).

    The window [lo, hi) of :func:`window_loss` starts at [0, 0.5). When the
    score has not improved for more than ``patience`` validations, both ends
    move up by ``step`` and the best score is forgotten; moves happen while
    hi < ``hi_limit``, so the last window is [0.4, 0.9). After that, the same
    trigger with ``lr_patience`` multiplies ``lr_scale`` by ``lr_factor``
    (ReduceLROnPlateau's rule: the count restarts, the best is kept).
    """

    lo: float = 0.0
    hi: float = 0.5
    step: float = 0.1
    hi_limit: float = 0.85
    patience: int = 15
    lr_patience: int = 10
    lr_factor: float = 0.1
    best: float = math.inf
    stale: int = 0
    lr_scale: float = 1.0

    @property
    def done(self) -> bool:
        """Whether the window has stopped moving."""
        return self.hi >= self.hi_limit - 1e-9

    def slide(self) -> bool:
        """Move the window up by ``step``; return False (and do nothing) once it has stopped."""
        if self.done:
            return False
        # Rounding keeps repeated float additions from drifting.
        self.lo = round(self.lo + self.step, 9)
        self.hi = round(self.hi + self.step, 9)
        return True

    def record(self, score: float) -> str | None:
        """Note one validation score (lower is better); returns "slid", "lr" or None for what it triggered."""
        if score < self.best:
            self.best, self.stale = score, 0
            return None
        self.stale += 1
        if not self.done:
            if self.stale > self.patience:
                self.slide()
                self.best, self.stale = math.inf, 0
                return "slid"
        elif self.stale > self.lr_patience:
            self.lr_scale *= self.lr_factor
            self.stale = 0
            return "lr"
        return None

    def select(self, losses: Mapping[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
        """:func:`window_loss` with this window: name → [B] → scalar."""
        return window_loss(losses, weights, self.lo, self.hi)
