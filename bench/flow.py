"""The ops for models that use the x + flow convention, next to what those models run today.

- ``flow_warp`` vs the RAFT-style grid_sample path: coords = base grid + flow,
  normalized for ``align_corners=True``, ``F.grid_sample`` (RAFT's
  ``bilinear_sampler``; PWC-Net's and VoxelMorph's warps are the same calls).
- ``splat`` (softmax mode) vs a pure-PyTorch ``index_add_`` softmax splat, the
  usual CuPy-free substitute for the softmax-splatting kernels.

Each implementation is checked against the float64 references (warp_naive at
−flow, splat_naive) on batch element 0 before it is timed, forward and
gradients; ``python -m bench`` runs this after the warp sweep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tcae_kernels
from tcae_kernels.ops.launch import INTERPRET
from tcae_kernels.testing import TOLERANCES

from .harness import Shape, Timer
from .impls import BASELINE_TOL, CorrectnessError

# Frame interpolation (8 RGB frames of 512²) and a feature pyramid level.
SHAPES: dict[str, Shape] = {"interp": (8, 3, 512, 512), "feat": (8, 64, 128, 128)}
QUICK_SHAPES: dict[str, Shape] = {"q-interp": (2, 3, 64, 64), "q-feat": (2, 16, 32, 32)}
FLOW_PX = 3.0


def raft_warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """RAFT's backward warp: coords_grid + flow, normalized to [−1, 1], grid_sample(align_corners=True)."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=flow.dtype),
                            torch.arange(w, device=img.device, dtype=flow.dtype), indexing="ij")
    coords = torch.stack((xs, ys)).unsqueeze(0) + flow
    grid = torch.stack((2 * coords[:, 0] / (w - 1) - 1, 2 * coords[:, 1] / (h - 1) - 1), dim=-1)
    # Low precision runs in float32 (as autocast does): a bfloat16 grid is off by up to ~0.5 px.
    dtype = torch.float32 if img.dtype in (torch.float16, torch.bfloat16) else img.dtype
    return F.grid_sample(img.to(dtype), grid.to(dtype), mode="bilinear", align_corners=True).to(img.dtype)


def index_add_softmax_splat(src: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Softmax splatting with index_add_ (four bilinear corners, out-of-image dropped), in PyTorch."""
    b, c, h, w = src.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=src.device, dtype=flow.dtype),
                            torch.arange(w, device=src.device, dtype=flow.dtype), indexing="ij")
    tx, ty = xs + flow[:, 0], ys + flow[:, 1]
    x0, y0 = torch.floor(tx), torch.floor(ty)
    z = torch.exp(metric[:, 0] - metric.detach().amax(dim=(1, 2, 3)).view(b, 1, 1))
    vals = torch.cat((src * z.unsqueeze(1), z.unsqueeze(1)), dim=1).permute(0, 2, 3, 1).reshape(b * h * w, c + 1)
    out = vals.new_zeros(b * h * w, c + 1)
    base = torch.arange(b, device=src.device).view(b, 1, 1) * (h * w)
    for xi, wx in ((x0, 1 - (tx - x0)), (x0 + 1, tx - x0)):
        for yi, wy in ((y0, 1 - (ty - y0)), (y0 + 1, ty - y0)):
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = (base + (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()).reshape(-1)
            weight = (wx * wy * inside).reshape(-1, 1)
            out = out.index_add(0, idx, vals * weight)
    out = out.view(b, h, w, c + 1).permute(0, 3, 1, 2)
    den = out[:, c:]
    return torch.where(den != 0, out[:, :c] / torch.where(den != 0, den, 1.0), 0.0).to(src.dtype)


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, _, h, w = shape
    src = torch.randn(shape, generator=gen).to(device, dtype)
    coarse = torch.randn(b, 2, max(h // 16, 2), max(w // 16, 2), generator=gen)
    flow = (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False) * FLOW_PX).to(device)
    metric = torch.randn(b, 1, h, w, generator=gen).to(device)
    return src, flow, metric, torch.randn(shape, generator=gen).to(device, dtype)


def _run(fn, leaves: list[torch.Tensor], grad_out: torch.Tensor, backward: bool):
    out = fn(*leaves)
    if backward:
        return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, ()


def _check(name: str, fn, ref, leaves, grad_out, tol: tuple[float, float]) -> None:
    """fn against the float64 ref on batch element 0, forward and every gradient."""
    one = [t[:1].detach().clone().requires_grad_() for t in leaves]
    out, grads = _run(fn, one, grad_out[:1], True)
    ones64 = [t.double().detach().requires_grad_() for t in one]
    want, want_grads = _run(ref, ones64, grad_out[:1].double(), True)
    for what, a, b, t in [("out", out, want, tol[0])] + [
        (f"grad {k}", g, r, tol[1]) for k, (g, r) in enumerate(zip(grads, want_grads))
    ]:
        err = ((a.double() - b).norm() / b.norm()).item()
        if not err <= t:
            raise CorrectnessError(f"{name}: {what} relative L2 error {err:.2e} > {t:.0e} for {tuple(leaves[0].shape)}")


def run(shapes: list[tuple[str, Shape]], dtypes: list[torch.dtype], timer: Timer) -> list[dict]:
    """Rows {shape, dtype, op, pass, impl, median_us}; ours is not timed under the interpreter."""
    device = timer.device
    rows = []
    for (label, shape), dtype in ((s, d) for s in shapes for d in dtypes):
        src, flow, metric, grad_out = _inputs(shape, dtype, device)
        tol_ours = TOLERANCES[dtype]
        tol_base = (max(tol_ours[0], BASELINE_TOL[0]), max(tol_ours[1], BASELINE_TOL[1]))
        cases = {
            "flow_warp": (
                {"ours": lambda s, f: tcae_kernels.flow_warp(s, f), "gs-raft": raft_warp},
                lambda s, f: tcae_kernels.warp_naive(s, -f),
                [src, flow],
            ),
            "splat-softmax": (
                {"ours": lambda s, f, m: tcae_kernels.splat(s, f, "softmax", m),
                 "index_add": index_add_softmax_splat},
                lambda s, f, m: tcae_kernels.splat_naive(s, f, "softmax", m),
                [src, flow, metric],
            ),
        }
        for op, (impls, ref, leaves) in cases.items():
            for impl, fn in impls.items():
                _check(f"{op} {impl}", fn, ref, leaves, grad_out, tol_ours if impl == "ours" else tol_base)
                if impl == "ours" and device.type == "cpu" and INTERPRET:
                    continue  # the interpreter is a correctness tool, never a timing
                for backward in (False, True):
                    lv = [t.detach().requires_grad_(backward) for t in leaves]
                    us = timer.median_us(lambda fn=fn, lv=lv, g=grad_out, backward=backward: _run(fn, lv, g, backward))
                    rows.append({"shape": label, "dtype": str(dtype).removeprefix("torch."), "op": op,
                                 "pass": "fwd+bwd" if backward else "fwd", "impl": impl, "median_us": us})
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per (shape, dtype, op, pass): ours µs, the baseline's µs and baseline / ours."""
    lines = ["| shape | dtype | op | pass | ours µs | baseline | baseline µs | × |", "|" + "---|" * 8]
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["op"], r["pass"]), {})[r["impl"]] = r["median_us"]
    for key, by in groups.items():
        base = next(i for i in by if i != "ours") if any(i != "ours" for i in by) else None
        ours = by.get("ours")
        ratio = f"{by[base] / ours:.2f}" if ours and base else "n/a"
        lines.append("| " + " | ".join([*key, f"{ours:.1f}" if ours else "checked only", base or "",
                                         f"{by[base]:.1f}" if base else "", ratio]) + " |")
    return "\n".join(lines)
