"""``python -m bench.volumes``: the 3-D warp and velocity integration next to VoxelMorph's way.

Compared, on the same inputs, each checked before it is timed:

- ``ours``: ``flow_warp3d(src, flow)`` (fused Triton kernels on CUDA, the
  compiled numba loops on CPU) and ``integrate_velocity`` built on it;
- ``eager`` (CPU only): the same op through its PyTorch fallback;
- ``vm``: VoxelMorph's ``SpatialTransformer`` (grid buffer + flow, normalised,
  permuted, ``grid_sample(align_corners=True)``) and ``VecInt`` (7 squarings
  of it). For bfloat16 it samples a float32 copy of src, as autocast runs
  grid_sample in float32.

Ops: ``fwd`` (warp), ``fwdbwd-flow`` (warp + backward, only the flow needs
grad: registration), ``fwdbwd-both`` (src too: features), ``int-fwd`` and
``int-fwdbwd`` (integrate_velocity, 7 steps). Minimum bytes (SPEC section 5 in
3-D, N output voxels, M source voxels, s and d bytes per src and flow element):
forward 3N·d + M·C·s + N·C·s; backward of the flow N·C·s + M·C·s + 3N·d + 3N·d,
plus M·C·s when src's gradient is written; integration at least 6N·d per step
(δ read and written once; our steps are unfused, so this bound is loose).
Roofline time = bytes / copy bandwidth measured in the same run.

    python -m bench.volumes                    # GPU: brain and features, fp32 and bf16
    python -m bench.volumes --json FILE        # and the records
    TRITON_INTERPRET unset; on CPU small shapes and 1 thread unless --threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from tcae_kernels import flow_warp3d, integrate_velocity
from tcae_kernels.ops.launch import INTERPRET, OPS, implementation
from tcae_kernels.testing import rel_err

from .harness import Timer, copy_bandwidth, machine_info

GPU_SHAPES = {"brain": (1, 1, 160, 192, 224), "feat": (2, 16, 96, 96, 96)}
CPU_SHAPES = {"small-brain": (1, 1, 48, 56, 64), "small-feat": (1, 8, 32, 32, 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPS_TIMED = ("fwd", "fwdbwd-flow", "fwdbwd-both", "int-fwd", "int-fwdbwd")
FLOW_VOX = 3.0  # flow scale, voxels
STEPS = 7


def make_inputs(shape, dtype, device, seed=0):
    """(src, flow in our channel order (x, y, z), grad_out): flow float32, smooth, a few voxels."""
    torch.manual_seed(seed)
    b, _, d, h, w = shape
    src = torch.randn(shape, device=device).to(dtype)
    coarse = torch.randn(b, 3, max(d // 16, 2), max(h // 16, 2), max(w // 16, 2), device=device)
    flow = F.interpolate(coarse, size=(d, h, w), mode="trilinear", align_corners=False) * FLOW_VOX
    return src, flow, torch.randn(shape, device=device).to(dtype)


class SpatialTransformer(torch.nn.Module):
    """VoxelMorph's (voxelmorph/torch/layers.py): sample src at grid + flow, flow channels (D, H, W)."""

    def __init__(self, size):
        super().__init__()
        vectors = [torch.arange(0, s) for s in size]
        grid = torch.stack(torch.meshgrid(vectors, indexing="ij")).unsqueeze(0).float()
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, src, flow):
        new_locs = self.grid + flow
        shape = flow.shape[2:]
        for i in range(len(shape)):
            new_locs[:, i, ...] = 2 * (new_locs[:, i, ...] / (shape[i] - 1) - 0.5)
        new_locs = new_locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        # autocast runs grid_sample in float32: a bfloat16 src is sampled as float32.
        return F.grid_sample(src.float(), new_locs, align_corners=True, mode="bilinear").to(src.dtype)


class VecInt(torch.nn.Module):
    """VoxelMorph's scaling and squaring (x + flow)."""

    def __init__(self, size, steps=STEPS):
        super().__init__()
        self.scale = 1.0 / 2**steps
        self.steps = steps
        self.transformer = SpatialTransformer(size)

    def forward(self, vec):
        vec = vec * self.scale
        for _ in range(self.steps):
            vec = vec + self.transformer(vec, vec)
        return vec


def min_bytes(op: str, shape, s: int, d: int) -> int:
    b, c, dd, h, w = shape
    n = m = b * dd * h * w
    fwd = 3 * n * d + m * c * s + n * c * s
    if op == "fwd":
        return fwd
    if op.startswith("fwdbwd"):
        bwd = n * c * s + m * c * s + 6 * n * d + (m * c * s if op.endswith("both") else 0)
        return fwd + bwd
    per_step = 6 * n * d
    return STEPS * per_step * (2 if op == "int-fwdbwd" else 1)


def _eager():
    """A context running the ops through their PyTorch fallback on CPU."""
    import contextlib

    stack = contextlib.ExitStack()
    for op in OPS.values():
        stack.enter_context(op.set_kernel_enabled("cpu", False))
    return stack


def runners(impl: str, src, flow, grad_out, op: str, transformer, vecint) -> Callable[[], object]:
    """A callable doing op with impl on these inputs (gradients to fresh leaves each call)."""
    need_src = op == "fwdbwd-both"
    s = src.detach().requires_grad_(need_src)
    f = flow.detach().requires_grad_(op in ("fwdbwd-flow", "fwdbwd-both", "int-fwdbwd"))
    # VoxelMorph's channels are in axis order (D, H, W); ours along (W, H, D).
    f_vm = flow.detach().flip(1).contiguous().requires_grad_(f.requires_grad)
    if op.startswith("int"):
        if impl == "vm":
            fn = lambda: vecint(f_vm)  # noqa: E731
        else:
            # x − δ integration of −flow is −(the x + flow integration of flow).
            fn = lambda: integrate_velocity(f)  # noqa: E731
        grad = torch.randn_like(flow)
    else:
        if impl == "vm":
            fn = lambda: transformer(s, f_vm)  # noqa: E731
        else:
            fn = lambda: flow_warp3d(s, f)  # noqa: E731
        grad = grad_out
    if op in ("fwd", "int-fwd"):
        return lambda: fn()
    inputs = [t for t in ((s, f_vm) if impl == "vm" else (s, f)) if t.requires_grad]
    return lambda: torch.autograd.grad(fn(), inputs, grad)


def check(src, flow, transformer, vecint, dtype) -> dict:
    """ours vs VoxelMorph's path on the same inputs (relative L2), warp and integration."""
    ours = flow_warp3d(src, flow)
    theirs = transformer(src, flow.flip(1).contiguous())
    # VoxelMorph's float32 grid normalisation rounds positions by ~1e-7·size voxels (bench/impls.py's
    # BASELINE_TOL); bfloat16 by SPEC's gradient tolerance (VoxelMorph samples a float32 copy).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    errs = {"warp": rel_err(ours, theirs), "integrate": rel_err(integrate_velocity(-flow),
                                                                -vecint(flow.flip(1).contiguous()).flip(1))}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    if bad:
        raise SystemExit(f"ours and VoxelMorph's path disagree ({bad}, tolerance {tol}): not timing")
    return errs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.volumes", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", metavar="BxCxDxHxW", help="default: brain and feat on CUDA, small on CPU")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--ops", nargs="+", choices=OPS_TIMED, default=list(OPS_TIMED))
    p.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per measurement, ms")
    p.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1)")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    if INTERPRET:
        raise SystemExit("TRITON_INTERPRET=1 is a correctness tool, never a timing: unset it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shapes:
        shapes = {s: tuple(int(v) for v in s.lower().split("x")) for s in args.shapes}
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    impls = ["ours", "vm"] + (["eager"] if device.type == "cpu" else [])
    timer = Timer(device, warmup_ms=25, rep_ms=args.rep_ms)
    info = machine_info(device)
    info["ours"] = implementation(device)
    bw = copy_bandwidth(timer, 1 << 30 if device.type == "cuda" else 1 << 26)
    print(f"{info['gpu'] or info['cpu']}, {info['ours']}; copy bandwidth {bw:.0f} GB/s", flush=True)
    records = []
    for label, shape in shapes.items():
        size = shape[2:]
        transformer = SpatialTransformer(size).to(device)
        vecint = VecInt(size).to(device)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            src, flow, grad_out = make_inputs(shape, dtype, device)
            errs = check(src, flow, transformer, vecint, dtype)
            print(f"{label} {'x'.join(map(str, shape))} {dname}: ours vs VoxelMorph rel. L2 "
                  f"warp {errs['warp']:.1e}, integrate {errs['integrate']:.1e}", flush=True)
            for op in args.ops:
                nbytes = min_bytes(op, shape, src.element_size(), flow.element_size())
                roof_us = nbytes / bw / 1e3
                row = {}
                for impl in impls:
                    fn = runners(impl, src, flow, grad_out, op, transformer, vecint)
                    if impl == "eager":
                        with _eager():
                            us = timer.median_us(fn)
                            mib = None
                    else:
                        us = timer.median_us(fn)
                        mib = timer.peak_mib(fn)
                    row[impl] = us
                    records.append({"shape": label, "dims": list(shape), "dtype": dname, "op": op, "impl": impl,
                                    "median_us": us, "min_bytes": nbytes, "roofline_us": roof_us,
                                    "pct_roofline": 100 * roof_us / us, "peak_mib": mib})
                    print(f"  {op:12s} {impl:6s} {us / 1e3:9.3f} ms  {100 * roof_us / us:5.1f} % of roofline"
                          + (f"  peak {mib:8.1f} MiB" if mib is not None else ""), flush=True)
                print(f"  {op:12s} vm / ours = {row['vm'] / row['ours']:.2f}x"
                      + (f", eager / ours = {row['eager'] / row['ours']:.2f}x" if "eager" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "copy_gbps": bw, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
