"""``python -m bench.fused``: TCAE's fused ops against the unfused sequences they replace.

- merged: ``merged_warp(src, δa, δb, la, lb)`` vs ``warp(src, merge_displacements(δa, δb, la, lb))``
- l1: ``warp_l1(src, δ, target)`` vs ``(warp(src, δ) − target).abs().mean((1, 2, 3))``

Both sides are timed forward+backward, with the gradients of every input but
src (TCAE detaches src). Before timing, the fused op's gradients are checked
against the unfused sequence run in float64; a mismatch aborts.

The table goes to stdout; a progress line per case (what runs, the time so
far) goes to stderr: on a CPU the default shape takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tcae_kernels import merge_displacements, merged_warp, warp, warp_l1
from tcae_kernels.testing import TOLERANCES

from .harness import DTYPES, SHAPES, Timer, machine_info, make_inputs, parse_shape

TOL = {dtype: TOLERANCES[dtype][1] for dtype in (torch.float32, torch.bfloat16)}  # SPEC's gradient tolerances
LEAVES = {"merged": ("disp", "other", "la", "lb"), "l1": ("disp",)}


def _problem(src: torch.Tensor, disp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything both ops read: a second displacement (pixels), two logits, a target, loss weights."""
    gen = torch.Generator(device=disp.device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=disp.device)

    b, c, h, w = src.shape[0], src.shape[1], *disp.shape[2:]
    return dict(src=src, disp=disp, other=randn(b, 2, h, w) * 3, la=randn(b, 1, h, w), lb=randn(b, 1, h, w),
                target=randn(b, c, h, w).to(src.dtype), weights=randn(b, c, h, w))


def _loss(op: str, fused: bool, x: dict[str, torch.Tensor], padding: str) -> torch.Tensor:
    src, wide = x["src"], x["weights"].dtype
    if op == "merged":
        fields = [x[k] for k in LEAVES["merged"]]
        out = merged_warp(src, *fields, padding=padding) if fused else warp(src, merge_displacements(*fields), padding)
        return (out.to(wide) * x["weights"]).sum()
    if fused:
        return warp_l1(src, x["disp"], x["target"], padding=padding).sum()
    return (warp(src, x["disp"], padding).to(wide) - x["target"].to(wide)).abs().flatten(1).mean(1).sum()


def _grads(op: str, fused: bool, x: dict[str, torch.Tensor], padding: str) -> list[torch.Tensor]:
    """Gradients w.r.t. the op's per-pixel inputs (src is detached, as in TCAE)."""
    x = {k: v.detach().requires_grad_(k in LEAVES[op]) for k, v in x.items()}
    return list(torch.autograd.grad(_loss(op, fused, x, padding), [x[k] for k in LEAVES[op]]))


def _error(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((a.double() - r).norm() / r.norm()).item() for a, r in zip(grads, ref))


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(prog="python -m bench.fused", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["train"], help=f"names ({', '.join(SHAPES)}) or BxCxHxW")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--padding", choices=("zeros", "border"), default="border")
    p.add_argument("--rep-ms", type=float, default=25.0)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(device, warmup_ms=args.rep_ms / 2, rep_ms=args.rep_ms)
    rows = []
    shapes = [parse_shape(s) for s in args.shapes]
    cases, start = len(shapes) * len(args.dtypes) * len(LEAVES), time.perf_counter()
    print(f"bench.fused: {cases} cases on {device}, each checked against float64, then timed",
          file=sys.stderr, flush=True)
    print("| op | shape | dtype | fused µs | unfused µs | speed-up | fused error | unfused error |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for label, shape in shapes:
        for dtype_name in args.dtypes:
            src, disp, _ = make_inputs(shape, DTYPES[dtype_name], "nchw", "smooth", device)
            x = _problem(src, disp)
            for op in LEAVES:
                print(f"[{len(rows) + 1}/{cases}] {op} {label} {dtype_name}: checking and timing "
                      f"({time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)
                # The gate: both sides against the unfused sequence in float64.
                ref = _grads(op, False, {k: v.double() for k, v in x.items()}, args.padding)
                fused_err = _error(_grads(op, True, x, args.padding), ref)
                unfused_err = _error(_grads(op, False, x, args.padding), ref)
                if not fused_err <= TOL[src.dtype]:  # NaN fails too
                    raise SystemExit(f"{op} {label} {dtype_name}: fused gradient error {fused_err:.2e} "
                                     f"> {TOL[src.dtype]:.0e} against the float64 unfused sequence")
                fused_us = timer.median_us(lambda: _grads(op, True, x, args.padding))
                unfused_us = timer.median_us(lambda: _grads(op, False, x, args.padding))
                rows.append(dict(op=op, shape=label, dtype=dtype_name, fused_us=fused_us, unfused_us=unfused_us,
                                 speedup=unfused_us / fused_us, fused_error=fused_err, unfused_error=unfused_err))
                print(f"| {op} | {label} | {dtype_name} | {fused_us:.0f} | {unfused_us:.0f} | "
                      f"{unfused_us / fused_us:.2f}× | {fused_err:.1e} | {unfused_err:.1e} |", flush=True)
    print(f"bench.fused: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(device), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
