"""Input validation shared by every public warp entry point (SPEC section 4)."""

from __future__ import annotations

import torch

PADDINGS = ("zeros", "border")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float32 holds every integer up to 2**24: past it a pixel's own coordinate rounds.
MAX_FLOAT32_SIZE = 2**24


def check_tensor(name: str, t: object, ndim: int = 4) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be floating point (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    return t


def check_padding(padding: object) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding  # type: ignore[return-value]


def check_disp_dtype(src: torch.Tensor, disp: torch.Tensor, disp_name: str) -> None:
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


def check_warp_args(src: object, disp: object, padding: object, disp_name: str = "disp",
                    channels: tuple[str, ...] = ("dx", "dy")) -> str:
    """A warp's arguments: src [B, C, *spatial_in], disp [B, len(channels), *spatial] with as many
    spatial axes as channels (2-D: dx, dy; 3-D: dx, dy, dz). Returns the padding."""
    ndim = 2 + len(channels)
    check_tensor("src", src, ndim=ndim)
    check_tensor(disp_name, disp, ndim=ndim)
    assert isinstance(src, torch.Tensor) and isinstance(disp, torch.Tensor)
    if disp.shape[1] != len(channels):
        raise ValueError(
            f"{disp_name} must have {len(channels)} channels ({', '.join(channels)}) in dim 1, "
            f"got shape {tuple(disp.shape)}"
        )
    if disp.shape[0] != src.shape[0]:
        raise ValueError(
            f"{disp_name} batch size must equal src's ({src.shape[0]}), got {disp.shape[0]}"
        )
    if disp.device != src.device:
        raise ValueError(f"{disp_name} must be on {src.device} (src's device), got {disp.device}")
    check_disp_dtype(src, disp, disp_name)
    return check_padding(padding)


def check_position_range(src: torch.Tensor, disp: torch.Tensor, disp_name: str = "disp") -> None:
    """Sizes whose positions float32 computes exactly: at most 2**24 pixels along each axis.

    Sample positions are float32 unless src is float64. Past 2**24 pixels an
    output pixel's coordinate, or a source position, rounds to an even integer
    and the op would read the wrong pixel: refuse instead. (merged_warp computes
    its positions in float64 and does not call this.)
    """
    if src.dtype == torch.float64:
        return
    for name, t in (("src", src), (disp_name, disp)):
        if max(t.shape[2:]) > MAX_FLOAT32_SIZE:
            raise ValueError(
                f"{name} must be at most {MAX_FLOAT32_SIZE} (2**24) pixels along each axis with {src.dtype} src "
                f"(positions are float32, exact only that far), got {'×'.join(map(str, t.shape[2:]))}; "
                "float64 src and disp have no such limit"
            )


def check_warp3d_args(src: object, disp: object, padding: object, disp_name: str = "disp") -> str:
    """The 3-D warp's arguments: src [B, C, D_in, H_in, W_in], disp [B, 3, D, H, W] (SPEC section 4 in 3-D)."""
    return check_warp_args(src, disp, padding, disp_name, ("dx", "dy", "dz"))


def check_field(name: str, t: object, src: torch.Tensor, like: torch.Tensor, channels: int) -> None:
    """A per-pixel field beside the displacement ``like``: [B, channels, H, W], its device and dtype."""
    check_tensor(name, t)
    assert isinstance(t, torch.Tensor)
    expected = (like.shape[0], channels, like.shape[2], like.shape[3])
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if t.device != src.device:
        raise ValueError(f"{name} must be on {src.device}, got {t.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} dtype must be {like.dtype} (disp_a's dtype), got {t.dtype}")
