"""Cases, timing, minimum bytes and the copy-bandwidth roofline (BENCH.md, SPEC section 5).

Times are microseconds, sizes bytes, bandwidths GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Shape = tuple[int, int, int, int]  # B, C, H, W (src and output alike)

SHAPES: dict[str, Shape] = {
    "train": (64, 3, 256, 256),  # TCAE training batch
    "feat64": (32, 64, 128, 128),  # feature maps
    "feat128": (16, 128, 128, 128),
    "large": (4, 3, 1024, 1024),
    "latency": (1, 3, 256, 256),
}
QUICK_SHAPES: dict[str, Shape] = {"q-img": (2, 3, 64, 64), "q-feat": (2, 16, 32, 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
FIELDS = ("smooth", "rough")
# op → (src needs grad, disp needs grad, what is timed)
OPS: dict[str, tuple[bool, bool, str]] = {
    "fwd": (False, False, "forward"),
    "bwd-disp": (False, True, "backward"),
    "bwd-both": (True, True, "backward"),
    "fwdbwd-disp": (False, True, "both"),
    "fwdbwd-both": (True, True, "both"),
}
DISP_PX = 3.0  # displacement scale, pixels: "a few pixels"


def parse_shape(spec: str) -> tuple[str, Shape]:
    """(label, dims) for a name from SHAPES/QUICK_SHAPES or a "BxCxHxW"."""
    known = {**SHAPES, **QUICK_SHAPES}
    if spec in known:
        return f"{spec} {'x'.join(map(str, known[spec]))}", known[spec]
    dims = tuple(int(v) if v.isdigit() else 0 for v in spec.lower().split("x"))
    if len(dims) != 4 or min(dims) < 1 or min(dims[2:]) < 2:
        raise ValueError(f"shape must be one of {sorted(known)} or BxCxHxW with H, W >= 2, got {spec!r}")
    return spec, dims  # type: ignore[return-value]


def make_inputs(
    shape: Shape, dtype: torch.dtype, layout: str, field: str, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (src, disp, grad_out); disp float32 in pixels, smooth (blurred noise) or rough (per pixel)."""
    torch.manual_seed(seed)
    b, c, h, w = shape
    src = torch.randn(b, c, h, w, device=device).to(dtype)
    grad_out = torch.randn(b, c, h, w, device=device).to(dtype)
    if field == "smooth":
        # Upsampling coarse noise is a cheap wide blur.
        coarse = torch.randn(b, 2, max(h // 16, 2), max(w // 16, 2), device=device)
        disp = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False) * DISP_PX
    else:
        disp = torch.randn(b, 2, h, w, device=device) * DISP_PX
    if layout == "channels_last":
        fmt = torch.channels_last
        src, disp, grad_out = (t.contiguous(memory_format=fmt) for t in (src, disp, grad_out))
    return src, disp, grad_out


def min_bytes(op: str, shape: Shape, src_dtype: torch.dtype, disp_dtype: torch.dtype) -> int:
    """SPEC section 5's minimum bytes moved; fwd+bwd counts both passes."""
    b, c, h, w = shape
    s = torch.finfo(src_dtype).bits // 8
    d = torch.finfo(disp_dtype).bits // 8
    n = m = b * h * w
    fwd = 2 * n * d + m * c * s + n * c * s
    bwd = n * c * s + m * c * s + 4 * n * d
    if op.endswith("both"):
        bwd += m * c * s  # grad src written once
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[op.split("-")[0]]


@dataclass
class Timer:
    """Median wall time of a callable on one device.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, so
    small shapes are not flattered by a warm cache). CPU: a perf_counter loop.
    """

    device: torch.device
    warmup_ms: float
    rep_ms: float

    def median_us(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e3
        fn()
        times: list[float] = []
        end = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        """Memory fn allocates above what is live before it (outputs included), MiB; None on CPU."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device copy bandwidth in GB/s, bytes read + written, copying ``nbytes`` into a preallocated buffer."""
    x = torch.randn(nbytes // 4, device=timer.device)
    y = torch.empty_like(x)
    us = timer.median_us(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / us / 1e3


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, object]:
    """Where and with what the numbers were measured."""
    import triton

    info: dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "device": str(device),
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass  # the JSON says null rather than guess
    return info
