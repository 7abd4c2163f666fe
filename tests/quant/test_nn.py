"""Params4bit / Linear4bit behaviour: lazy quantization, dtypes, module moves, copies."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant.nn import Linear4bit, Params4bit


def test_params4bit_quantizes_on_first_transfer(bnb):
    W = torch.randn(64, 128)
    p = Params4bit(W.clone(), quant_type="nf4", compress_statistics=False)
    assert not p.bnb_quantized and p.quant_state is None and p.dtype == torch.float32
    q = p.to("cpu")
    assert q.bnb_quantized and q.dtype == torch.uint8 and q.shape == (64 * 128 // 2, 1)
    ref = bnb.nn.Params4bit(W.clone(), quant_type="nf4", compress_statistics=False).to("cpu")
    assert torch.equal(q.data, ref.data)
    # Later moves keep the bytes and the state.
    again = q.to("cpu")
    assert again.quant_state is q.quant_state or torch.equal(again.quant_state.absmax, q.quant_state.absmax)
    assert torch.equal(again.data, q.data)


def test_params4bit_dtype_only_to_does_not_quantize():
    p = Params4bit(torch.randn(8, 64))
    assert not p.to(torch.float16).bnb_quantized
    assert not p.to("meta").bnb_quantized


def test_linear4bit_module_to_quantizes_and_forward_matches():
    linear = nn.Linear(128, 64)
    layer = Linear4bit(128, 64, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    with pytest.raises(RuntimeError, match="not quantized"):
        layer(torch.randn(1, 128))
    model = nn.Sequential(layer).to("cpu")
    assert model[0].quant_state is not None and model[0].weight.dtype == torch.uint8
    x = torch.randn(5, 128)
    W = quant.dequantize_4bit(model[0].weight, model[0].quant_state)
    torch.testing.assert_close(model(x), nn.functional.linear(x, W, linear.bias), atol=1e-5, rtol=1e-5)


def test_module_half_casts_float_weight_then_quantizes_in_fp16():
    model = nn.Sequential(Linear4bit(64, 32))
    model.half()
    assert not model[0].weight.bnb_quantized and model[0].weight.dtype == torch.float16
    model.to("cpu")
    assert model[0].quant_state.dtype == torch.float16
    packed = model[0].weight.data.clone()
    model.float()  # never re-types the packed bytes
    assert torch.equal(model[0].weight.data, packed)
    assert model[0].bias.dtype == torch.float32


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_quant_storage_survives_dtype_casts(storage):
    model = nn.Sequential(Linear4bit(64, 32, quant_storage=storage)).to("cpu")
    packed = model[0].weight.data.clone()
    assert packed.dtype == storage
    model.half()
    assert model[0].weight.dtype == storage
    # Compare bytes: packed bytes viewed as floats can be NaN patterns.
    assert torch.equal(model[0].weight.data.view(torch.uint8), packed.view(torch.uint8))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compute_dtype_defaults_to_weight_dtype(weight_dtype, input_dtype):
    linear = nn.Linear(64, 32).to(weight_dtype)
    layer = Linear4bit.from_linear(linear)
    assert layer.compute_dtype is None
    x = torch.randn(3, 64, dtype=input_dtype)
    out = layer(x)
    assert out.dtype == input_dtype  # cast back to the input's dtype
    W = quant.dequantize_4bit(layer.weight, layer.quant_state)
    assert W.dtype == weight_dtype
    expected = nn.functional.linear(x.to(weight_dtype), W, linear.bias).to(input_dtype)
    tol = 1e-5 if weight_dtype == input_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_explicit_compute_dtype():
    linear = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear, quant.QuantConfig(bnb_4bit_compute_dtype=torch.bfloat16))
    x = torch.randn(3, 64)
    W = quant.dequantize_4bit(layer.weight, layer.quant_state).to(torch.bfloat16)
    expected = nn.functional.linear(x.bfloat16(), W, linear.bias.bfloat16()).float()
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_from_linear_matches_bnb_bytes(bnb):
    linear = nn.Linear(96, 48)
    config = quant.QuantConfig(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, blocksize=128)
    ours = Linear4bit.from_linear(linear, config)
    packed, state = bnb.functional.quantize_4bit(linear.weight.detach(), blocksize=128, quant_type="fp4")
    assert torch.equal(ours.weight.data, packed) and torch.equal(ours.quant_state.absmax, state.absmax)
    assert ours.bias is linear.bias


def test_deepcopy_and_pickle_keep_quant_state():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone.weight, Params4bit) and clone.quant_state is not None
        torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)


def test_ops_on_params4bit_return_plain_tensors():
    p = Linear4bit.from_linear(nn.Linear(64, 32)).weight
    assert type(p + 0) is torch.Tensor
    assert type(p.view(-1)) is torch.Tensor
