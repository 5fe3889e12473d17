"""Compile every kernel specialisation the launchers produce, for real GPUs, without one.

The launchers run on CPU tensors with ``JITFunction.run`` replaced by a
recorder, so what is compiled is exactly what a GPU run would compile: the same
arguments, constexprs and specialisation attributes (alignment, values of 1).
Each recorded launch is then compiled ahead of time with ``triton.compile``
for NVIDIA sm_80 (A100), sm_90 (H100/H200), sm_100 (B200) and AMD gfx942
(MI300, warp size 64).

    python -m bench.compile            # an all-pairs covering set (what CI runs)
    python -m bench.compile --all      # the full product of every factor
    python -m bench.compile --all --targets sm_90 --json FILE

Must run with ``TRITON_INTERPRET`` unset or 0: the interpreter has no compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("bench.compile compiles for GPUs: run it with TRITON_INTERPRET unset or 0")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "sm_100": GPUTarget("cuda", 100, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}
# CUDA's grid limits (x; y and z).
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# (src dtype, disp dtype): SPEC section 3's pairs.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float64": (torch.float64, torch.float64),
    "float16+f32disp": (torch.float16, torch.float32),
    "bfloat16+f32disp": (torch.bfloat16, torch.float32),
}
LAYOUTS = ("nchw", "channels_last")
PADDINGS = ("zeros", "border")
# (B, C, H, W): aligned sizes (strides divisible by 16), odd ones, and one channel.
SHAPES = {"aligned": (2, 3, 16, 32), "odd": (2, 5, 7, 9), "one_channel": (2, 1, 8, 8)}

# Each op's launch variants: forward, and every backward the autograd rule can ask for.
_BACKWARDS = {
    "warp": [(s, d) for s, d in itertools.product((False, True), repeat=2) if s or d],
    "merged_warp": [(s, f) for s, f in itertools.product((False, True), repeat=2) if s or f],
    "warp_l1": [need for need in itertools.product((False, True), repeat=3) if any(need)],
    "warp3d": [(s, d) for s, d in itertools.product((False, True), repeat=2) if s or d],
}
VARIANTS = [(op, "fwd", None, False) for op in _BACKWARDS] + [
    (op, "bwd", need, det)
    for op, needs in _BACKWARDS.items()
    for need in needs
    for det in ((False, True) if need[0] else (False,))  # deterministic concerns ∂L/∂src only
] + [
    # The x + flow sign is one constexpr of warp3d's kernels: its forward and full backward.
    ("flow_warp3d", "fwd", None, False),
    ("flow_warp3d", "bwd", (True, True), False),
]
# The flow warp: warp's kernels with FLOW and MASK (the validity mask, the last need) on
# together; both off is warp's variants. Kept few: the pairwise set grows by about six
# cases per variant, and CI runs it.
VARIANTS += [("flow_warp", "fwd", (True,), False)] + [
    ("flow_warp", "bwd", (True, True, True), det) for det in (False, True)
]
# Splatting: each metric kind (none, linear, softmax), normalized or not, both accumulations
# forward; the backward (a gather, no atomics) with every gradient it computes.
VARIANTS += [("splat", "fwd", (mode,), det) for mode, det in [("sum", False), ("softmax", True), ("linear", False)]]
VARIANTS += [("splat", "bwd", (mode, *need), False) for mode, need in
             [("softmax", (True, True, True)), ("sum", (True, True, False)), ("linear", (False, True, True))]]
# A volume's depth, for 3-D ops: (B, C, H, W) shapes become (B, C, DEPTH, H, W).
DEPTH = 3


@dataclass
class Launch:
    """One recorded kernel launch and the case that produced it."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    case: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record every Triton launch instead of running it."""
    launches: list[Launch] = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, tuple(grid)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real_run


# Ops whose kernels live in another op's module.
_MODULES = {"flow_warp": "warp", "flow_warp3d": "warp3d"}


def _ops_module(op: str):
    return importlib.import_module(f"tcae_kernels.ops.{_MODULES.get(op, op)}")


@contextlib.contextmanager
def _force_int64(on: bool) -> Iterator[None]:
    """Make the launchers pick 64-bit offsets without tensors past 2**31 elements."""
    if not on:
        yield
        return
    modules = list({_ops_module(v[0]) for v in VARIANTS})
    saved = [m.needs_int64 for m in modules]
    for m in modules:
        m.needs_int64 = lambda *tensors: True
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.needs_int64 = f


def _tensor(shape, dtype, layout="nchw"):
    t = torch.empty(shape, dtype=dtype)
    if layout != "channels_last":
        return t
    return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


def run_launchers(case: dict) -> list[Launch]:
    """Call the op's real launcher for one case on CPU tensors; return what it launched."""
    op, kind, need, det = case["variant"]
    src_dtype, disp_dtype = DTYPES[case["dtype"]]
    b, c, *size = case["shape"]  # (B, C, H, W), or (B, C, D, H, W) for the 3-D ops (the static profile's)
    h, w = size[-2:]
    src = _tensor((b, c, h, w), src_dtype, case["layout"])
    disp = _tensor((b, 2, h, w), disp_dtype)
    out_like = _tensor((b, c, h, w), src_dtype, case["layout"])
    module = _ops_module(op)
    padding = case["padding"]
    with recording() as launches, _force_int64(case["idx64"]):
        if op in ("warp3d", "flow_warp3d"):
            flow = op == "flow_warp3d"
            d = size[0] if len(size) == 3 else DEPTH
            vol = _tensor((b, c, d, h, w), src_dtype, case["layout"])
            field = _tensor((b, 3, d, h, w), disp_dtype)
            if kind == "fwd":
                module._forward(vol, field, padding, flow, False)
            else:
                module._backward(_tensor((b, c, d, h, w), src_dtype, case["layout"]), vol, field, padding,
                                 flow, *need, det)
        elif op == "splat":
            metric = _tensor((b, 1, h, w), disp_dtype) if need[0] in ("linear", "softmax") else src.new_empty(0)
            if kind == "fwd":
                module._forward(src, disp, metric, need[0], det)
            else:
                den = torch.ones((b, 1, h, w), dtype=torch.float64 if src_dtype == torch.float64 else torch.float32)
                module._backward(out_like, src, disp, metric, out_like, den, *need)
        elif op == "flow_warp":
            if kind == "fwd":
                module._variant_forward(src, disp, padding, False, True, need[0])
            else:
                mask_like = _tensor((b, 1, h, w), src_dtype)
                module._variant_backward(out_like, mask_like, src, disp, padding, need[0], need[1], det, True, need[2])
        elif op == "warp":
            if kind == "fwd":
                module._forward(src, disp, padding, False)
            else:
                module._backward(out_like, src, disp, padding, *need, det)
        elif op == "merged_warp":
            fields = (disp, _tensor((b, 2, h, w), disp_dtype), _tensor((b, 1, h, w), disp_dtype),
                      _tensor((b, 1, h, w), disp_dtype))
            if kind == "fwd":
                module._forward(src, *fields, padding, False)
            else:
                module._backward(out_like, src, *fields, padding, *need, det)
        else:
            if kind == "fwd":
                module._forward(src, disp, out_like, padding, False)
            else:
                grad_loss = torch.ones(b, dtype=torch.float64 if src_dtype == torch.float64 else torch.float32)
                module._backward(grad_loss, src, disp, out_like, padding, *need, det)
    for launch in launches:
        launch.case = case
    return launches


def compile_launch(launch: Launch, target: GPUTarget, fixed: dict[str, int] | None = None):
    """Compile one recorded launch for ``target`` exactly as the JIT would on that GPU.

    ``fixed`` turns integer arguments into compile-time constants (the static
    profile fixes the channel count to get straight-line code).
    """
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    for name, value in (fixed or {}).items():
        i = kernel.arg_names.index(name)
        signature[name] = "constexpr"
        constexprs[(i,)] = value
        attrs.pop((i,), None)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


FACTORS = {
    "target": list(TARGETS),
    "variant": VARIANTS,
    "dtype": list(DTYPES),
    "layout": list(LAYOUTS),
    "padding": list(PADDINGS),
    "idx64": [False, True],
    "shape": list(SHAPES.values()),
}


def all_cases() -> list[dict]:
    return [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def pairwise_cases() -> list[dict]:
    """A covering set: every pair of values of any two factors occurs in at least one case.

    Greedy: each new case is the full-product row that covers the most pairs
    not covered yet (ties by product order, so the set is the same every run).
    """
    names = list(FACTORS)
    values = [range(len(v)) for v in FACTORS.values()]
    uncovered = {
        (i, a, j, b_)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in values[i]
        for b_ in values[j]
    }
    rows = list(itertools.product(*values))
    chosen = []
    while uncovered:
        best = max(rows, key=lambda r: sum((i, r[i], j, r[j]) in uncovered
                                           for i, j in itertools.combinations(range(len(r)), 2)))
        chosen.append(best)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
    return [{n: FACTORS[n][k] for n, k in zip(names, row)} for row in chosen]


def check(cases: list[dict], verbose: bool = False) -> list[dict]:
    """Compile every launch of every case; one record per (launch, target), failures included."""
    records = []
    started = time.perf_counter()
    for k, case in enumerate(cases):
        launches = run_launchers(case)
        if not launches:
            raise AssertionError(f"the launcher launched nothing for {case}")
        target = case["target"]
        for launch in launches:
            record = {"kernel": launch.name, "target": target, **_describe(case), "grid": list(launch.grid)}
            record["grid_ok"] = len(launch.grid) <= 3 and all(
                0 < g <= limit for g, limit in zip(launch.grid, GRID_LIMITS))
            try:
                compile_launch(launch, TARGETS[target])
                record["compiled"] = True
            except Exception as exc:  # noqa: BLE001 — every failure is reported, then the run fails
                record["compiled"] = False
                record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
            records.append(record)
            if verbose and not (record["compiled"] and record["grid_ok"]):
                print(f"FAIL {record}", file=sys.stderr)
        if verbose and (k + 1) % 25 == 0:
            print(f"  {k + 1}/{len(cases)} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return records


def _describe(case: dict) -> dict:
    op, kind, need, det = case["variant"]
    return {
        "op": op, "direction": kind, "needs": list(need) if need else None, "deterministic": det,
        "dtype": case["dtype"], "layout": case["layout"], "padding": case["padding"],
        "idx64": case["idx64"], "shape": list(case["shape"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the full product of factors (slow), not the pairwise set")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="with --all: only these targets")
    parser.add_argument("--json", help="write one record per compiled (launch, target)")
    args = parser.parse_args(argv)
    if args.all:
        cases = [dict(c) for c in all_cases() if c["target"] in (args.targets or TARGETS)]
    else:
        cases = pairwise_cases()
    started = time.perf_counter()
    print(f"compiling {len(cases)} cases ({'full product' if args.all else 'all-pairs covering set'}) "
          f"with triton {triton.__version__}", file=sys.stderr)
    records = check(cases, verbose=True)
    failed = [r for r in records if not (r["compiled"] and r["grid_ok"])]
    kernels = sorted({r["kernel"] for r in records})
    print(f"{len(records)} compilations of {len(kernels)} kernels for {sorted({r['target'] for r in records})} "
          f"in {time.perf_counter() - started:.0f} s: {len(failed)} failed")
    for r in failed[:20]:
        print(f"  {r['kernel']} {r['target']} {r['dtype']} {r['layout']} {r['padding']} "
              f"idx64={r['idx64']} grid={r['grid']}: {r.get('error', 'grid past CUDA limits')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
