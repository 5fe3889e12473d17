"""The sweep: for each case, gate every implementation on correctness, then time it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tcae_kernels import implementation

from .harness import DTYPES, OPS, Shape, Timer, make_inputs, min_bytes
from .impls import IMPLS, CorrectnessError, Prepared, check

# warp_naive keeps several full-size temporaries per neighbour; past this many
# src elements it is left out rather than risk the memory or the time budget.
NAIVE_MAX_ELEMENTS = 2**25


@dataclass(frozen=True)
class Case:
    """One input configuration of the sweep."""

    label: str
    shape: Shape
    dtype: str
    layout: str
    field: str


def backend(impl: str, src: torch.Tensor) -> str:
    """What actually runs for ``impl`` on ``src``'s device."""
    if impl == "ours" and implementation(src.device) != "pytorch":
        return "triton" if src.is_cuda else "triton-interpreter"
    return {"ours": "torch-fallback", "fallback": "torch-fallback", "cpu": "numba", "naive": "torch"}.get(
        impl, "grid_sample"
    )


def timed_fn(prep: Prepared, grad_out: torch.Tensor, what: str) -> Callable[[], object]:
    """The callable to time: the forward, the backward alone (graph retained), or both."""
    g = grad_out.to(prep.inputs[0].dtype)  # every implementation returns its first leaf's dtype
    if what == "forward":
        return prep.run
    if what == "backward":
        out = prep.run()
        return lambda: torch.autograd.grad(out, prep.wrt, g, retain_graph=True)
    return lambda: torch.autograd.grad(prep.run(), prep.wrt, g)


def run_case(
    case: Case, impls: list[str], check_only: list[str], primary: str, ops: list[str],
    timer: Timer, copy_gbps: float, padding: str,
) -> list[dict[str, object]]:
    """Rows for one case: one per (op, implementation), checked-only ones included untimed.

    ``speedup`` on a row is its time over ``primary``'s time for the same op.
    """
    src, disp, grad_out = make_inputs(case.shape, DTYPES[case.dtype], case.layout, case.field, timer.device)
    skip = {i: "checked only (Triton interpreter)" for i in check_only}
    if "naive" in impls and src.numel() > NAIVE_MAX_ELEMENTS:
        skip["naive"] = f"naive: src above {NAIVE_MAX_ELEMENTS} elements"
    variants = {OPS[op][:2] for op in ops}
    # The gate: nothing of this case is timed before everything passed. The
    # interpreter is slow: it sees two batch elements (b > 0 indexing included).
    errors: dict[tuple[str, tuple[bool, bool]], dict[str, float]] = {}
    for impl in [i for i in impls if i not in skip] + check_only:
        inputs = (src, disp, grad_out) if impl not in check_only else (src[:2], disp[:2], grad_out[:2])
        for v in variants:
            try:
                errors[impl, v] = check(impl, *inputs, padding, *v)
            except CorrectnessError as e:
                where = f"{case.label} {case.dtype} {case.layout} {case.field} (grad src={v[0]}, disp={v[1]})"
                raise CorrectnessError(f"{where}: {e}") from None
    rows: list[dict[str, object]] = []
    for op in ops:
        need_src, need_disp, what = OPS[op]
        nbytes = min_bytes(op, case.shape, src.dtype, disp.dtype)
        for impl in impls + check_only:
            row: dict[str, object] = {
                "shape": case.label, "dims": list(case.shape), "dtype": case.dtype,
                "layout": case.layout, "field": case.field, "padding": padding, "op": op,
                "impl": impl, "backend": backend(impl, src), "primary": impl == primary,
                "bytes": nbytes, "errors": errors.get((impl, (need_src, need_disp)), {}),
            }
            if impl in skip:
                row["skipped"] = skip[impl]
            else:
                fn = timed_fn(IMPLS[impl](src, disp, padding, need_src, need_disp), grad_out, what)
                us = timer.median_us(fn)
                row.update(
                    median_us=us,
                    gbps=nbytes / us / 1e3,
                    roofline=nbytes / (copy_gbps * 1e3) / us,
                    peak_mib=timer.peak_mib(fn),
                )
                del fn  # frees a retained graph before the next implementation runs
            rows.append(row)
        base = next(r for r in rows if r["op"] == op and r["impl"] == primary)
        for r in rows:
            if r["op"] == op and "median_us" in r and "median_us" in base:
                r["speedup"] = r["median_us"] / base["median_us"]  # > 1: primary is faster
    return rows


def run(
    cases: list[Case], impls: list[str], check_only: list[str], primary: str, ops: list[str],
    timer: Timer, copy_gbps: float, padding: str,
) -> list[dict[str, object]]:
    """All rows of the sweep (see :func:`run_case`), with progress on stderr."""
    rows: list[dict[str, object]] = []
    for k, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        rows += run_case(case, impls, check_only, primary, ops, timer, copy_gbps, padding)
        print(
            f"[{k}/{len(cases)}] {case.label} {case.dtype} {case.layout} {case.field}: "
            f"{time.perf_counter() - t0:.1f} s",
            file=sys.stderr, flush=True,
        )
    return rows
