"""Every quant op passes torch.library.opcheck (schema, fake impl, dispatch, autograd registration)."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.codebooks import get_dynamic_map


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_4bit_ops(quant_type, dtype):
    A = torch.randn(48, 96, dtype=dtype)
    torch.library.opcheck(torch.ops.quant.quantize_4bit.default, (A, 64, quant_type, torch.uint8))
    # A 16-bit integer view of the same bytes (a float view can hold NaN patterns, which compare unequal).
    torch.library.opcheck(torch.ops.quant.quantize_4bit.default, (A, 64, quant_type, torch.int16))
    packed, state = quant.quantize_4bit(A, quant_type=quant_type)
    torch.library.opcheck(
        torch.ops.quant.dequantize_4bit.default, (packed, state.absmax, 64, quant_type, [48, 96], dtype)
    )
    x = torch.randn(5, 96, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    for b in (None, bias):
        torch.library.opcheck(
            torch.ops.quant.gemm_4bit.default, (x, packed, [48, 96], state.absmax, 64, quant_type, b)
        )


def test_opcheck_blockwise_ops():
    A = torch.randn(1000)
    code = get_dynamic_map()
    torch.library.opcheck(torch.ops.quant.quantize_blockwise.default, (A, code, 256))
    q, absmax = torch.ops.quant.quantize_blockwise(A, code, 256)
    torch.library.opcheck(torch.ops.quant.dequantize_blockwise.default, (q, absmax, code, 256, torch.float32))


def test_fake_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    A = torch.randn(33, 65)
    real_packed, real_absmax = torch.ops.quant.quantize_4bit(A, 64, "nf4", torch.uint8)
    with FakeTensorMode() as mode:
        fake_packed, fake_absmax = torch.ops.quant.quantize_4bit(mode.from_tensor(A), 64, "nf4", torch.uint8)
    assert fake_packed.shape == real_packed.shape and fake_absmax.shape == real_absmax.shape
