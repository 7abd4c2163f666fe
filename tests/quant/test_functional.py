"""Argument validation: clear errors naming the argument, never a crash deep in a kernel."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"blocksize": 16}, ValueError, "blocksize"),
        ({"blocksize": 8192}, ValueError, "blocksize"),
        ({"blocksize": 64.0}, ValueError, "blocksize"),
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"quant_storage": torch.complex64}, TypeError, "quant_storage"),
    ],
)
def test_quantize_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        quant.quantize_4bit(torch.randn(8, 64), **kwargs)


@pytest.mark.parametrize("A", [torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.float64)])
def test_quantize_dtype_errors(A):
    with pytest.raises(TypeError, match="A must be"):
        quant.quantize_4bit(A)


def test_quantize_rejects_empty_and_non_tensors():
    with pytest.raises(ValueError, match="at least one element"):
        quant.quantize_4bit(torch.empty(0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quant.quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.quantize_4bit(torch.randn(6), quant_storage=torch.float32)


def test_matmul_argument_errors():
    packed, state = quant.quantize_4bit(torch.randn(32, 64))
    with pytest.raises(ValueError, match="input features"):
        quant.matmul_4bit(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match="bias"):
        quant.matmul_4bit(torch.randn(2, 64), packed, state, bias=torch.randn(31))
    with pytest.raises(TypeError, match="A must be"):
        quant.matmul_4bit(torch.randn(2, 64).double(), packed, state)
    with pytest.raises(ValueError, match="bytes"):
        quant.matmul_4bit(torch.randn(2, 64), packed[:-1], state)
    with pytest.raises(TypeError, match="QuantState"):
        quant.dequantize_4bit(packed, {"absmax": state.absmax})
    vec_packed, vec_state = quant.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="2-D"):
        quant.matmul_4bit(torch.randn(2, 64), vec_packed, vec_state)


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 3, 5), (4099,)])
def test_any_shape_round_trips_to_its_shape(shape):
    A = torch.randn(shape)
    packed, state = quant.quantize_4bit(A, blocksize=32)
    out = quant.dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == A.dtype
    # Every value lands within half the largest code gap of its block's absmax scale.
    assert ((out - A).abs() <= A.abs().max() * 0.17).all()


def test_matmul_3d_input_and_dtype_override():
    W = torch.randn(16, 64)
    packed, state = quant.quantize_4bit(W)
    x = torch.randn(2, 3, 64)
    W_hat = quant.dequantize_4bit(packed, state)
    torch.testing.assert_close(quant.matmul_4bit(x, packed, state), x @ W_hat.T, atol=1e-5, rtol=1e-5)
    assert quant.dequantize_4bit(packed, state, dtype=torch.bfloat16).dtype == torch.bfloat16
