"""Every public entry point rejects bad input with ValueError/TypeError naming the argument,
what it expected and what it got. One table drives one test."""

from __future__ import annotations

import pytest
import torch

from tcae.losses import select_window
from tcae.model import TCAE, TCAEConfig
from tcae_kernels import (
    flow_warp, merge_displacements, merged_warp, splat, warp, warp3d, warp_grid_sample, warp_l1, warp_naive, warp_torch,
)
from tcae_kernels.nn import DisplacementWarp

WARPS = {"warp": warp, "warp_torch": warp_torch, "warp_naive": warp_naive, "warp_grid_sample": warp_grid_sample}


def z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def merged(**over):
    args = dict(src=z(2, 3, 4, 4), disp_a=z(2, 2, 4, 4), disp_b=z(2, 2, 4, 4), logit_a=z(2, 1, 4, 4), logit_b=z(2, 1, 4, 4))
    args.update(over)
    return lambda: merged_warp(**args)


def l1(**over):
    args = dict(src=z(2, 3, 4, 4), disp=z(2, 2, 4, 4), target=z(2, 3, 4, 4))
    args.update(over)
    return lambda: warp_l1(**args)


# (case, call, error type, the argument named, the expectation and the actual value quoted)
CASES = [
    ("src not a tensor", lambda f: f([[1.0]], z(1, 2, 1, 1)), TypeError, "src", "torch.Tensor", "list"),
    ("src 3-D", lambda f: f(z(3, 4, 4), z(1, 2, 4, 4)), ValueError, "src", "4-D", "3-D"),
    ("src integer", lambda f: f(z(1, 1, 4, 4, dtype=torch.int32), z(1, 2, 4, 4)), TypeError, "src", "floating point", "torch.int32"),
    ("src complex", lambda f: f(z(1, 1, 4, 4, dtype=torch.complex64), z(1, 2, 4, 4)), TypeError, "src", "floating point", "complex64"),
    ("disp 3-D", lambda f: f(z(1, 1, 4, 4), z(2, 4, 4)), ValueError, "disp", "4-D", "3-D"),
    ("disp 3 channels", lambda f: f(z(1, 1, 4, 4), z(1, 3, 4, 4)), ValueError, "disp", "2 channels", "(1, 3, 4, 4)"),
    ("batch differs", lambda f: f(z(2, 1, 4, 4), z(1, 2, 4, 4)), ValueError, "disp", "(2)", "got 1"),
    ("disp integer", lambda f: f(z(1, 1, 4, 4), z(1, 2, 4, 4, dtype=torch.int64)), TypeError, "disp", "floating point", "int64"),
    ("disp float64 beside float32", lambda f: f(z(1, 1, 4, 4), z(1, 2, 4, 4, dtype=torch.float64)), TypeError, "disp", "torch.float32 (src's dtype), got", "torch.float64"),
    ("disp float64 beside half", lambda f: f(z(1, 1, 4, 4, dtype=torch.float16), z(1, 2, 4, 4, dtype=torch.float64)), TypeError, "disp", "torch.float16 (src's dtype) or float32, got", "torch.float64"),
    ("disp on another device", lambda f: f(z(1, 1, 4, 4), torch.zeros(1, 2, 4, 4, device="meta")), ValueError, "disp", "must be on cpu", "meta"),
    ("disp float32 beside float64", lambda f: f(z(1, 1, 4, 4, dtype=torch.float64), z(1, 2, 4, 4)), TypeError, "disp", "torch.float64", "torch.float32"),
    ("disp bf16 beside half", lambda f: f(z(1, 1, 4, 4, dtype=torch.float16), z(1, 2, 4, 4, dtype=torch.bfloat16)), TypeError, "disp", "float16", "bfloat16"),
    ("disp half beside float32", lambda f: f(z(1, 1, 4, 4), z(1, 2, 4, 4, dtype=torch.float16)), TypeError, "disp", "float32", "float16"),
    ("unknown padding", lambda f: f(z(1, 1, 4, 4), z(1, 2, 4, 4), "reflection"), ValueError, "padding", "'zeros', 'border'", "'reflection'"),
]

OTHER_CASES = [
    ("merged_warp disp_b shape", merged(disp_b=z(2, 2, 4, 5)), ValueError, "disp_b", "(2, 2, 4, 4)", "(2, 2, 4, 5)"),
    ("merged_warp disp_b H and W", merged(src=z(2, 3, 4, 5), disp_a=z(2, 2, 4, 5), disp_b=z(2, 2, 5, 5),
                                          logit_a=z(2, 1, 4, 5), logit_b=z(2, 1, 4, 5)),
     ValueError, "disp_b", "(2, 2, 4, 5)", "(2, 2, 5, 5)"),
    ("merged_warp disp_b not a tensor", merged(disp_b=[[0.0]]), TypeError, "disp_b", "torch.Tensor", "list"),
    ("merged_warp logit_a device", merged(logit_a=torch.zeros(2, 1, 4, 4, device="meta")), ValueError, "logit_a", "must be on cpu", "meta"),
    ("merged_warp logit_a channels", merged(logit_a=z(2, 2, 4, 4)), ValueError, "logit_a", "(2, 1, 4, 4)", "(2, 2, 4, 4)"),
    ("merged_warp logit_b dtype", merged(logit_b=z(2, 1, 4, 4, dtype=torch.float64)), TypeError, "logit_b", "torch.float32", "torch.float64"),
    ("merged_warp disp_a channels", merged(disp_a=z(2, 3, 4, 4)), ValueError, "disp_a", "2 channels", "(2, 3, 4, 4)"),
    ("merged_warp padding", merged(padding="wrap"), ValueError, "padding", "'zeros', 'border'", "'wrap'"),
    ("merge_displacements logit_b", lambda: merge_displacements(z(1, 2, 3, 3), z(1, 2, 3, 3), z(1, 1, 3, 3), z(1, 1, 3, 4)), ValueError, "logit_b", "(1, 1, 3, 3)", "(1, 1, 3, 4)"),
    ("warp_l1 target shape", l1(target=z(2, 3, 5, 5)), ValueError, "target", "(2, 3, 4, 4)", "(2, 3, 5, 5)"),
    ("warp_l1 target dtype", l1(target=z(2, 3, 4, 4, dtype=torch.float64)), TypeError, "target", "torch.float32", "torch.float64"),
    ("warp_l1 reduction", l1(reduction="sum"), ValueError, "reduction", "'none', 'mean'", "'sum'"),
    ("warp_l1 disp", l1(disp=z(2, 1, 4, 4)), ValueError, "disp", "2 channels", "(2, 1, 4, 4)"),
    # Past 2**24 pixels float32 positions round (expanded tensors: nothing is allocated).
    ("warp disp past 2**24", lambda: warp(z(1, 1, 4, 4), z(1, 2, 1, 1).expand(1, 2, 1, 2**24 + 1)),
     ValueError, "disp", "at most 16777216", "1×16777217"),
    ("warp_torch disp past 2**24", lambda: warp_torch(z(1, 1, 4, 4), z(1, 2, 1, 1).expand(1, 2, 2**24 + 1, 1)),
     ValueError, "disp", "at most 16777216", "16777217×1"),
    ("warp_l1 src past 2**24", l1(src=z(2, 3, 1, 1).expand(2, 3, 2**24 + 1, 2)),
     ValueError, "src", "at most 16777216", "16777217×2"),
    ("flow_warp flow past 2**24", lambda: flow_warp(z(1, 1, 4, 4), z(1, 2, 1, 1).expand(1, 2, 1, 2**24 + 1)),
     ValueError, "flow", "at most 16777216", "1×16777217"),
    ("splat src past 2**24", lambda: splat(z(1, 1, 1, 1).expand(1, 1, 2**24 + 1, 1), z(1, 2, 1, 1).expand(1, 2, 2**24 + 1, 1)),
     ValueError, "src", "at most 16777216", "16777217×1"),
    ("warp3d disp past 2**24", lambda: warp3d(z(1, 1, 2, 2, 2), z(1, 3, 1, 1, 1).expand(1, 3, 2**24 + 1, 1, 1)),
     ValueError, "disp", "at most 16777216", "16777217×1×1"),
    ("DisplacementWarp padding", lambda: DisplacementWarp("mirror"), ValueError, "padding", "'zeros', 'border'", "'mirror'"),
    ("DisplacementWarp disp", lambda: DisplacementWarp()(z(1, 1, 4, 4), z(1, 1, 4, 4)), ValueError, "disp", "2 channels", "(1, 1, 4, 4)"),
    ("TCAEConfig image_size", lambda: TCAEConfig(image_size=100), ValueError, "image_size", "(64, 128, 256)", "100"),
    ("TCAEConfig backend", lambda: TCAEConfig(backend="cuda"), ValueError, "backend", "'triton'", "'cuda'"),
    ("TCAE source shape", lambda: TCAE(TCAEConfig(image_size=64, width=0.125))(z(1, 3, 32, 32), z(1, 3, 64, 64)), ValueError, "source", "[B, 3, 64, 64]", "(1, 3, 32, 32)"),
    ("select_window window", lambda: select_window(z(4), 0.6, 0.5), ValueError, "lo", "0 <= lo < hi <= 1", "lo=0.6"),
]


@pytest.mark.parametrize(
    "call,error,name,expected,actual",
    [pytest.param(lambda c=c, f=f: c[1](f), *c[2:], id=f"{n}-{c[0]}") for c in CASES for n, f in WARPS.items()]
    + [pytest.param(c[1], *c[2:], id=c[0]) for c in OTHER_CASES],
)
def test_bad_input_is_named(call, error, name, expected, actual):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(name) or f" {name}" in message, message
    assert expected in message and actual in message, message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_differ():
    with pytest.raises(ValueError, match="disp must be on cuda"):
        warp(torch.zeros(1, 1, 4, 4, device="cuda"), torch.zeros(1, 2, 4, 4))
