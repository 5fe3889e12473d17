"""``python -m bench``: how fast the warp is, next to its baselines, in one run (BENCH.md)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

from tcae_kernels.ops.launch import INTERPRET

from . import flow, plot, sweep
from .harness import (
    DTYPES,
    FIELDS,
    LAYOUTS,
    OPS,
    QUICK_SHAPES,
    SHAPES,
    Timer,
    copy_bandwidth,
    machine_info,
    parse_shape,
)
from .impls import BASELINE_TOL, IMPLS, OURS, SPEC_TOL, CorrectnessError

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time tcae_kernels.warp against the grid_sample path, grid_sample alone and "
        "warp_naive, after checking each against warp_naive in float64.",
    )
    p.add_argument("--shapes", nargs="+", metavar="S",
                   help=f"names ({', '.join([*SHAPES, *QUICK_SHAPES])}) or BxCxHxW; default: all on CUDA, "
                   "the small quick ones on CPU (name shapes to force big ones there)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--fields", nargs="+", choices=FIELDS, default=list(FIELDS))
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=list(IMPLS),
                   help="default: ours gs-path gs-kernel naive on CUDA; cpu (with numba) fallback gs-path gs-kernel "
                   "naive on CPU, plus ours checked (not timed) under TRITON_INTERPRET=1")
    p.add_argument("--padding", choices=("zeros", "border"), default="border", help="default: TCAE's")
    p.add_argument("--out", type=Path, help="output folder; default bench/results on CUDA, a temp folder on CPU")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings: exercises the harness")
    p.add_argument("--rep-ms", type=float, help="timing budget per measurement, ms (default 25; quick 5)")
    p.add_argument("--no-flow-ops", action="store_true",
                   help="skip flow_warp vs the RAFT grid_sample path and splat vs an index_add_ splat")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads while timing (default 1: shared CI cores stall multi-threaded ops)")
    args = p.parse_args(argv)
    try:
        args.shapes = [parse_shape(s) for s in args.shapes or []]
    except ValueError as e:
        p.error(str(e))
    return args


def select_impls(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """(timed, checked only). The interpreter is a correctness tool, never a timing."""
    if args.impls:
        impls = list(dict.fromkeys(args.impls))
    elif device.type == "cuda":
        impls = ["ours", "gs-path", "gs-kernel", "naive"]
    else:
        # Without the interpreter "ours" on CPU *is* the compiled CPU path (or the fallback): time each once.
        compiled = ["cpu"] if "cpu" in IMPLS else []
        impls = [*compiled, "fallback", "gs-path", "gs-kernel", "naive"] + (["ours"] if INTERPRET else [])
    check_only = ["ours"] if device.type == "cpu" and INTERPRET and "ours" in impls else []
    timed = [i for i in impls if i not in check_only]
    if not timed:
        raise SystemExit("bench: nothing to time (under the interpreter 'ours' is checked only); add --impls")
    return timed, check_only


def select_cases(args: argparse.Namespace, device: torch.device) -> list[sweep.Case]:
    if args.shapes:
        shapes = args.shapes
    elif args.quick or device.type == "cpu":
        if not args.quick:
            print("bench: no CUDA device: small shapes only (name --shapes to force)", file=sys.stderr)
        shapes = [parse_shape(s) for s in QUICK_SHAPES]
    else:
        shapes = [parse_shape(s) for s in SHAPES]
    return [sweep.Case(*shape, *rest) for shape, *rest in itertools.product(shapes, args.dtypes, args.layouts, args.fields)]


def flow_shapes(args: argparse.Namespace, device: torch.device) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The flow ops' shapes: those named, else frame interpolation and features (small ones on CPU)."""
    if args.shapes:
        return args.shapes
    table = flow.QUICK_SHAPES if args.quick or device.type == "cpu" else flow.SHAPES
    return [(f"{k} {'x'.join(map(str, v))}", v) for k, v in table.items()]


def _fmt(v: float | None) -> str:
    """Three significant digits, no exponent."""
    if v is None:
        return "n/a"
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}" if v else "0"


def markdown(rows: list[dict], timed: list[str], primary: str, cuda: bool) -> str:
    """One line per (case, op): the primary's µs, GB/s, % of roofline; each baseline's µs and ×."""
    mem = ["MiB"] if cuda else []
    head = ["shape", "dtype", "layout", "field", "op", f"{primary} µs", "GB/s", "% roof", *mem]
    for impl in timed:
        if impl != primary:
            head += [f"{impl} µs", "×", *mem]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = lambda r: (r["shape"], r["dtype"], r["layout"], r["field"], r["op"])  # noqa: E731
    for k, group in itertools.groupby(rows, key):
        by = {r["impl"]: r for r in group}
        p = by[primary]
        pct = p.get("roofline") and 100 * p["roofline"]
        cells = [*k, _fmt(p.get("median_us")), _fmt(p.get("gbps")), _fmt(pct), *([_fmt(p.get("peak_mib"))] if cuda else [])]
        for impl in timed:
            if impl == primary:
                continue
            r = by[impl]
            if "skipped" in r:
                cells += ["skipped", "", *([""] if cuda else [])]
            else:
                cells += [_fmt(r["median_us"]), _fmt(r["speedup"])]
                cells += [_fmt(r["peak_mib"])] if cuda else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(info: dict, copy_gbps: float, primary: str, check_only: list[str], padding: str) -> list[str]:
    """What the table's numbers mean, printed under it."""
    lines = [
        f"{info['gpu'] or info['cpu']}, torch {info['torch']}, triton {info['triton']}, "
        f"copy bandwidth {copy_gbps:.0f} GB/s (read + write), padding {padding!r}.",
        f"µs: median; GB/s: SPEC §5 minimum bytes / time; % roof: that over the copy bandwidth; "
        f"×: baseline time / {primary} time (> 1: {primary} is faster).",
        f"Gate vs warp_naive float64 (rel. L2, fwd/grads): {', '.join(OURS)} at SPEC "
        f"({', '.join(f'{n} {SPEC_TOL[t][0]:.0e}/{SPEC_TOL[t][1]:.0e}' for n, t in DTYPES.items())}); "
        f"baselines at least {BASELINE_TOL[0]:.0e}/{BASELINE_TOL[1]:.0e} (float32 grid rounding).",
    ]
    if check_only:
        lines.append(f"{', '.join(check_only)}: Triton interpreter, checked against warp_naive, not timed.")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the table; write JSON, Markdown and PNG to --out."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    impls, check_only = select_impls(args, device)
    primary = next((i for i in ("ours", "cpu", "fallback") if i in impls), impls[0])
    cases = select_cases(args, device)
    rep = args.rep_ms or (5.0 if args.quick else 25.0)
    timer = Timer(device, warmup_ms=rep / 2, rep_ms=rep)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(args.threads)
    try:
        # ≥ 1 GiB on the GPU so the copy streams from HBM, not L2.
        copy_gbps = copy_bandwidth(timer, 2**30 if cuda else 2**24 if args.quick else 2**26)
        rows = sweep.run(cases, impls, check_only, primary, args.ops, timer, copy_gbps, args.padding)
        flow_rows = [] if args.no_flow_ops else flow.run(flow_shapes(args, device), [DTYPES[d] for d in args.dtypes], timer)
        info = machine_info(device)
    except CorrectnessError as e:
        raise SystemExit(f"bench: correctness gate failed, run aborted: {e}") from e
    finally:
        torch.set_num_threads(threads)

    text = markdown(rows, impls, primary, cuda) + "\n\n" + "\n".join(notes(info, copy_gbps, primary, check_only, args.padding))
    if flow_rows:
        text += ("\n\nx + flow ops (flow_warp vs RAFT's grid_sample warp; softmax splat vs an index_add_ splat), "
                 "checked against float64 first; ×: baseline / ours.\n\n" + flow.markdown(flow_rows))
    print(text)
    out_dir = args.out or (RESULTS if cuda else Path(tempfile.gettempdir()) / "tcae-bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{info['date'][:10]}_{re.sub(r'[^A-Za-z0-9.]+', '-', info['gpu'] or 'cpu')}" + ("_quick" if args.quick else "")
    result = {
        "machine": info, "copy_gbps": copy_gbps, "primary": primary, "check_only": check_only,
        "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "flow_rows": flow_rows,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(text + "\n")
    wrote = [f"{stem}.json", f"{stem}.md"] + ([f"{stem}.png"] if plot.plot(rows, primary, out_dir / f"{stem}.png") else [])
    print(f"\nwrote {', '.join(wrote)} in {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
