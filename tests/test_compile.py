"""The kernels compile for real GPUs (NVIDIA sm_80/sm_90/sm_100, AMD gfx942), checked
ahead of time on this CPU: the interpreter accepts code that Triton's compiler rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tcae_kernels.ops import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    # The compiler needs real JIT functions: the interpreter must be off in the child.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_launcher_specialisation_compiles(tmp_path):
    """An all-pairs covering set of (target, op variant, dtype, layout, padding, IDX64, shape)."""
    out = tmp_path / "compile.json"
    result = _run(["-m", "bench.compile", "--json", str(out)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = json.loads(out.read_text())
    assert all(r["compiled"] and r["grid_ok"] for r in records)
    assert {r["target"] for r in records} == {"sm_80", "sm_90", "sm_100", "gfx942"}
    assert {r["kernel"] for r in records} == {
        "_warp_fwd_kernel", "_warp_bwd_kernel", "_merged_fwd_kernel", "_merged_bwd_kernel",
        "_warp_l1_fwd_kernel", "_warp_l1_bwd_kernel", "_warp3d_fwd_kernel", "_warp3d_bwd_kernel",
        "_splat_fwd_kernel", "_splat_bwd_kernel",
    }
    assert {r["op"] for r in records} >= {"flow_warp", "splat"}
    assert {r["dtype"] for r in records} >= {"float16", "bfloat16", "float32", "float64", "bfloat16+f32disp"}
    assert {(r["layout"], r["idx64"], r["deterministic"]) for r in records} >= {
        ("nchw", True, True), ("channels_last", False, True), ("nchw", False, False)}


def test_checker_rejects_what_the_compiler_rejects(tmp_path):
    """The check is not vacuous: the bug it exists for (an early return inside
    `if CONSTEXPR:` with another type) passes the interpreter and fails here."""
    script = """
import torch, triton, triton.language as tl
import bench.compile as aot

@triton.jit
def load_pair(ptr, F64: tl.constexpr):
    a = tl.load(ptr)
    if F64:
        return a.to(tl.float64)
    return a.to(tl.float32)

@triton.jit
def kernel(ptr, out, F64: tl.constexpr):
    tl.store(out, load_pair(ptr, F64))

x = torch.zeros(4, dtype=torch.float64)
with aot.recording() as launches:
    kernel[(1,)](x, x, F64=True)
try:
    aot.compile_launch(launches[0], aot.TARGETS["sm_90"])
except Exception as exc:
    print("rejected:", type(exc).__name__)
else:
    print("compiled")
"""
    path = tmp_path / "old_load_pair.py"  # Triton reads a kernel's source from its file
    path.write_text(script)
    result = _run([str(path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("rejected"), result.stdout


def test_pairwise_set_covers_every_pair():
    script = """
import itertools
import bench.compile as aot
cases = aot.pairwise_cases()
names = list(aot.FACTORS)
for a, b in itertools.combinations(names, 2):
    seen = {(repr(c[a]), repr(c[b])) for c in cases}
    want = {(repr(x), repr(y)) for x in aot.FACTORS[a] for y in aot.FACTORS[b]}
    assert seen == want, (a, b, len(want - seen))
print(len(cases))
"""
    result = _run(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]


def test_launches_respect_cuda_grid_limits(monkeypatch):
    """Grid y and z stay within 65,535 however many rows and samples: launches split."""
    monkeypatch.setattr(launch, "INTERPRET", False)
    src = torch.empty(1, 3, 1, 1)
    for b, h, w in [(70000, 3, 5), (2, 140000, 1), (65535, 65536, 2)]:
        launches, meta = launch.row_launches(src, b, h, w)
        covered = 0
        for (gx, gy, gz), yb, b0 in launches:
            assert 0 < gy <= 65535 and 0 < gz <= 65535
            assert gx * meta["BLOCK_X"] >= w
            covered += gy * gz
        assert covered == b * h and meta["ROWS"] == 1
