"""Input validation shared by every public warp entry point (SPEC section 4)."""

from __future__ import annotations

import torch

PADDINGS = ("zeros", "border")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be floating point (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    return t


def check_padding(padding: object) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding  # type: ignore[return-value]


def check_disp_dtype(src: torch.Tensor, disp: torch.Tensor, disp_name: str = "disp") -> None:
    """disp matches src's dtype, or is float32 beside a float16/bfloat16 src (mixed precision)."""
    if disp.dtype == src.dtype:
        return
    if disp.dtype == torch.float32 and src.dtype in (torch.float16, torch.bfloat16):
        return
    raise TypeError(
        f"{disp_name} dtype must be {src.dtype} (src's dtype)"
        + (" or float32" if src.dtype in (torch.float16, torch.bfloat16) else "")
        + f", got {disp.dtype}"
    )


def check_warp_args(src: object, disp: object, padding: object) -> str:
    check_tensor("src", src)
    check_tensor("disp", disp)
    assert isinstance(src, torch.Tensor) and isinstance(disp, torch.Tensor)
    if disp.shape[1] != 2:
        raise ValueError(
            f"disp must have 2 channels (dx, dy) in dim 1, got shape {tuple(disp.shape)}"
        )
    if disp.shape[0] != src.shape[0]:
        raise ValueError(
            f"disp batch size must equal src's ({src.shape[0]}), got {disp.shape[0]}"
        )
    if disp.device != src.device:
        raise ValueError(f"disp must be on {src.device} (src's device), got {disp.device}")
    check_disp_dtype(src, disp)
    return check_padding(padding)
