"""The host side every op shares: dispatch, launch sizing, the src-gradient
accumulator, result conventions and op registration.

Dispatch: each op is a ``torch.library`` custom op whose default kernel is
the eager PyTorch fallback, with the Triton launcher registered as its CUDA
kernel and the compiled CPU loops (numba) as its CPU kernel (the Triton
kernels under ``TRITON_INTERPRET=1``), so ``torch.export`` sees one node per
op on every device.

Autograd modes: the kernels compute first-order reverse-mode gradients. Every
other mode runs the op's differentiable eager composite (its fallback
forward), through two helpers each op uses: ``register_autograd`` (its
backward rule; double backward differentiates the composite) and ``call``
(its public function; forward mode and torch.func run the composite).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD

try:
    import triton
except ImportError:  # no Triton wheel for this platform: the fallback serves every device
    triton = None

# Triton reads this when a kernel is decorated, so it is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CUDA's limit on grid dimensions y and z.
MAX_GRID_YZ = 65535


def implementation(device: torch.device | str) -> str:
    """What runs the warp ops for tensors on ``device``: "triton", "triton-interpreter",
    "numba" (compiled CPU loops) or "pytorch" (the eager fallback)."""
    device = torch.device(device)
    if triton is not None and device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if triton is not None and INTERPRET:
            return "triton-interpreter"
        from .. import cpu

        if cpu.available():
            return "numba"
    return "pytorch"


_cpu_module = None


def compiled_cpu():
    """The compiled CPU kernels (tcae_kernels.cpu), or None after one warning without numba.

    Imported at the first CPU call, not with the package: importing numba costs
    start-up time that GPU users need not pay. The module is kept once imported:
    an import statement costs ~1 µs on every call, twice per forward and backward.
    """
    global _cpu_module
    if _cpu_module is None:
        from .. import cpu

        _cpu_module = cpu
    return _cpu_module.kernels_or_none()


# Every op by name (tests switch their CPU kernels off to run the eager fallback).
OPS: dict[str, torch.library.CustomOpDef] = {}


def define_op(name: str, kernels: Callable, compiled: Callable, fallback: Callable, fake: Callable
              ) -> torch.library.CustomOpDef:
    """Register ``tcae_kernels::name``.

    Kernels by device: Triton ``kernels`` on CUDA; on CPU the same kernels
    under the interpreter, else ``compiled`` (numba loops, which fall back to
    the eager path themselves when numba is missing); the eager PyTorch
    ``fallback`` everywhere else. All take the op's arguments and return its
    tensors; the schema comes from ``fallback``'s annotations.
    """
    op = torch.library.custom_op(f"tcae_kernels::{name}", mutates_args=())(fallback)
    if triton is not None:
        op.register_kernel("cuda", kernels)
    op.register_kernel("cpu", kernels if triton is not None and INTERPRET else compiled)
    op.register_fake(fake)
    OPS[name] = op
    return op


def saving_inputs(n_tensors: int) -> Callable:
    """The autograd ``setup_context`` of an op whose first ``n_tensors`` inputs are tensors,
    followed by ``padding``, any flags, and ``deterministic`` last: ctx.saved_tensors holds
    the tensors, ctx.padding and ctx.deterministic those two, ctx.arguments all the rest."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.arguments = tuple(inputs[n_tensors:])
        ctx.padding, ctx.deterministic = ctx.arguments[0], ctx.arguments[-1]

    return setup_context


# Each op's differentiable eager composite, by op (see register_autograd).
COMPOSITES: dict[torch.library.CustomOpDef, Callable] = {}


def register_autograd(op: torch.library.CustomOpDef, backward: Callable, n_tensors: int, composite: Callable,
                      setup_context: Callable | None = None) -> None:
    """Give ``op`` (tensors first, then ``padding``, flags, ``deterministic``) its autograd.

    ``backward(ctx, *grads)`` is the first-order rule on the kernels: it
    returns one gradient (or None) per input, with ctx set by
    ``saving_inputs(n_tensors)``, or by ``setup_context`` where the op's
    arguments need other names (it must set ctx.arguments as well). ``composite`` is the op in eager,
    differentiable PyTorch, with the op's arguments and results (its fallback
    forward); autograd must give it the op's gradients at every order.

    A backward that must itself be differentiable (``create_graph=True``:
    grad mode is on inside it) differentiates ``composite`` instead, with
    ``torch.autograd.grad(..., create_graph=True)``: the kernels' gradients
    are not differentiable ops. ``call`` uses ``composite`` for forward mode
    and torch.func.
    """
    COMPOSITES[op] = composite

    def rule(ctx, *grads):
        if torch.is_grad_enabled():
            return _composite_backward(ctx, composite, n_tensors, grads)
        return backward(ctx, *grads)

    op.register_autograd(rule, setup_context=setup_context or saving_inputs(n_tensors))


def _composite_backward(ctx, composite: Callable, n_tensors: int, grads: tuple[torch.Tensor, ...]
                        ) -> tuple[torch.Tensor | None, ...]:
    """The op's gradients through its composite, themselves differentiable (double backward).
    The op's tensor inputs are the first ``n_tensors`` saved (its outputs may follow)."""
    tensors = ctx.saved_tensors[:n_tensors]
    needs = ctx.needs_input_grad[: len(tensors)]
    wrt = [t for t, need in zip(tensors, needs) if need]
    outputs = composite(*tensors, *ctx.arguments)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    # An output that depends on no input (an empty "not asked for" one, say) takes no part.
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    if pairs:
        outputs, grads = zip(*pairs)
        found = iter(torch.autograd.grad(outputs, wrt, grads, create_graph=True, allow_unused=True))
    else:  # no output depends on an input (a source without pixels, say): all gradients are 0
        found = iter([None] * len(wrt))
    return (*(next(found) if need else None for need in needs), *(None for _ in ctx.arguments))


def needs_composite(*tensors: torch.Tensor) -> bool:
    """Whether a call must run the op's composite: the custom op cannot serve it.

    The custom op's autograd is reverse mode through torch.autograd only. It
    would pass forward-mode tangents (``torch.autograd.forward_ad``,
    ``torch.func.jvp``, ``jacfwd``) through as zero without a word, and
    torch.func's reverse transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``)
    cannot trace it. Under ``torch.compile`` the op stays one node.
    """
    if torch.compiler.is_compiling():
        return False
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        return True
    # A torch.func transform differentiates these tensors. torch has no public test for an active
    # transform; this one backs torch.autograd.Function.apply (torch 2.0 to 2.13 at least).
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and functorch_active()


def call(op: torch.library.CustomOpDef, *args: Any) -> Any:
    """``op(*args)``, or the op's composite (see register_autograd) where ``needs_composite``
    says the custom op cannot serve the call: every public function calls its op through this."""
    if needs_composite(*(a for a in args if isinstance(a, torch.Tensor))):
        return COMPOSITES[op](*args)
    return op(*args)


def resolve_deterministic(deterministic: bool | None) -> bool:
    """An explicit choice wins; otherwise torch's global deterministic mode decides."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


def acc_dtype(src: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype: float64 stays float64; everything else computes in float32."""
    return torch.float64 if src.dtype == torch.float64 else torch.float32


def memory_format_of(src: torch.Tensor) -> torch.memory_format:
    """channels_last (channels_last_3d for a 5-D src) for a channels-last src, else contiguous:
    the format of every [B, C, H, W] (or [B, C, D, H, W]) result."""
    last = torch.channels_last_3d if src.dim() == 5 else torch.channels_last
    channels_last = src.is_contiguous(memory_format=last) and not src.is_contiguous()
    return last if channels_last else torch.contiguous_format


def empty_like_src(src: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new [B, C, H, W] tensor in src's memory format (channels_last stays channels_last)."""
    return torch.empty(shape, dtype=dtype or src.dtype, device=src.device, memory_format=memory_format_of(src))


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An op returns tensors, never None: an empty one stands for "not needed"."""
    return t if t is not None else like.new_empty(0)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset (with a neighbour's step of slack) can pass 2**31 − 1."""
    limit = (2**31 - 1) // 2
    for t in tensors:
        if t.numel() > limit or sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0) > limit:
            return True
    return False


def row_launches(src: torch.Tensor, b: int, h: int, w: int) -> tuple[list[tuple[tuple[int, int, int], int, int]], dict]:
    """How a kernel covers the output: one program per BLOCK_X pixels of ROWS rows.

    Returns ([(grid, yb_base, b_base), ...], meta): the grid is (x blocks, row
    blocks, batch), split into launches at CUDA's 65,535 limit on grid y and
    z. GPUs get ROWS = 1. NCHW gets BLOCK_C = 1: a plain loop over channels on
    [BLOCK_X] vectors, four pixels per thread. A channels_last src (channel
    stride 1) gets a [BLOCK_X, BLOCK_C] tile, so each pixel's channels load as
    one contiguous run.
    """
    c = src.shape[1]
    block_c = min(triton.next_power_of_2(c), 32) if src.stride(1) == 1 and c > 1 else 1
    block_x = min(triton.next_power_of_2(max(w, 1)), 1024 // block_c)
    # Four pixels (or channel slots) per thread: the fewest instructions per
    # pixel at >= 50 % occupancy in the static profile (bench/static.py).
    num_warps = max(1, min(8 if block_c == 1 else 4, block_x * block_c // 128))
    # The interpreter pays per program, not per pixel: several rows each there.
    rows = min(triton.next_power_of_2(max(h, 1)), max(1, 4096 // (block_x * block_c))) if INTERPRET else 1
    n_xb, n_yb = triton.cdiv(w, block_x), triton.cdiv(h, rows)
    launches = [
        ((n_xb, min(MAX_GRID_YZ, n_yb - y0), min(MAX_GRID_YZ, b - b0)), y0, b0)
        for b0 in range(0, b, MAX_GRID_YZ)
        for y0 in range(0, n_yb, MAX_GRID_YZ)
    ]
    return launches, dict(BLOCK_X=block_x, BLOCK_C=block_c, ROWS=rows, num_warps=num_warps)


class GradSrc:
    """The ∂L/∂src accumulator of a backward launch: float atomics, or int64 fixed point.

    Float mode accumulates in the arithmetic dtype (half and bfloat16 are cast
    once at the end). Deterministic mode holds, for each (b, c) plane, int64
    multiples of 1/scale, with scale the power of two that keeps a sum of
    magnitude ``bound[b, c]`` (the most one element of that plane can receive)
    within 2**62: each contribution is rounded to bound · 2**-62, and integer
    addition gives the same bits in any order. The scale is passed as two
    factors, so that it may pass float32's range (a bound of 1e-30, or 1e30
    in float64). Bound and scale stay on the device: no host sync.
    """

    def __init__(self, src: torch.Tensor, bound: torch.Tensor | None) -> None:
        self.src = src
        self.bound = bound
        if bound is None:
            self.buf = empty_like_src(src, tuple(src.shape), acc_dtype(src)).zero_()
            self.scale = self.buf  # never read: the kernel's DETERMINISTIC is off
        else:
            self.buf = empty_like_src(src, tuple(src.shape), torch.int64).zero_()
            exponent = 62 - torch.ceil(torch.log2(bound.double()))
            # A plane receiving nothing (bound 0) or non-finite values: any scale will do.
            exponent = torch.where(torch.isfinite(exponent), exponent, 0.0)
            half = torch.floor(exponent / 2)
            self.scale = torch.stack((torch.exp2(half), torch.exp2(exponent - half)), dim=-1).to(acc_dtype(src))

    @property
    def deterministic(self) -> bool:
        return self.bound is not None

    def finish(self) -> torch.Tensor:
        """The accumulator as ∂L/∂src in src's dtype."""
        if self.bound is None:
            return self.buf.to(self.src.dtype)
        spatial = (None,) * (self.src.dim() - 2)  # 2 for images, 3 for volumes
        s0, s1 = (self.scale[(..., k, *spatial)] for k in (0, 1))
        grad = self.buf.to(acc_dtype(self.src)) / s0 / s1
        # Integers cannot carry NaN or ±Inf: a plane that received one is NaN.
        return torch.where(torch.isfinite(self.bound)[(..., *spatial)], grad, float("nan")).to(self.src.dtype)


def grad_out_bound(grad_out: torch.Tensor) -> torch.Tensor:
    """Σ|grad_out| over the pixels (voxels) of each (b, c), [B, C]: what one element of src's
    plane (b, c) can receive, on grad_out's device (one read of grad_out, no host sync)."""
    # Half sums would overflow: accumulate in float32 at least.
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(grad_out.detach(), ord=1, dim=tuple(range(2, grad_out.dim())), dtype=dtype)
