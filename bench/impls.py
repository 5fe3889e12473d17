"""The implementations the benchmark compares, and the correctness gate they pass first.

Every implementation is a ``prepare(src, disp, padding, need_src, need_disp)``
returning a :class:`Prepared`: the leaf tensors it differentiates, a closure
that runs the forward on them, and how to map its second leaf's gradient back
to a gradient w.r.t. ``disp`` (pixels), so all of them are checked alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

import tcae_kernels
from tcae_kernels import cpu
from tcae_kernels.testing import TOLERANCES

WarpFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]

# Ours is held to SPEC section 3's tolerances against warp_naive in float64.
SPEC_TOL = TOLERANCES
# Baselines form float32 positions (x − δ)·2/(W−1) − 1 (naive: x − δ), rounding them
# by ~1e-7·size px: ~3e-5 forward error at 1024 px. Where a position then lands across
# a pixel edge, δ's gradient takes the neighbouring cell's value, an O(1) jump at a
# handful of pixels that dominates the L2 error (~1e-2 measured at 256 and 1024 px).
BASELINE_TOL = (1e-4, 5e-2)


class CorrectnessError(RuntimeError):
    """An implementation disagrees with warp_naive beyond its tolerance."""


@dataclass
class Prepared:
    """One implementation bound to one set of inputs."""

    inputs: tuple[torch.Tensor, torch.Tensor]  # (src-like, disp-like) leaves
    run: Callable[[], torch.Tensor]
    disp_grad: Callable[[torch.Tensor], torch.Tensor] = lambda g: g  # second leaf's grad → ∂L/∂δ

    @property
    def wrt(self) -> list[torch.Tensor]:
        return [t for t in self.inputs if t.requires_grad]


def _compute_dtype(src: torch.Tensor) -> torch.dtype:
    """grid_sample wants src and grid in one dtype, and a bf16/fp16 grid is off by up to
    ~0.5 px at 256 px, so the baselines run low-precision inputs in float32 (as autocast does)."""
    return torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype


def normalized_grid(disp: torch.Tensor, h_in: int, w_in: int) -> torch.Tensor:
    """[B, H, W, 2] grid for ``align_corners=True``: g = 2(x − δx)/(W_in − 1) − 1, likewise y.

    Built as TCAE's code does: a base grid of pixel coordinates, the displacement
    (pixels) subtracted, scaled to [−1, 1], permuted channels-last.
    """
    _, _, h, w = disp.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=disp.device, dtype=disp.dtype),
        torch.arange(w, device=disp.device, dtype=disp.dtype),
        indexing="ij",
    )
    base = torch.stack((xs, ys)).unsqueeze(0)
    scale = _grid_scale(disp, h_in, w_in)
    return rearrange((base - disp) * scale - 1, "b xy h w -> b h w xy")


def _grid_scale(disp: torch.Tensor, h_in: int, w_in: int) -> torch.Tensor:
    """Normalized units per pixel, [1, 2, 1, 1]."""
    return torch.tensor([2 / (w_in - 1), 2 / (h_in - 1)], device=disp.device, dtype=disp.dtype).view(1, 2, 1, 1)


def grid_sample_path(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """The warp the way TCAE's code computes it; the grid is rebuilt every call (part of the cost).

    disp in pixels, [B, 2, H, W]; returns [B, C, H, W] in src's dtype.
    """
    grid = normalized_grid(disp, *src.shape[-2:])
    out = F.grid_sample(
        src.to(_compute_dtype(src)), grid, mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out.to(src.dtype)


def naive_fp32(src: torch.Tensor, disp: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """warp_naive, in float32 for low-precision src: in bf16 its positions round to whole pixels."""
    dt = _compute_dtype(src)
    return tcae_kernels.warp_naive(src.to(dt), disp.to(dt), padding).to(src.dtype)


def standard(fn: WarpFn) -> Callable[..., Prepared]:
    """Wrap a warp-like ``fn(src, disp, padding)`` as an implementation."""

    def prepare(src, disp, padding, need_src, need_disp) -> Prepared:
        s = src.detach().requires_grad_(need_src)
        d = disp.detach().requires_grad_(need_disp)
        return Prepared((s, d), lambda: fn(s, d, padding))

    return prepare


def grid_sample_kernel(src, disp, padding, need_src, need_disp) -> Prepared:
    """F.grid_sample alone on a precomputed grid (and precomputed float32 src for low precision).

    Its leaves are (src, grid); ∂L/∂δ = −∂L/∂grid · (normalized units per pixel).
    """
    h_in, w_in = src.shape[-2:]
    with torch.no_grad():
        grid = normalized_grid(disp, h_in, w_in)
        s = src.to(_compute_dtype(src))
    s.requires_grad_(need_src)
    grid.requires_grad_(need_disp)
    scale = _grid_scale(disp, h_in, w_in)
    return Prepared(
        (s, grid),
        lambda: F.grid_sample(s, grid, mode="bilinear", padding_mode=padding, align_corners=True),
        lambda g: -rearrange(g, "b h w xy -> b xy h w") * scale,
    )


IMPLS: dict[str, Callable[..., Prepared]] = {
    "ours": standard(tcae_kernels.warp),
    "fallback": standard(tcae_kernels.warp_torch),
    **({"cpu": standard(cpu.warp)} if cpu.available() else {}),
    "gs-path": standard(grid_sample_path),
    "gs-kernel": grid_sample_kernel,
    "naive": standard(naive_fp32),
}
OURS = ("ours", "fallback", "cpu")  # held to SPEC's tolerances; the rest to BASELINE_TOL


def tolerance(impl: str, dtype: torch.dtype) -> tuple[float, float]:
    """(forward, gradient) relative L2 tolerance of ``impl`` for src of ``dtype``."""
    fwd, grad = SPEC_TOL[dtype]
    if impl in OURS:
        return fwd, grad
    return max(fwd, BASELINE_TOL[0]), max(grad, BASELINE_TOL[1])


def _evaluate(prep: Prepared, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and the gradients its leaves ask for, named "out", "grad_src", "grad_disp"."""
    out = prep.run()
    res = {"out": out}
    if prep.wrt:
        grads = torch.autograd.grad(out, prep.wrt, grad_out.to(out.dtype))
        by_leaf = dict(zip([k for k, t in enumerate(prep.inputs) if t.requires_grad], grads))
        if 0 in by_leaf:
            res["grad_src"] = by_leaf[0]
        if 1 in by_leaf:
            res["grad_disp"] = prep.disp_grad(by_leaf[1])
    return res


def check(
    impl: str, src: torch.Tensor, disp: torch.Tensor, grad_out: torch.Tensor,
    padding: str, need_src: bool, need_disp: bool,
) -> dict[str, float]:
    """Run ``impl`` on the full inputs; compare batch elements 0 and B−1 with warp_naive in float64.

    Returns the relative L2 errors by name ("out", "grad_src", "grad_disp");
    raises :class:`CorrectnessError` past :func:`tolerance`.
    """
    got = _evaluate(IMPLS[impl](src, disp, padding, need_src, need_disp), grad_out)
    # Batch elements never mix, so two of them check the indexing without a
    # float64 copy of everything.
    idx = torch.tensor(sorted({0, src.shape[0] - 1}), device=src.device)
    s, d, g = (t.index_select(0, idx).double() for t in (src, disp, grad_out))
    want = _evaluate(standard(tcae_kernels.warp_naive)(s, d, padding, need_src, need_disp), g)
    tol_fwd, tol_grad = tolerance(impl, src.dtype)
    errors = {}
    for name, ref in want.items():
        a = got[name].index_select(0, idx).double()
        err = ((a - ref).norm() / ref.norm()).item()
        tol = tol_fwd if name == "out" else tol_grad
        if not err <= tol:  # NaN fails too
            raise CorrectnessError(
                f"{impl}: {name} relative L2 error {err:.2e} > tolerance {tol:.0e} against "
                f"warp_naive (float64) for src {tuple(src.shape)} {src.dtype}, padding={padding!r}"
            )
        errors[name] = err
    return errors
