"""Sizes past 2**31 elements, the kernels' 64-bit offset path, and 2**24 pixels along an axis
(float32 positions; past it the ops refuse, see test_validation.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tcae_kernels import cpu, merged_warp, warp, warp_l1, warp_naive, warp_torch
from tcae_kernels.checks import check_position_range
from tcae_kernels.testing import rel_err

SIDE = 46341  # SIDE**2 > 2**31


def huge_source(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, 1, SIDE, SIDE] float16 source (4.3 GB, left untouched but for a corner patch:
    the OS commits only the pages written) and the patch's values."""
    src = torch.empty(1, 1, SIDE, SIDE, dtype=torch.float16, device=device)
    patch = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)).half().to(device)
    src[..., -4:, -4:] = patch
    return src, patch


def check_huge(fn, device: str) -> None:
    src, patch = huge_source(device)
    # Output pixel (x, y) samples at (x + SIDE − 3.5, y + SIDE − 3.5): inside the patch,
    # at element offsets past 2**31.
    disp = torch.full((1, 2, 2, 2), -(SIDE - 3.5), device=device, requires_grad=True)
    out = fn(src, disp, "zeros")
    expected = warp_naive(patch.double(), torch.full((1, 2, 2, 2), -0.5, dtype=torch.float64, device=device))
    assert rel_err(out, expected) <= 2e-3
    out.sum().backward()
    d = torch.full((1, 2, 2, 2), -0.5, dtype=torch.float64, device=device, requires_grad=True)
    warp_naive(patch.double(), d).sum().backward()
    assert rel_err(disp.grad, d.grad) <= 5e-3


def test_past_2_31_elements_fallback():
    check_huge(warp_torch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with 5 GB free")
def test_past_2_31_elements_cuda():
    check_huge(warp, "cuda")


def test_64_bit_offset_path(monkeypatch):
    """The kernels' int64 indexing, forced on small tensors, gives the same results."""
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(2, 5, 7, 9, generator=gen, requires_grad=True)
    disp = (torch.randn(2, 2, 6, 8, generator=gen) * 3).requires_grad_()
    logits = torch.randn(2, 1, 6, 8, generator=gen)
    target = torch.randn(2, 5, 6, 8, generator=gen)

    def run():
        src.grad = disp.grad = None
        out = warp(src, disp, "border") + merged_warp(src, disp, -disp, logits, -logits)
        loss = out.square().sum() + warp_l1(src, disp, target).sum()
        loss.backward()
        return out.detach(), src.grad.clone(), disp.grad.clone()

    narrow = run()
    for name in ("warp", "merged_warp", "warp_l1"):
        monkeypatch.setattr(importlib.import_module(f"tcae_kernels.ops.{name}"), "needs_int64", lambda *t: True)
    for a, b in zip(run(), narrow):
        assert rel_err(a, b) <= 1e-6


def test_needs_int64_switches_where_offsets_pass_2_31():
    """Shapes only (meta tensors): more elements, or a reachable offset, than int32 holds."""
    needs_int64 = importlib.import_module("tcae_kernels.ops.launch").needs_int64
    assert not needs_int64(torch.empty(64, 3, 256, 256, device="meta"))
    assert not needs_int64(torch.empty(2**20, 2**9, device="meta"))  # 2**29 elements: offsets fit
    assert needs_int64(torch.empty(2**31, device="meta"))
    assert needs_int64(torch.empty(1, device="meta").expand(2**31))  # stride 0, still 2**31 elements
    # Few elements, far apart: offsets up to 2**31 (one neighbour's step of slack included).
    assert needs_int64(torch.empty(1, device="meta").as_strided((2, 2), (2**30, 1)))
    assert not needs_int64(torch.empty(1, device="meta").as_strided((2, 2), (2**20, 1)))


def shifted_row(w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random [1, 1, 1, w] row, δ sampling each pixel at x + 0.25, and the float64 result
    (the last pixel's right neighbour is outside: zeros padding)."""
    src = torch.rand(1, 1, 1, w, generator=torch.Generator().manual_seed(w)).to(dtype)
    disp = torch.zeros(1, 2, 1, w, dtype=dtype)
    disp[:, 0] = -0.25
    s = src.double().flatten()
    expected = 0.75 * s + 0.25 * torch.cat((s[1:], s.new_zeros(1)))
    return src, disp, expected


def test_position_range_check_allows_2_24_pixels_and_float64():
    """The size check refuses only what float32 positions cannot do (expanded tensors: nothing
    is allocated); tests/test_validation.py has the refusals."""
    at = torch.zeros(1, 2, 1, 1).expand(1, 2, 2**24, 2**24)
    check_position_range(torch.zeros(1, 1, 1, 1).expand(1, 1, 2**24, 2**24), at)
    past = torch.zeros(1, 2, 1, 1, dtype=torch.float64).expand(1, 2, 2**24 + 1, 1)
    check_position_range(past[:, :1], past)


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
def test_positions_at_and_past_2_24_pixels():
    """At 2**24 pixels, the largest size float32 positions allow, every pixel still samples its
    own neighbours; merged_warp, whose positions are float64, is exact past it. (Compiled CPU
    kernels only: the interpreted kernels would take minutes, the eager fallback gigabytes.)"""
    src, disp, expected = shifted_row(2**24, torch.float32)
    assert rel_err(cpu.warp(src, disp, "zeros").flatten(), expected) <= 1e-6
    src, disp, expected = shifted_row(2**24 + 8, torch.float32)
    logit = torch.zeros(1, 1, 1, 2**24 + 8)
    merged = cpu.kernels_or_none().merged_warp_forward(src, disp, disp, logit, logit, "zeros")
    assert rel_err(merged.flatten(), expected) <= 1e-6
