"""CPU microbenchmarks: the compiled CPU kernels and the PyTorch fallback vs the grid_sample path.

Run with ``pytest bench --benchmark-only`` (not part of the default test run).
Forward and forward+backward, with one and with two threads (torch's; the
compiled kernels follow them). Each case is checked against warp_naive before
it is timed.
"""

from __future__ import annotations

import pytest
import torch

import tcae_kernels
from bench.harness import make_inputs
from bench.impls import IMPLS as CHECKED
from bench.impls import check, grid_sample_path
from tcae_kernels import cpu

# The shapes and the demo's training batch (tcae demo: 16 × 3 × 64 × 64).
SHAPES = [(2, 3, 64, 64), (1, 3, 256, 256), (2, 32, 32, 32), (16, 3, 64, 64)]
IMPLS = {
    **({"cpu": cpu.warp} if "cpu" in CHECKED else {}),
    "fallback": tcae_kernels.warp_torch,
    "gs-path": grid_sample_path,
}
PADDING = "border"


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(shape, impl: str, need_grad: bool):
    src, disp, grad_out = make_inputs(shape, torch.float32, "nchw", "smooth", torch.device("cpu"))
    check(impl, src, disp, grad_out, PADDING, need_grad, need_grad)
    return src.requires_grad_(need_grad), disp.requires_grad_(need_grad), grad_out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, shape, impl, threads):
    src, disp, _ = _inputs(shape, impl, need_grad=False)
    benchmark.group = f"forward {'x'.join(map(str, shape))}, {threads} thread(s)"
    out = benchmark(IMPLS[impl], src, disp, PADDING)
    assert out.shape == src.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, shape, impl, threads):
    src, disp, grad_out = _inputs(shape, impl, need_grad=True)
    benchmark.group = f"forward+backward {'x'.join(map(str, shape))}, {threads} thread(s)"
    grads = benchmark(lambda: torch.autograd.grad(IMPLS[impl](src, disp, PADDING), (src, disp), grad_out))
    assert grads[1].shape == disp.shape
