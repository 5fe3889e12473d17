"""CPU microbenchmarks: the PyTorch fallback vs the grid_sample path, forward and forward+backward.

Run with ``pytest bench --benchmark-only`` (not part of the default test run).
Each case is checked against warp_naive before it is timed; one torch thread,
so shared CI cores do not stall multi-threaded ops.
"""

from __future__ import annotations

import pytest
import torch

import tcae_kernels
from bench.harness import make_inputs
from bench.impls import check, grid_sample_path

SHAPES = [(2, 3, 64, 64), (1, 3, 256, 256), (2, 32, 32, 32)]
IMPLS = {"fallback": tcae_kernels.warp_torch, "gs-path": grid_sample_path}
PADDING = "border"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape, impl: str, need_grad: bool):
    src, disp, grad_out = make_inputs(shape, torch.float32, "nchw", "smooth", torch.device("cpu"))
    check(impl, src, disp, grad_out, PADDING, need_grad, need_grad)
    return src.requires_grad_(need_grad), disp.requires_grad_(need_grad), grad_out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, shape, impl):
    src, disp, _ = _inputs(shape, impl, need_grad=False)
    benchmark.group = f"forward {'x'.join(map(str, shape))}"
    out = benchmark(IMPLS[impl], src, disp, PADDING)
    assert out.shape == src.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, shape, impl):
    src, disp, grad_out = _inputs(shape, impl, need_grad=True)
    benchmark.group = f"forward+backward {'x'.join(map(str, shape))}"
    grads = benchmark(lambda: torch.autograd.grad(IMPLS[impl](src, disp, PADDING), (src, disp), grad_out))
    assert grads[1].shape == disp.shape
