"""Smoke tests of the benchmark harness (bench/): it runs end to end and its gate bites."""

from __future__ import annotations

import json

import pytest
import torch

from bench import coldstart, impls
from bench.__main__ import main
from bench.harness import OPS, min_bytes
from tcae_kernels import cpu, warp_torch
from tcae_kernels.ops.launch import INTERPRET

# One tiny case per dtype: seconds, interpreter included.
FAST = ["--quick", "--shapes", "2x3x16x16", "--layouts", "channels_last", "--fields", "rough", "--rep-ms", "1"]


def test_quick_run_writes_checked_timed_rows(tmp_path):
    assert main([*FAST, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["machine"]["torch"] == torch.__version__
    rows = result["rows"]
    assert {r["op"] for r in rows} == set(OPS)
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    timed = [r for r in rows if "skipped" not in r]
    compiled = {"cpu"} if "cpu" in impls.IMPLS else set()
    assert {r["impl"] for r in timed} == compiled | {"fallback", "gs-path", "gs-kernel", "naive"}
    for r in rows:
        need_src, need_disp, _ = OPS[r["op"]]
        expected = {"out"} | ({"grad_src"} if need_src else set()) | ({"grad_disp"} if need_disp else set())
        assert set(r["errors"]) == expected
        fwd_tol, grad_tol = impls.tolerance(r["impl"], getattr(torch, r["dtype"]))
        assert all(e <= (fwd_tol if k == "out" else grad_tol) for k, e in r["errors"].items())
    for r in timed:
        assert r["median_us"] > 0 and r["gbps"] > 0 and r["roofline"] > 0 and r["speedup"] > 0
    ours = [r for r in rows if r["impl"] == "ours"]
    if INTERPRET:  # the interpreter is checked, never timed
        assert ours and all(r["backend"] == "triton-interpreter" and "skipped" in r for r in ours)


def _shifted(src, disp, padding):
    return warp_torch(src, disp + 0.25, padding)


def _no_disp_grad(src, disp, padding):
    return warp_torch(src, disp.detach(), padding) + 0 * disp.sum()


@pytest.mark.parametrize(("wrong", "what"), [(_shifted, "out"), (_no_disp_grad, "grad_disp")])
def test_gate_aborts_on_a_wrong_implementation(tmp_path, monkeypatch, wrong, what):
    monkeypatch.setitem(impls.IMPLS, "fallback", impls.standard(wrong))
    with pytest.raises(SystemExit, match=f"correctness gate failed.*fallback: {what}"):
        main([*FAST, "--dtypes", "float32", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_min_bytes_follow_spec_section_5():
    b, c, h, w = shape = (2, 3, 4, 5)
    n = b * h * w
    fwd = 2 * n * 4 + 2 * n * c * 2  # float32 disp, bfloat16 src and out
    bwd_disp = 2 * n * c * 2 + 4 * n * 4
    assert min_bytes("fwd", shape, torch.bfloat16, torch.float32) == fwd
    assert min_bytes("bwd-disp", shape, torch.bfloat16, torch.float32) == bwd_disp
    assert min_bytes("bwd-both", shape, torch.bfloat16, torch.float32) == bwd_disp + n * c * 2
    assert min_bytes("fwdbwd-both", shape, torch.bfloat16, torch.float32) == fwd + bwd_disp + n * c * 2


def test_fused_bench_checks_and_times(tmp_path, capsys):
    from bench.fused import main as fused_main

    rows = fused_main(["--shapes", "q-img", "--dtypes", "float32", "--rep-ms", "1", "--out", str(tmp_path / "f.json")])
    assert {r["op"] for r in rows} == {"merged", "l1"}
    assert all(r["fused_us"] > 0 and r["fused_error"] <= 1e-5 for r in rows)
    assert json.loads((tmp_path / "f.json").read_text())["rows"] == rows
    # Progress on stderr, a line per case before it runs (minutes on a CPU); the table alone on stdout.
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("bench.fused: 2 cases on ")
    assert err[1].startswith("[1/2] merged q-img") and "float32: checking and timing (0 s so far)" in err[1]
    assert err[2].startswith("[2/2] l1 q-img") and "float32: checking and timing (" in err[2]
    assert err[3].startswith("bench.fused: done in ") and len(err) == 4


def test_volumes_benchmark_runs_checked(tmp_path):
    """bench.volumes end to end at a tiny shape, without the interpreter (it refuses to time
    one): every impl and op timed, and the records say what they measured."""
    import os
    import subprocess
    import sys

    out = tmp_path / "volumes.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.volumes", "--shapes", "1x2x6x7x8", "--rep-ms", "1", "--json", str(out)],
        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {r["op"] for r in records} == {"fwd", "fwdbwd-flow", "fwdbwd-both", "int-fwd", "int-fwdbwd"}
    assert {r["impl"] for r in records} == {"ours", "vm", "eager"}
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    assert all(r["median_us"] > 0 and r["min_bytes"] > 0 for r in records)


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
def test_coldstart_times_a_cold_first_call():
    """bench.coldstart's child compiles from an empty cache (not the interpreter) and reports three times."""
    fwd, bwd, warm = coldstart.first_calls("warp3d", "float32", both=False)
    # Seconds, seconds, milliseconds: the first calls compile (or load), the warm one only runs.
    assert fwd > 10 * warm / 1e3 and bwd > 0 and warm > 0
