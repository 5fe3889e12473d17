"""The Twin-Cycle Autoencoder (TCAE), SPEC section 6.

Two frames of one face track, a source S and a target, are encoded into an AU
embedding and a pose embedding each. Two decoders turn (source, target)
embedding pairs into displacement fields in pixels, one for the facial
actions (AU) and one for the head pose, plus a per-pixel attention logit each.
Warping S by δ_AU changes only its AUs, by δ_pose only its pose, and by their
attention-weighted merge δ it should become the target::

    model = TCAE(TCAEConfig(image_size=256))
    out = model(source, target)          # TCAEOutput
    losses, total = compute_losses(model, out, source, target)   # tcae.losses

Sizes. At 256×256 the encoder is the paper's: a 5-conv trunk (256 → 8 px)
and 3-conv branches (8 → 1 px). At 128 and 64 px the trunk drops its last one
or two convs, so the branches always start from 8×8 and end at 1×1; the
decoders likewise drop their first (coarsest) one or two stages. The layers
next to the image are the same at every size; only the deep layers next to
the 1×1 embedding are removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import tcae_kernels

from .errors import ConfigError, check_range, check_types

WarpFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]

# Looked up on every call (not bound at construction) so one table serves all
# models and a test can wrap an entry.
WARP_BACKENDS: dict[str, WarpFn] = {
    "triton": tcae_kernels.warp,
    "grid_sample": tcae_kernels.warp_grid_sample,
    "naive": tcae_kernels.warp_naive,
}

IMAGE_SIZES = (64, 128, 256)
TRUNK_CHANNELS = (32, 64, 128, 256, 256)
BRANCH_CHANNELS = (256, 256)  # followed by the embedding conv
DECODER_CHANNELS = (256, 256, 256, 256, 128, 64, 32)
BRANCH_INPUT_SIZE = 8  # three stride-2 convs take it to 1×1
MAX_WIDTH = 16.0  # a guard against typos: 16× the paper's channel counts


@dataclass
class TCAEConfig:
    """Hyper-parameters of :class:`TCAE`.

    image_size: side of the square input, 64, 128 or 256 pixels.
    in_channels: image channels (3 for RGB).
    embed_dim: size of each embedding (AU and pose); not scaled by ``width``.
    width: multiplier on every hidden channel count (0.125 gives a tiny model).
    backend: the warp T: "triton" (tcae_kernels.warp), "grid_sample" or "naive".
    padding: the warp's padding; the original clamps to the border.
    pose_grid: 0 (the paper) or a side n: the pose displacement is then the
        bilinear interpolation of an n × n grid of vectors (the decoder's
        output averaged over cells of image_size / n pixels). It can still
        express the head's motion (translation, roll and scale move a face
        affinely, which such a grid reproduces exactly) but not a brow or a
        lip corner moving on its own, which is left to the AU branch.
    merge: "attention" (the paper: δ = the per-pixel softmax-weighted mean of
        δ_AU and δ_pose) or "sum" (δ = δ_AU + δ_pose: the AU branch adds its
        local motion to the head's; the attention is then computed for the
        panels only and trains nothing).
    """

    image_size: int = 256
    in_channels: int = 3
    embed_dim: int = 256
    width: float = 1.0
    backend: str = "triton"
    padding: str = "border"
    pose_grid: int = 0
    merge: str = "attention"

    def __post_init__(self) -> None:
        check_types(self)
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {IMAGE_SIZES}, got {self.image_size}")
        if self.backend not in WARP_BACKENDS:
            raise ConfigError(f"backend must be one of {tuple(WARP_BACKENDS)}, got {self.backend!r}")
        if self.padding not in ("zeros", "border"):
            raise ConfigError(f"padding must be 'zeros' or 'border', got {self.padding!r}")
        if self.merge not in ("attention", "sum"):
            raise ConfigError(f"merge must be 'attention' or 'sum', got {self.merge!r}")
        if self.pose_grid and not (2 <= self.pose_grid < self.image_size and self.image_size % self.pose_grid == 0):
            raise ConfigError(f"pose_grid must be 0 or a divisor of image_size {self.image_size} in "
                              f"[2, {self.image_size}), got {self.pose_grid}")
        if not 0 < self.width <= MAX_WIDTH:
            raise ConfigError(f"width must be in (0, {MAX_WIDTH}], got {self.width}")
        check_range("embed_dim", self.embed_dim, 1)
        check_range("in_channels", self.in_channels, 1)

    def channels(self, c: int) -> int:
        """A hidden channel count of the full-width model, scaled by ``width``."""
        return max(1, round(c * self.width))

    @property
    def disp_scale(self) -> float:
        """Pixels per normalized unit: tanh's ±1 spans the image, (size − 1)/2 pixels."""
        return (self.image_size - 1) / 2


def down(c_in: int, c_out: int, norm_act: bool = True) -> nn.Sequential:
    """4×4 stride-2 conv (halves H and W), then BatchNorm + LeakyReLU(0.2) unless ``norm_act`` is False."""
    if not norm_act:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
    # BatchNorm's shift makes a conv bias redundant.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def up(c_in: int, c_out: int) -> nn.Sequential:
    """×2 bilinear upsampling, 3×3 conv, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class Encoder(nn.Module):
    """Shared trunk and two branches: images [B, C, size, size] → AU and pose embeddings [B, embed_dim]."""

    def __init__(self, config: TCAEConfig) -> None:
        super().__init__()
        n_trunk = int(math.log2(config.image_size // BRANCH_INPUT_SIZE))
        trunk, c_in = [], config.in_channels
        for c in TRUNK_CHANNELS[:n_trunk]:
            trunk.append(down(c_in, config.channels(c)))
            c_in = config.channels(c)
        self.trunk = nn.Sequential(*trunk)
        self.au_branch = self._branch(c_in, config)
        self.pose_branch = self._branch(c_in, config)

    @staticmethod
    def _branch(c_in: int, config: TCAEConfig) -> nn.Sequential:
        c1, c2 = (config.channels(c) for c in BRANCH_CHANNELS)
        return nn.Sequential(
            down(c_in, c1), down(c1, c2), down(c2, config.embed_dim, norm_act=False), nn.Flatten()
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(images)
        return self.au_branch(h), self.pose_branch(h)


def grid_smooth(disp: torch.Tensor, grid: int) -> torch.Tensor:
    """A field [B, 2, S, S] (pixels) → its means over grid × grid cells, bilinearly interpolated back to S × S.

    The mean of an affine field over a cell is its value at the cell's centre,
    and bilinear interpolation between the centres reproduces it: an affine
    motion passes unchanged, except in the outer half cells, which hold the
    border cells' values. Motion on a scale below a cell is averaged away.
    """
    return F.interpolate(F.adaptive_avg_pool2d(disp, grid), size=tuple(disp.shape[-2:]), mode="bilinear",
                         align_corners=False)


class Decoder(nn.Module):
    """(source, target) embeddings [B, embed_dim] each → displacement [B, 2, size, size] in pixels
    and attention logit [B, 1, size, size] in [−1, 1].

    log2(size) upsamplings from 1×1: one stage per entry of the channel list
    (its last entries at 64 and 128 px), then a final upsampling + 3×3 conv
    to 3 channels and tanh.
    """

    def __init__(self, config: TCAEConfig, grid: int = 0) -> None:
        """``grid``: 0, or the side of the grid the displacement is smoothed to (:func:`grid_smooth`)."""
        super().__init__()
        self.grid = grid
        n_stages = int(math.log2(config.image_size)) - 1
        layers: list[nn.Module] = [nn.ReLU()]
        c_in = 2 * config.embed_dim
        for c in DECODER_CHANNELS[-n_stages:]:
            layers.append(up(c_in, config.channels(c)))
            c_in = config.channels(c)
        layers += [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c_in, 3, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)
        self.disp_scale = config.disp_scale

    @property
    def output(self) -> nn.Conv2d:
        """The output conv (displacement and attention channels)."""
        return self.net[-1]

    def still(self) -> None:
        """Zero the output conv: δ = 0 and equal attention for any input, until training moves it.

        A randomly initialised decoder outputs a displacement of several
        pixels that does not depend on its input (the biases of the last
        layers), which starts training worse than the identity.
        """
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(
        self, source_emb: torch.Tensor, target_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([source_emb, target_emb], dim=1)[:, :, None, None]
        out = self.net(z)
        # A displacement of up to 127.5 px in bfloat16 is off by up to half a
        # pixel; the warp takes float32 δ beside low-precision images.
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        out = torch.tanh(out)
        disp = out[:, :2] * self.disp_scale
        if self.grid:
            disp = grid_smooth(disp, self.grid)
        return disp, out[:, 2:]


@dataclass
class TCAEOutput:
    """Everything :meth:`TCAE.forward` computes. B batch, S = image_size; displacements in pixels.

    au_changed, pose_changed, reconstruction: [B, C, S, S], dtype of the source.
    disp_au, disp_pose, disp (the merge): [B, 2, S, S] (δx, δy), float32 or float64.
    attention: [B, 2, S, S], per-pixel softmax weights of (AU, pose); sums to 1.
    source_au, source_pose, target_au, target_pose: [B, embed_dim].
    """

    au_changed: torch.Tensor
    pose_changed: torch.Tensor
    reconstruction: torch.Tensor
    disp_au: torch.Tensor
    disp_pose: torch.Tensor
    disp: torch.Tensor
    attention: torch.Tensor
    source_au: torch.Tensor
    source_pose: torch.Tensor
    target_au: torch.Tensor
    target_pose: torch.Tensor


class TCAE(nn.Module):
    """The Twin-Cycle Autoencoder: an encoder with AU and pose branches and one decoder per branch."""

    def __init__(self, config: TCAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.au_decoder = Decoder(config)
        self.pose_decoder = Decoder(config, grid=config.pose_grid)

    def _check_images(self, name: str, images: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"{name} must have shape [B, {c}, {s}, {s}], got {tuple(images.shape)}")

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, S, S] → (AU embedding, pose embedding), [B, embed_dim] each."""
        return self.encoder(images)

    def au_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, S, S] → AU embedding [B, embed_dim] (the AU detector's feature)."""
        return self.encoder.au_branch(self.encoder.trunk(images))

    def pose_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, S, S] → pose embedding [B, embed_dim]."""
        return self.encoder.pose_branch(self.encoder.trunk(images))

    def decode(
        self, kind: Literal["au", "pose"], source_emb: torch.Tensor, target_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The displacement [B, 2, S, S] (pixels) taking the source toward the target, and its
        attention logit [B, 1, S, S], from that kind's decoder; embeddings [B, embed_dim]."""
        decoder = {"au": self.au_decoder, "pose": self.pose_decoder}[kind]
        return decoder(source_emb, target_emb)

    def warp(self, images: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """T(images, disp) with the configured backend and padding; disp [B, 2, S, S] in pixels.

        The images are detached, as in the original: the losses train the
        displacement, not the pixels it moves (the encoder still sees them).
        """
        return WARP_BACKENDS[self.config.backend](images.detach(), disp, self.config.padding)

    def warp_l1(self, images: torch.Tensor, disp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample mean |T(images, disp) − target| → [B] (float32, or float64 for float64).

        The "triton" backend fuses the warp with the loss (tcae_kernels.warp_l1):
        the warped image is never written. The images are detached as in :meth:`warp`.
        """
        if self.config.backend == "triton":
            return tcae_kernels.warp_l1(images.detach(), disp, target, padding=self.config.padding)
        warped = self.warp(images, disp)
        wide = torch.float64 if warped.dtype == torch.float64 else torch.float32
        return (warped.to(wide) - target.to(wide)).abs().flatten(1).mean(1)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> TCAEOutput:
        """source, target: [B, C, S, S] frames of one face track → :class:`TCAEOutput`.

        With the "triton" backend the reconstruction comes from the fused
        merge-and-warp kernel (tcae_kernels.merged_warp), which never forms δ;
        ``disp`` and ``attention`` are then computed for inspection only and
        carry no gradient (no TCAE loss uses them).
        """
        self._check_images("source", source)
        self._check_images("target", target)
        # One encoder pass per image group, as the original: BatchNorm's
        # training statistics are those of the sources, then of the targets.
        source_au, source_pose = self.embed(source)
        target_au, target_pose = self.embed(target)
        disp_au, logit_au = self.decode("au", source_au, target_au)
        disp_pose, logit_pose = self.decode("pose", source_pose, target_pose)
        summed = self.config.merge == "sum"
        fused = self.config.backend == "triton" and not summed
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fused and not summed):
            # softmax == e^a_i / Σ e^a_j, the paper's merge, without overflow.
            attention = F.softmax(torch.cat([logit_au, logit_pose], dim=1), dim=1)
            disp = attention[:, :1] * disp_au + attention[:, 1:] * disp_pose
        if summed:
            disp = disp_au + disp_pose
            reconstruction = self.warp(source, disp)
        elif fused:
            reconstruction = tcae_kernels.merged_warp(
                source.detach(), disp_au, disp_pose, logit_au, logit_pose, self.config.padding
            )
        else:
            reconstruction = self.warp(source, disp)
        return TCAEOutput(
            au_changed=self.warp(source, disp_au),
            pose_changed=self.warp(source, disp_pose),
            reconstruction=reconstruction,
            disp_au=disp_au,
            disp_pose=disp_pose,
            disp=disp,
            attention=attention,
            source_au=source_au,
            source_pose=source_pose,
            target_au=target_au,
            target_pose=target_pose,
        )
