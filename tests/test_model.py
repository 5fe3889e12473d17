"""The TCAE model and its losses (SPEC section 6), on tiny CPU models.

The "triton" backend runs the real kernels through the Triton interpreter
(conftest sets TRITON_INTERPRET=1), which costs ~0.1 s per warp at 64×64 and
~1 s at 256×256, so most checks use 64×64, batch 2 and width 0.125, 256×256
gets one forward pass at batch 1, and loops of many steps use grid_sample.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import tcae_kernels
from tcae import model as model_module
from tcae.losses import (Curriculum, LossWeights, au_sparsity, blurred_l1, compute_losses, gaussian_blur, select_window,
                         window_loss)
from tcae.model import TCAE, TCAEConfig, TCAEOutput

WIDTH = 0.125


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(b: int, size: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[b, 3, size, size] smooth colour blobs in (−1, 1): images whose warps have useful gradients."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, size, dtype=torch.float64).view(1, 1, size, 1)
    xs = torch.linspace(-1, 1, size, dtype=torch.float64).view(1, 1, 1, size)
    img = torch.zeros(b, 3, size, size, dtype=torch.float64)
    for _ in range(6):
        c = torch.rand(b, 2, 1, 1, generator=g, dtype=torch.float64) * 1.4 - 0.7
        s = torch.rand(b, 1, 1, 1, generator=g, dtype=torch.float64) * 0.3 + 0.15
        col = torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64) * 2 - 1
        img = img + col * torch.exp(-((xs - c[:, :1]) ** 2 + (ys - c[:, 1:]) ** 2) / (2 * s**2))
    return img.tanh().to(dtype)


def make_model(size: int = 64, backend: str = "triton", width: float = WIDTH, seed: int = 0) -> TCAE:
    torch.manual_seed(seed)
    return TCAE(TCAEConfig(image_size=size, width=width, backend=backend))


def pair(b: int = 2, size: int = 64, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A source and the same faces moved 3 px right and down: a pair a warp can explain."""
    source = blobs(b, size, seed=1, dtype=dtype)
    shift = torch.full((b, 2, size, size), 3.0, dtype=dtype)
    return source, tcae_kernels.warp_naive(source, shift, "border")


def check_output(out: TCAEOutput, b: int, size: int, embed_dim: int, image_dtype: torch.dtype) -> None:
    for name in ("au_changed", "pose_changed", "reconstruction"):
        t = getattr(out, name)
        assert t.shape == (b, 3, size, size), name
        assert t.dtype == image_dtype, name
    for name in ("disp_au", "disp_pose", "disp", "attention"):
        t = getattr(out, name)
        assert t.shape == (b, 2, size, size), name
        assert t.dtype == (torch.float64 if image_dtype == torch.float64 else torch.float32), name
    for name in ("source_au", "source_pose", "target_au", "target_pose"):
        assert getattr(out, name).shape == (b, embed_dim), name
    for f in dataclasses.fields(out):
        assert torch.isfinite(getattr(out, f.name)).all(), f.name
    limit = (size - 1) / 2
    assert out.disp_au.abs().max() <= limit and out.disp_pose.abs().max() <= limit
    torch.testing.assert_close(out.attention.sum(1), torch.ones(b, size, size))
    # The merge is a per-pixel convex combination of the two fields.
    lo = torch.minimum(out.disp_au, out.disp_pose) - 1e-5
    hi = torch.maximum(out.disp_au, out.disp_pose) + 1e-5
    assert ((out.disp >= lo) & (out.disp <= hi)).all()


@pytest.mark.parametrize(
    "size, backend, width, b",
    [(64, "triton", WIDTH, 2), (128, "triton", WIDTH, 1), (256, "triton", 1 / 16, 1)],
)
def test_output_shapes_and_dtypes(size: int, backend: str, width: float, b: int) -> None:
    model = make_model(size, backend, width)
    source, target = pair(b, size)
    out = model(source, target)
    check_output(out, b, size, model.config.embed_dim, torch.float32)
    # The images are T(S, δ) of the fields the output reports.
    warped = {"reconstruction": out.disp, "au_changed": out.disp_au, "pose_changed": out.disp_pose}
    for name, disp in warped.items():
        ref = tcae_kernels.warp_naive(source, disp, "border")
        torch.testing.assert_close(getattr(out, name), ref, atol=1e-5, rtol=1e-5, msg=name)
    assert model.au_embedding(source).shape == (b, 256)
    assert model.pose_embedding(source).shape == (b, 256)
    losses, total = compute_losses(model, out, source, target)
    assert set(losses) == {f.name for f in dataclasses.fields(LossWeights)}
    for name, value in losses.items():
        assert value.shape == (b,) and torch.isfinite(value).all() and (value >= 0).all(), name
    weighted = sum(w * losses[n] for n, w in dataclasses.asdict(LossWeights()).items())
    torch.testing.assert_close(total, weighted)


def test_bfloat16_autocast() -> None:
    model = make_model()
    source, target = pair()
    with torch.no_grad():
        ref_total = compute_losses(model, model(source, target), source, target)[1]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(source, target)
        losses, total = compute_losses(model, out, source, target)
    check_output(out, 2, 64, 256, torch.float32)
    assert out.source_au.dtype == torch.bfloat16  # the encoder did run in bfloat16
    assert total.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits; the loss is a sum of many terms.
    torch.testing.assert_close(total, ref_total, rtol=0.05, atol=0)
    total.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def train(
    model: TCAE, source: torch.Tensor, target: torch.Tensor, steps: int
) -> tuple[TCAEOutput, dict[str, torch.Tensor], torch.Tensor]:
    """Adam steps on one fixed pair; returns the output, losses and total from after the last step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        out = model(source, target)
        loss = compute_losses(model, out, source, target)[1].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(source, target)
        losses, total = compute_losses(model, out, source, target)
    return out, losses, total


def test_training_steps_reduce_the_loss() -> None:
    model = make_model()
    source, target = pair()
    with torch.no_grad():
        losses0, total0 = compute_losses(model, model(source, target), source, target)
    _, losses, total = train(model, source, target, steps=5)
    # Typically 0.4–0.55 of the start, for the total and for the warp's own term.
    assert total.mean() < 0.7 * total0.mean(), (total0.mean().item(), total.mean().item())
    assert losses["recon"].mean() < 0.7 * losses0["recon"].mean()


def test_identity_pair_shrinks_the_displacement() -> None:
    # grid_sample here: ten interpreted steps would cost seconds for nothing
    # the backend-agreement test does not already cover.
    model = make_model(backend="grid_sample")
    source = blobs(2, 64, seed=3)
    with torch.no_grad():
        out0 = model(source, source)
        recon0 = compute_losses(model, out0, source, source)[0]["recon"].mean()
    out, losses, _ = train(model, source, source, steps=10)
    assert losses["recon"].mean() < 0.5 * recon0, (recon0.item(), losses["recon"].mean().item())
    assert out.disp.abs().mean() < 0.7 * out0.disp.abs().mean(), (
        out0.disp.abs().mean().item(), out.disp.abs().mean().item()
    )


def test_gradients_reach_encoder_and_both_decoders() -> None:
    model = make_model()
    source, target = pair()
    out = model(source, target)
    compute_losses(model, out, source, target)[1].mean().backward()
    for part in ("encoder.trunk", "encoder.au_branch", "encoder.pose_branch", "au_decoder", "pose_decoder"):
        module = model.get_submodule(part)
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{part}.{name}"
            assert p.grad.abs().sum() > 0, f"{part}.{name} got a zero gradient"


def test_source_gets_no_gradient_through_the_warp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every warp (plain, fused merge, fused L1) moves a detached image by a trained displacement."""
    seen: list[tuple[str, bool, bool]] = []

    def spy(name, inner):
        def wrapped(src: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            seen.append((name, src.requires_grad, args[0].requires_grad))
            return inner(src, *args, **kwargs)

        return wrapped

    monkeypatch.setitem(model_module.WARP_BACKENDS, "triton", spy("warp", model_module.WARP_BACKENDS["triton"]))
    for name in ("merged_warp", "warp_l1"):
        monkeypatch.setattr(model_module.tcae_kernels, name, spy(name, getattr(model_module.tcae_kernels, name)))
    model = make_model()
    source, target = pair()
    source.requires_grad_(True)
    out = model(source, target)
    compute_losses(model, out, source, target)[1].mean().backward()
    # AU- and pose-changed images, the fused reconstruction, the two fused cycles.
    assert sorted(seen) == sorted(
        [("warp", False, True)] * 2 + [("merged_warp", False, True)] + [("warp_l1", False, True)] * 2
    )
    # The source still gets a gradient, through the encoder.
    assert source.grad is not None and source.grad.abs().sum() > 0


def test_backends_agree_in_float64() -> None:
    source, target = (t.double() for t in pair())
    base = make_model().double()
    results = {}
    for backend in ("triton", "grid_sample", "naive"):
        model = copy.deepcopy(base)
        model.config = dataclasses.replace(model.config, backend=backend)
        out = model(source, target)
        losses, total = compute_losses(model, out, source, target)
        total.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[backend] = (losses, grads)
    ref_losses, ref_grads = results["naive"]
    for backend in ("triton", "grid_sample"):
        losses, grads = results[backend]
        for name in ref_losses:
            torch.testing.assert_close(
                losses[name], ref_losses[name], rtol=1e-12, atol=0, msg=f"{backend} {name}"
            )
        for name in ref_grads:
            # Relative L2 error, as SPEC section 3 measures gradients (~3e-14 seen).
            err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
            assert err < 1e-10, f"{backend} grad {name}: {err.item():.2e}"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size"):
        TCAEConfig(image_size=96)
    with pytest.raises(ValueError, match="backend"):
        TCAEConfig(backend="cuda")
    with pytest.raises(ValueError, match="source"):
        make_model()(torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 64, 64))
    for grid in (1, 5, 64):
        with pytest.raises(ValueError, match="pose_grid"):
            TCAEConfig(image_size=64, pose_grid=grid)
    with pytest.raises(ValueError, match="merge"):
        TCAEConfig(merge="max")


@pytest.mark.parametrize("backend", ["triton", "grid_sample"])
def test_sum_merge_adds_the_displacements(backend: str) -> None:
    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=64, width=WIDTH, backend=backend, merge="sum"))
    source, target = pair()
    out = model(source, target)
    torch.testing.assert_close(out.disp, out.disp_au + out.disp_pose)
    torch.testing.assert_close(out.reconstruction, tcae_kernels.warp_naive(source, out.disp, "border"),
                               rtol=0, atol=1e-5)
    out.reconstruction.sum().backward()
    assert model.au_decoder.net[-1].weight.grad.abs().sum() > 0
    assert model.pose_decoder.net[-1].weight.grad.abs().sum() > 0


def test_pose_grid_keeps_affine_motion_and_drops_local_motion() -> None:
    size, grid = 64, 4
    ys = torch.arange(size, dtype=torch.float64).view(1, size, 1).expand(1, size, size)
    xs = torch.arange(size, dtype=torch.float64).view(1, 1, size).expand(1, size, size)
    # A small rotation, scale and shift (pixels), then a 2-px bump like a lip corner moving alone.
    affine = torch.stack([0.5 + 0.03 * (xs - 31.5) - 0.05 * (ys - 31.5),
                          -1.0 + 0.05 * (xs - 31.5) + 0.03 * (ys - 31.5)], dim=1)
    bump = 3.0 * torch.exp(-((xs - 20) ** 2 + (ys - 40) ** 2) / 8.0).unsqueeze(1).expand(1, 2, size, size)
    half_cell = size // grid // 2
    inner = (..., slice(half_cell, size - half_cell), slice(half_cell, size - half_cell))
    torch.testing.assert_close(model_module.grid_smooth(affine, grid)[inner], affine[inner], rtol=0, atol=1e-9)
    assert model_module.grid_smooth(bump, grid).abs().max() < 0.1 * bump.abs().max()

    torch.manual_seed(0)
    model = TCAE(TCAEConfig(image_size=size, width=WIDTH, backend="grid_sample", pose_grid=grid))
    source, target = pair()
    model.eval()
    out = model(source, target)
    model.pose_decoder.grid = 0  # the decoder's own field, before smoothing
    raw, _ = model.decode("pose", out.source_pose, out.target_pose)
    torch.testing.assert_close(out.disp_pose, model_module.grid_smooth(raw, grid))
    assert model.au_decoder.grid == 0


def test_select_window() -> None:
    losses = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 9.0, 8.0, 7.0, 6.0], requires_grad=True)
    assert select_window(losses, 0.0, 0.5).item() == pytest.approx(2.0)  # 0, 1, 2, 3, 4
    assert select_window(losses, 0.3, 0.8).item() == pytest.approx(5.0)  # 3 … 7
    assert select_window(losses[:3], 0.0, 0.1).item() == pytest.approx(1.0)  # at least one sample
    select_window(losses, 0.0, 0.5).backward()
    assert (losses.grad > 0).sum() == 5
    # Bounds reached by repeated float additions: 0.5 + 0.1 + 0.1 + 0.1 is
    # 0.7999999999999999, and the window must still end at sample 8.
    hi = 0.5 + 0.1 + 0.1 + 0.1
    assert select_window(torch.arange(10.0), 0.1 + 0.1 + 0.1, hi).item() == pytest.approx(5.0)
    with pytest.raises(ValueError):
        select_window(losses, 0.5, 0.5)


def test_curriculum_slides_to_090() -> None:
    cur = Curriculum()
    assert (cur.lo, cur.hi) == (0.0, 0.5)
    windows = []
    while cur.slide():
        windows.append((cur.lo, cur.hi))
    # Moves while hi < 0.85: the original's last window is [0.4, 0.9).
    assert windows == [(0.1, 0.6), (0.2, 0.7), (0.3, 0.8), (0.4, 0.9)]
    assert cur.done and not cur.slide()


def test_window_is_taken_per_loss_term() -> None:
    # Two terms ranked in opposite orders: a window over the total would pick
    # the same samples for both, SPEC's picks each term's own smallest.
    losses = {name: torch.zeros(4) for name in dataclasses.asdict(LossWeights())}
    losses["recon"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    losses["cycle_au"] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    weights = LossWeights()
    assert window_loss(losses, weights, 0.0, 0.5).item() == pytest.approx(10 * 1.5 + 1 * 1.5)
    assert Curriculum(lo=0.5, hi=1.0).select(losses, weights).item() == pytest.approx(10 * 3.5 + 3.5)


def test_curriculum_trigger_forgets_the_best_then_decays_the_lr() -> None:
    cur = Curriculum(patience=2, lr_patience=1)
    assert cur.record(1.0) is None and cur.best == 1.0
    assert [cur.record(1.5) for _ in range(3)] == [None, None, "slid"]  # more than 2 without improvement
    assert (cur.lo, cur.hi, cur.best, cur.stale) == (0.1, 0.6, math.inf, 0)
    assert cur.record(2.0) is None and cur.best == 2.0  # the best was forgotten: 2.0 is the new best
    for _ in range(3):
        cur.slide()
    assert cur.done
    assert [cur.record(3.0) for _ in range(2)] == [None, "lr"]
    assert cur.lr_scale == pytest.approx(0.1) and cur.best == 2.0 and (cur.lo, cur.hi) == (0.4, 0.9)


def test_sparsity_is_measured_after_the_border_clamp() -> None:
    disp = torch.zeros(1, 2, 4, 4, requires_grad=True)
    with torch.no_grad():
        disp[0, 0] = 1.0  # every sample position moves 1 px left ...
        disp[0, 0, :, 0] = 5.0  # ... the first column far beyond the edge: only 0 px are inside
    sparsity = au_sparsity(disp, disp_scale=1.5)
    # x − δ clamped to [0, 3]: column 0 moves 0, the others 1 px; y does not move.
    assert sparsity.item() == pytest.approx((0 + 1 + 1 + 1) / 4 / 2 / 1.5)
    sparsity.sum().backward()
    assert (disp.grad[0, 0, :, 0] == 0).all() and (disp.grad[0, 0, :, 1:] != 0).all()


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_gaussian_blur_matches_a_direct_2d_convolution(sigma: float) -> None:
    img = torch.rand(2, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = math.ceil(3 * sigma)
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    k2 = torch.exp(-(d.view(-1, 1) ** 2 + d.view(1, -1) ** 2) / (2 * sigma**2))
    padded = torch.nn.functional.pad(img, (r, r, r, r), mode="replicate")
    expected = torch.nn.functional.conv2d(padded, (k2 / k2.sum()).expand(3, 1, -1, -1), groups=3)
    torch.testing.assert_close(gaussian_blur(img, sigma), expected, rtol=1e-12, atol=1e-12)


def test_blurred_l1_reaches_a_thin_line_moved_past_its_width() -> None:
    # A 2-px line at rows 30-31; the target has it 4 px higher. TCAE samples at y − δ_y: δ_y = −4 moves it there.
    source = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    source[..., 30:32, 16:48] = 1.0
    target = torch.roll(source, -4, dims=2)
    # Half a pixel up: off the integer positions, where a bilinear warp's slope is one-sided.
    disp = torch.zeros(1, 2, 64, 64, dtype=torch.float64)
    disp[:, 1] = -0.5
    disp.requires_grad_()
    warped = tcae_kernels.warp_grid_sample(source, disp, "border")
    plain, blurred = (warped - target).abs().mean(), blurred_l1(warped, target).sum()
    (grad_plain,) = torch.autograd.grad(plain, disp, retain_graph=True)
    (grad_blurred,) = torch.autograd.grad(blurred, disp)
    # The plain L1's slopes where the line leaves and where it arrives cancel: no pull toward the target.
    assert grad_plain[0, 1].sum().abs() < 1e-12
    assert grad_blurred[0, 1].sum() > 1e-4  # descending it makes δ_y negative: upward, toward the target
    shifts = torch.arange(-8.0, 1.0, dtype=torch.float64)
    losses = [blurred_l1(tcae_kernels.warp_grid_sample(source, torch.zeros(1, 2, 64, 64, dtype=torch.float64)
                                                       + torch.tensor([0.0, s]).view(1, 2, 1, 1), "border"),
                         target).item() for s in shifts]
    assert shifts[int(torch.tensor(losses).argmin())] == -4
    assert blurred_l1(target, target).item() == 0


def test_one_encoder_pass_per_image_group() -> None:
    model = make_model(backend="grid_sample")
    source, target = pair()
    out = model(source, target)
    # Training-mode BatchNorm: the targets' statistics must not mix into the sources' embedding.
    au, pose = model.embed(source)
    torch.testing.assert_close(out.source_au, au)
    torch.testing.assert_close(out.source_pose, pose)
    mixed_au, _ = model.embed(torch.cat([source, target]))
    assert not torch.allclose(mixed_au[: len(source)], au)
