"""compose and integrate_velocity (x − δ) in 2-D and 3-D: translations, inverses, VoxelMorph's VecInt."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from tcae_kernels import compose, integrate_velocity, warp, warp3d
from tcae_kernels.testing import rel_err

SIZES = {2: (12, 13), 3: (6, 7, 8)}


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def smooth_field(ndim: int, gen: torch.Generator, amplitude: float, size: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """[1, ndim, *size] float64: a coarse random field upsampled (smooth), peak amplitude px."""
    size = size or SIZES[ndim]
    coarse = torch.randn(1, ndim, *(3,) * ndim, generator=gen, dtype=torch.float64)
    mode = "bilinear" if ndim == 2 else "trilinear"
    field = F.interpolate(coarse, size=size, mode=mode, align_corners=True)
    return field * amplitude / field.abs().max()


def warp_nd(src, disp, padding="zeros"):
    return warp3d(src, disp, padding) if disp.dim() == 5 else warp(src, disp, padding)


def voxelmorph_transform(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's SpatialTransformer: sample src at grid + flow (x + flow, channels in axis
    order), normalised for grid_sample(align_corners=True), zeros outside."""
    size = src.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in size], indexing="ij"))
    new = grid.unsqueeze(0) + flow
    new = torch.stack([2 * (new[:, i] / (s - 1) - 0.5) for i, s in enumerate(size)], dim=-1)
    return F.grid_sample(src, new.flip(-1), mode="bilinear", align_corners=True)


def voxelmorph_vecint(flow: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """VoxelMorph's VecInt: scaling and squaring of a velocity in the x + flow convention."""
    flow = flow / 2**steps
    for _ in range(steps):
        flow = flow + voxelmorph_transform(flow, flow)
    return flow


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_velocity_integrates_to_the_translation(path, ndim):
    """A constant v is its own exponential (border padding: the field extends past its edge;
    with zeros each squaring takes its sample beyond the edge one voxel further in)."""
    shift = torch.tensor([1.25, -0.5, 0.75][:ndim], dtype=torch.float64)
    v = shift.view(1, ndim, *(1,) * ndim).expand(1, ndim, *SIZES[ndim]).contiguous()
    assert torch.allclose(integrate_velocity(v, padding="border"), v, rtol=0, atol=1e-12)
    src = torch.randn(1, 2, *SIZES[ndim], generator=seeded("src", ndim), dtype=torch.float64)
    assert torch.allclose(warp_nd(src, integrate_velocity(v, padding="border")), warp_nd(src, v), atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_composition_order(path, ndim):
    """compose(u, v) warps by v, then by u. Integer fields make both exact (no interpolation):
    equal wherever x − u(x) lies inside (elsewhere the first warp's padding differs), and the
    other order is not."""
    gen = seeded("order", ndim)
    size = SIZES[ndim]
    u, v = (torch.randint(-1, 2, (1, ndim, *size), generator=gen).double() for _ in range(2))
    src = torch.randn(1, 2, *size, generator=gen, dtype=torch.float64)
    two_warps = warp_nd(warp_nd(src, v), u)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij")[::-1]
    inside = torch.ones(size, dtype=torch.bool)
    for k, (coord, n) in enumerate(zip(coords, size[::-1])):
        inside &= (coord - u[0, k] >= 0) & (coord - u[0, k] <= n - 1)
    assert inside.float().mean() > 0.5
    right = warp_nd(src, compose(u, v))[..., inside]
    wrong = warp_nd(src, compose(v, u))[..., inside]
    assert torch.allclose(right, two_warps[..., inside], rtol=0, atol=1e-12)
    assert rel_err(wrong, two_warps[..., inside]) > 0.3


@pytest.mark.parametrize("ndim", [2, 3])
def test_field_composed_with_its_inverse_is_near_identity(path, ndim):
    """exp(−v) inverts exp(v): their composition, either way, is a small fraction of the field
    (interpolation error only), where composing the field with itself doubles it."""
    size = (24, 24) if ndim == 2 else (10, 10, 10)
    v = smooth_field(ndim, seeded("inverse", ndim), 1.0, size=size)
    forward, backward = integrate_velocity(v, padding="border"), integrate_velocity(-v, padding="border")
    for a, b in ((forward, backward), (backward, forward)):
        assert compose(a, b, padding="border").norm() < 0.1 * a.norm()
    assert compose(forward, forward, padding="border").norm() > 1.5 * forward.norm()


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_voxelmorph_vecint(path, ndim):
    """Against VoxelMorph's VecInt in float64 through grid_sample: its flow f (x + f, channels
    in axis order) is our −v with the channels reversed."""
    v = smooth_field(ndim, seeded("vecint", ndim), 3.0)
    expected = -voxelmorph_vecint(-v.flip(1)).flip(1)
    assert rel_err(integrate_velocity(v), expected) <= 1e-10


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_voxelmorph_composition(path, ndim):
    """VoxelMorph composes flows (x + f, channels in axis order) "v then u" as u + transform(v, u):
    ours in x − δ with the channels reversed."""
    gen = seeded("vm-compose", ndim)
    u, v = smooth_field(ndim, gen, 2.0), smooth_field(ndim, gen, 2.0)
    expected = u + voxelmorph_transform(v, u)
    assert rel_err(-compose(-u.flip(1), -v.flip(1)).flip(1), expected) <= 1e-10


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients(path, ndim):
    gen = seeded("gradcheck", ndim)
    size = (3, 4) if ndim == 2 else (2, 3, 3)
    v = (torch.rand(1, ndim, *size, generator=gen, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    u = (torch.rand(1, ndim, *size, generator=gen, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: compose(a, b), (u, v), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: integrate_velocity(a, steps=2), (v,), eps=1e-6, atol=1e-7,
                                    fast_mode=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="v must be"):
        integrate_velocity(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="steps must be"):
        integrate_velocity(torch.zeros(1, 2, 4, 4), steps=-1)
    with pytest.raises(ValueError, match="v must have u's shape"):
        compose(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        compose(None, torch.zeros(1, 2, 4, 4))
