"""A static profile of the kernels, compiled for sm_90 (H100/H200) on any machine.

    python -m bench.static                      # the table
    python -m bench.static --json FILE          # and one record per kernel specialisation

For every kernel the launchers produce at the benchmark's shapes, it reports
what the compiled code implies: registers, spills, shared memory, theoretical
occupancy, global load/store widths, atomics, integer divisions, barriers, and
SASS warp-instructions per output pixel: the kernel compiled with the
channel count fixed at two channel tiles, whose loop body is one tile, counted
with that body run once per tile of the real channel count (ptxas may unroll
the runtime loop differently); times warps per program, over pixels per
program. From that the issue-time floor (every
warp-instruction issued once, by 132 SMs × 4 schedulers at 1.98 GHz) is set
beside the DRAM floor (SPEC section 5's minimum bytes at 4.8 TB/s): a kernel
whose issue floor exceeds its DRAM floor cannot reach the roofline, whatever
the memory system does. These are estimates; a GPU run decides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import compile as aot

NVIDIA_BIN = os.path.join(os.path.dirname(aot.triton.__file__), "backends", "nvidia", "bin")
# sm_90 per SM; H200 as a whole.
SM_REGS, SM_THREADS, SM_BLOCKS, SM_SHARED = 65536, 2048, 32, 228 * 1024
SMS, SCHEDULERS, CLOCK_HZ, DRAM_BPS = 132, 4, 1.98e9, 4.8e12

# name: (B, C, H, W) as in bench's sweep.
SHAPES = {"train": (64, 3, 256, 256), "feat64": (32, 64, 128, 128)}
# (B, C, D, H, W) as in bench.volumes: a brain MRI and 3-D feature maps.
SHAPES_3D = {"brain": (1, 1, 160, 192, 224), "feat3d": (2, 16, 96, 96, 96)}
DTYPES = ("float32", "bfloat16", "bfloat16+f32disp")
# (op, direction, needs, deterministic, label)
VARIANTS = [
    ("warp", "fwd", None, False, "fwd"),
    ("warp", "bwd", (False, True), False, "bwd-disp"),
    ("warp", "bwd", (True, True), False, "bwd-both"),
    ("warp", "bwd", (True, True), True, "bwd-both-det"),
    ("merged_warp", "fwd", None, False, "fwd"),
    ("merged_warp", "bwd", (False, True), False, "bwd-fields"),
    ("merged_warp", "bwd", (True, True), False, "bwd-both"),
    ("warp_l1", "fwd", None, False, "fwd"),
    ("warp_l1", "bwd", (False, True, False), False, "bwd-disp"),
    ("warp_l1", "bwd", (True, True, True), False, "bwd-all"),
    ("warp3d", "fwd", None, False, "fwd"),
    ("warp3d", "bwd", (False, True), False, "bwd-disp"),
    ("warp3d", "bwd", (True, True), False, "bwd-both"),
    ("warp3d", "bwd", (True, True), True, "bwd-both-det"),
    ("flow_warp", "fwd", (False,), False, "fwd"),
    ("flow_warp", "fwd", (True,), False, "fwd-mask"),
    ("flow_warp", "bwd", (True, True, True), False, "bwd-both-mask"),
    ("splat", "fwd", ("sum",), False, "fwd-sum"),
    ("splat", "fwd", ("softmax",), False, "fwd-softmax"),
    ("splat", "fwd", ("softmax",), True, "fwd-softmax-det"),
    ("splat", "bwd", ("softmax", True, True, True), False, "bwd-all"),
]

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def min_bytes(op: str, direction: str, needs, shape, s: int, d: int) -> int:
    """SPEC section 5's minimum bytes, extended to the fused ops' extra fields and to volumes."""
    c = shape[1]
    n = m = math.prod(shape) // c  # the benchmark warps an image (volume) onto a grid of its own size
    if op == "splat":
        metric = n * d if needs[0] in ("linear", "softmax") else 0
        if direction == "fwd":  # src, flow, metric read; out written (the accumulators are scratch)
            return m * c * s + 2 * n * d + metric + n * c * s
        # ∂L/∂out read (as ∂L/∂num) and src, flow, metric; each gradient asked for written once.
        need_src, need_flow, need_metric = needs[1:]
        return (n * c * s + m * c * s + 2 * n * d + metric + need_src * m * c * s + need_flow * 2 * n * d
                + need_metric * metric)
    if op == "flow_warp":
        mask = needs[-1] * n * s  # the mask written, or its gradient read
        if direction == "fwd":
            return 2 * n * d + m * c * s + n * c * s + mask
        return min_bytes("warp", direction, needs[:2], shape, s, d) + mask
    # δ (2 channels; 3 for volumes), or δ_a, δ_b and two logits
    fields = {"merged_warp": 6, "warp3d": 3}.get(op, 2)
    if direction == "fwd":
        return fields * n * d + m * c * s + n * c * s  # warp_l1: target read instead of out written
    need_src, need_disp = needs[0], needs[1]
    total = n * c * s + fields * n * d  # ∂L/∂out (warp_l1: target) and the fields, read
    if need_disp or op == "warp_l1":
        total += m * c * s  # src read at the neighbours (warp_l1 needs out − target's sign)
    if need_disp:
        total += fields * n * d
    if need_src:
        total += m * c * s
    if op == "warp_l1" and len(needs) > 2 and needs[2]:
        total += n * c * s
    return total


def _run(tool: str, *args: str) -> str:
    return subprocess.run([os.path.join(NVIDIA_BIN, tool), *args], capture_output=True, text=True, check=True).stdout


def sass_profile(cubin: bytes) -> dict:
    """Parse cuobjdump's SASS: instructions with addresses, loops, memory operations."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = _run("cuobjdump", "-sass", f.name)
        usage = _run("cuobjdump", "-res-usage", f.name)
    instrs = []
    for addr, text in _SASS_LINE.findall(sass):
        op = text.split()[1] if text.startswith("@") else text.split()[0]
        instrs.append((int(addr, 16), op, text))
    # Drop the trailing self-branch and NOP padding after the last EXIT.
    while instrs and (instrs[-1][1] == "NOP" or (instrs[-1][1] == "BRA" and _target(instrs[-1]) == instrs[-1][0])):
        instrs.pop()
    loops = []
    for i, ins in enumerate(instrs):
        target = _target(ins)
        if target is not None and target < ins[0]:
            start = next(k for k, other in enumerate(instrs) if other[0] >= target)
            loops.append((start, i))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ops = [op for _, op, _ in instrs]

    def count(prefix: str) -> dict:
        out: dict[str, int] = {}
        for op in ops:
            if op.startswith(prefix):
                out[op] = out.get(op, 0) + 1
        return out

    return {
        "instrs": instrs,
        "loops": loops,
        "regs": regs,
        "spill_bytes": local,
        "loads": count("LDG"),
        "stores": count("STG"),
        "atomics": {**count("RED"), **count("ATOM")},
        "barriers": sum(op.startswith("BAR") for op in ops),
        "shared_ops": sum(op.startswith(("LDS", "STS")) for op in ops),
    }


def _target(ins) -> int | None:
    if ins[1] != "BRA":
        return None
    m = _BRANCH.search(ins[2])
    return int(m.group(1), 16) if m else None


def occupancy(regs: int, num_warps: int, shared: int) -> float:
    """Theoretical occupancy on sm_90: resident warps / 64."""
    threads = num_warps * 32
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = SM_REGS // (regs_per_warp * num_warps) if regs else SM_BLOCKS
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_BLOCKS
    blocks = min(SM_BLOCKS, SM_THREADS // threads, by_regs, by_shared)
    return blocks * threads / SM_THREADS


def int_divisions(ptx: str) -> int:
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:div|rem)\.[su](?:32|64)\b", ptx, flags=re.M))


def profile(op, direction, needs, det, label, shape_name, dtype, layout) -> list[dict]:
    """One record per kernel the launcher runs for this case (one, for every op here)."""
    shape = {**SHAPES, **SHAPES_3D}[shape_name]
    case = {"variant": (op, direction, needs, det), "dtype": dtype, "layout": layout, "padding": "zeros",
            "idx64": False, "shape": shape}
    records = []
    for launch in aot.run_launchers(case):
        src_dtype, disp_dtype = aot.DTYPES[dtype]
        c = shape[1]
        rec = {"op": op, "variant": label, "kernel": launch.name, "dtype": dtype, "layout": layout,
               "shape": "x".join(map(str, shape)), "C": c}
        try:
            ck = aot.compile_launch(launch, aot.TARGETS["sm_90"])
        except Exception as exc:  # noqa: BLE001 — reported in the table and the JSON
            rec.update(compiled=False, error=str(exc).splitlines()[-1][:300])
            records.append(rec)
            continue
        prof = sass_profile(ck.asm["cubin"])
        meta = launch.kwargs
        num_warps = meta["num_warps"]
        block_x, block_c = meta["BLOCK_X"], meta["BLOCK_C"]
        trips = math.ceil(c / block_c)
        one, two = (sass_profile(aot.compile_launch(launch, aot.TARGETS["sm_90"], {"C": k * block_c}).asm["cubin"])
                    for k in (1, 2))
        if len(two["loops"]) == 1:
            # Two tiles compile to a loop whose body is one tile: that body, trips times.
            start, end = two["loops"][0]
            per_tile = end - start + 1
            executed = len(two["instrs"]) + (trips - 2) * per_tile
        else:
            # Fully unrolled: the second tile's cost is the difference.
            per_tile = len(two["instrs"]) - len(one["instrs"])
            executed = len(one["instrs"]) + (trips - 1) * per_tile
        programs = math.prod(launch.grid)
        pixels = math.prod(shape) // c  # voxels for volumes
        warp_instr = programs * num_warps * executed
        nbytes = min_bytes(op, direction, needs, shape, src_dtype.itemsize, disp_dtype.itemsize)
        rec.update(
            compiled=True,
            regs=prof["regs"],
            spill_bytes=prof["spill_bytes"],
            shared_bytes=ck.metadata.shared,
            num_warps=num_warps,
            block=[block_x, block_c],
            occupancy=occupancy(prof["regs"], num_warps, ck.metadata.shared),
            loads=prof["loads"],
            stores=prof["stores"],
            atomics=prof["atomics"],
            int_divisions=int_divisions(ck.asm["ptx"]),
            barriers=prof["barriers"],
            shared_ops=prof["shared_ops"],
            sass_static=len(prof["instrs"]),
            instr_per_tile=per_tile,
            tiles=trips,
            warp_instr_per_pixel=warp_instr / pixels,
            t_issue_us=warp_instr / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6,
            t_dram_us=nbytes / DRAM_BPS * 1e6,
            min_bytes=nbytes,
        )
        records.append(rec)
    return records


def _widths(counts: dict) -> str:
    return " ".join(f"{k.split('.', 1)[1] if '.' in k else k}×{v}" for k, v in sorted(counts.items())) or "-"


def table(records: list[dict]) -> str:
    head = ("| op | variant | kernel | dtype | layout | shape | regs | spill | smem | occ | warps×tile | loads | "
            "stores | atomics | div | bar | instr/px | issue µs | DRAM µs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if not r["compiled"]:
            lines.append(f"| {r['op']} | {r['variant']} | {r['kernel']} | {r['dtype']} | {r['layout']} | "
                         f"{r['shape']} | FAILED: {r['error']} |")
            continue
        lines.append(
            f"| {r['op']} | {r['variant']} | {r['kernel']} | {r['dtype']} | {r['layout']} | {r['shape']} | "
            f"{r['regs']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['occupancy']:.0%} | "
            f"{r['num_warps']}×{r['block'][0]}×{r['block'][1]} | {_widths(r['loads'])} | {_widths(r['stores'])} | "
            f"{_widths(r['atomics'])} | {r['int_divisions']} | {r['barriers']} | {r['warp_instr_per_pixel']:.2f} | "
            f"{r['t_issue_us']:.1f} | {r['t_dram_us']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Static profile of the kernels compiled for sm_90 (no GPU needed)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ops", nargs="+", default=sorted({v[0] for v in VARIANTS}))
    args = parser.parse_args(argv)
    records = []
    for op, direction, needs, det, label in VARIANTS:
        if op not in args.ops:
            continue
        for shape_name in SHAPES_3D if op == "warp3d" else args.shapes:
            for dtype in DTYPES:
                for layout in aot.LAYOUTS:
                    records += profile(op, direction, needs, det, label, shape_name, dtype, layout)
    print("Static estimate (sm_90, H200 clocks and bandwidth); not a measurement.\n")
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90", "triton": aot.triton.__version__, "torch": torch.__version__,
                       "records": records}, f, indent=1)
    return 0 if all(r["compiled"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
