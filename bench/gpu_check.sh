#!/usr/bin/env bash
# The one script for a GPU machine (BENCH.md): versions, the CUDA correctness
# tests, then the full benchmark sweep. Run from anywhere:
#     bash bench/gpu_check.sh            # writes to $OUT if set, else bench/results/
# The whole test suite runs, without stopping at a failure: the files with CUDA cases
# first (capped at 240 s), then the rest (420 s). Then the sweep, ~2-3 min on an H200
# (40 cases x 5 ops x 4 implementations, 20 ms per measurement, Triton compiles
# included), and volumes, < 1 min (none of it has run on a GPU yet).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=.
# tests/conftest.py turns the interpreter on unless told otherwise: real kernels here.
export TRITON_INTERPRET=0

main() {
    echo "== versions"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
    python3 -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'

    echo "== CUDA correctness tests (the files with CUDA cases first)"
    local tests_rc=0 rest_rc=0
    local cuda_files=(tests/test_warp.py tests/test_fused.py tests/test_limits.py tests/test_warp3d.py
                      tests/test_flow_warp.py tests/test_splat.py)
    # A failure is reported at the end; the runs below still go, behind their own gates.
    timeout 240 python3 -m pytest "${cuda_files[@]}" -q -p no:cacheprovider || tests_rc=$?

    echo "== the rest of the suite (CPU cases: compiled loops instead of the interpreter)"
    timeout 420 python3 -m pytest tests -q -p no:cacheprovider "${cuda_files[@]/#/--ignore=}" || rest_rc=$?

    echo "== benchmark"
    python3 -m bench --out "$out" --rep-ms 20

    echo "== fused TCAE ops vs the unfused sequences"
    python3 -m bench.fused --shapes train feat64 --rep-ms 20 --out "$out/fused.json"

    echo "== volumes: warp3d and integrate_velocity vs VoxelMorph's SpatialTransformer and VecInt"
    python3 -m bench.volumes --rep-ms 20 --json "$out/volumes.json"

    echo "== tests exit codes: CUDA files $tests_rc, the rest $rest_rc (0 passed, 124 timed out)"
    return $((tests_rc || rest_rc))
}

main 2>&1 | tee "$out/gpu_check.log"
