"""``python -m bench.coldstart``: the first-call latency of each op's compiled CPU kernels.

Each case runs in a fresh Python process with an empty ``NUMBA_CACHE_DIR``, so
numba compiles from nothing, as on a user's first run; its import is counted
in the first forward. Printed per op and dtype: the first forward, then the
first backward (δ or flow alone, and with src's gradient too), in seconds,
then one warm forward+backward in ms. A later process loads the machine code
from the disk cache instead (README, "Using the warp").

    python -m bench.coldstart                  # every op, float32 and bfloat16
    python -m bench.coldstart --ops warp       # one op

Without ``TRITON_INTERPRET`` and with numba installed; one thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

OPS = ("warp", "flow_warp", "merged_warp", "warp_l1", "splat", "warp3d")

# Run in the child: times the first forward, the first backward and a warm fwd+bwd.
CHILD = r"""
import sys, time
import torch
torch.set_num_threads(1)
import tcae_kernels as tk
op, dtype, both = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "both"
if tk.implementation("cpu") != "numba":
    sys.exit(f"the CPU ops run {tk.implementation('cpu')!r}, not the compiled kernels (numba)")
g = torch.Generator().manual_seed(0)
size = (2, 3, 16, 16, 16) if op == "warp3d" else (16, 3, 64, 64)
field = (size[0], len(size) - 2, *size[2:])
src = torch.rand(size, generator=g).to(dtype).requires_grad_(both)
disp = (2 * torch.randn(field, generator=g)).requires_grad_()
ones = torch.randn(size[0], 1, *size[2:], generator=g)
calls = {
    "warp": lambda: tk.warp(src, disp, "border"),
    "flow_warp": lambda: tk.flow_warp(src, disp),
    "merged_warp": lambda: tk.merged_warp(src, disp, disp, ones, ones, "border"),
    "warp_l1": lambda: tk.warp_l1(src, disp, src.detach(), padding="border"),
    "splat": lambda: tk.splat(src, disp, "softmax", ones),
    "warp3d": lambda: tk.warp3d(src, disp, "border"),
}
t = time.perf_counter(); out = calls[op](); fwd = time.perf_counter() - t
t = time.perf_counter(); out.float().sum().backward(); bwd = time.perf_counter() - t
t = time.perf_counter(); calls[op]().float().sum().backward(); warm = time.perf_counter() - t
print(f"{fwd:.2f} {bwd:.2f} {warm * 1e3:.1f}")
"""


def first_calls(op: str, dtype: str, both: bool) -> tuple[float, float, float]:
    """(first forward s, first backward s, warm fwd+bwd ms) in a fresh process with an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        env.pop("TRITON_INTERPRET", None)
        run = subprocess.run([sys.executable, "-c", CHILD, op, dtype, "both" if both else "field"],
                             check=False, env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{op} {dtype}: {run.stderr.strip().splitlines()[-1]}")
    fwd, bwd, warm = map(float, run.stdout.split())
    return fwd, bwd, warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    args = p.parse_args()
    print("| op | dtype | gradients | first forward s | first backward s | then fwd+bwd ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for op in args.ops:
        for dtype in args.dtypes:
            for both in (False, True):
                fwd, bwd, warm = first_calls(op, dtype, both)
                grads = "src and field" if both else "field alone"
                print(f"| {op} | {dtype} | {grads} | {fwd:.2f} | {bwd:.2f} | {warm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
