"""Gradients through quant's 4-bit matmul and Linear4bit (QLoRA's backward), against bitsandbytes'
MatMul4Bit / Linear4bit on the same packed bytes and against float64 autograd on the dequantized
weight; under torch.utils.checkpoint and CPU autocast.

Shapes keep in_features a multiple of the blocksize: bitsandbytes' AVX-512 dequantize indexes
absmax per row otherwise (documented in test_bnb_parity.py), and its backward dequantizes with it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import quantserve.quant as quant
from quantserve.quant.nn import Linear4bit


def _bnb_state(bnb, state):
    # Our QuantState in bitsandbytes' own class, from the shared serialized form: both sides then
    # dequantize exactly the same bytes (with double quantization too, whose codes we pick slightly
    # differently when quantizing).
    return bnb.functional.QuantState.from_dict(state.as_dict(packed=True), device="cpu")


def _float64_reference(x, W, bias, grad_out):
    """(y, grad_x, grad_bias) by dense float64 autograd on the dequantized weight."""
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y = nn.functional.linear(x64, W.double(), b64)
    y.backward(grad_out.double())
    return y, x64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_matmul_4bit_gradients_match_bitsandbytes_and_float64(bnb, quant_type, double_quant, with_bias):
    W = torch.randn(96, 256)
    packed, state = quant.quantize_4bit(W, quant_type=quant_type, compress_statistics=double_quant)
    x = torch.randn(3, 7, 256, requires_grad=True)
    bias = torch.randn(96, requires_grad=True) if with_bias else None
    y = quant.matmul_4bit(x, packed, state, bias)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if bias is None else bias.detach().clone().requires_grad_()
    y_ref = bnb.matmul_4bit(x_ref, packed, quant_state=_bnb_state(bnb, state), bias=bias_ref)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)  # different summation orders
    # The backward is the same computation as bitsandbytes': grad @ dequantized W, in fp32.
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    if with_bias:
        torch.testing.assert_close(bias.grad, bias_ref.grad)

    W_hat = quant.dequantize_4bit(packed, state)
    y64, gx64, gb64 = _float64_reference(x, W_hat, bias, grad_out)
    torch.testing.assert_close(x.grad.double(), gx64, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), y64, atol=5e-5, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), gb64, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matmul_4bit_half_gradients_match_bitsandbytes(bnb, dtype):
    W = torch.randn(64, 128, dtype=dtype)
    packed, state = quant.quantize_4bit(W, quant_type="nf4")
    x = torch.randn(5, 128, dtype=dtype, requires_grad=True)
    y = quant.matmul_4bit(x, packed, state)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    bnb.matmul_4bit(x_ref, packed, quant_state=_bnb_state(bnb, state)).backward(grad_out)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_backward_saves_no_float_weight():
    # What autograd keeps for backward is the packed bytes and the absmax, not a dequantized copy.
    packed, state = quant.quantize_4bit(torch.randn(128, 256), quant_type="nf4")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quant.matmul_4bit(x, packed, state)
    assert saved and all(t.dtype in (torch.uint8, torch.float32) and t.numel() <= packed.numel() for t in saved)
    assert not any(t.shape == (128, 256) for t in saved)
    y.sum().backward()
    assert x.grad is not None


def _layer_pair(bnb, quant_type="nf4", double_quant=True, bias=True):
    linear = nn.Linear(256, 128, bias=bias)
    ours = Linear4bit.from_linear(
        linear, quant.QuantConfig(bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch.float32)
    )
    theirs = bnb.nn.Linear4bit(256, 128, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                               compress_statistics=double_quant)
    theirs.weight = bnb.nn.Params4bit(
        ours.weight.data.clone(), requires_grad=False, quant_state=_bnb_state(bnb, ours.quant_state),
        bnb_quantized=True, quant_type=quant_type, compress_statistics=double_quant,
    )
    if bias:
        theirs.bias = nn.Parameter(linear.bias.detach().clone())
    return ours.train(), theirs.train()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_gradients_match_bitsandbytes_and_weight_stays_frozen(bnb, quant_type):
    ours, theirs = _layer_pair(bnb, quant_type)
    packed_before = ours.weight.data.clone()
    x = torch.randn(2, 9, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    assert ours.weight.grad is None and not ours.weight.requires_grad
    assert torch.equal(ours.weight.data, packed_before)


class _Block(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.up(x)))


def _blocks(bnb):
    torch.manual_seed(1)
    up, _ = _layer_pair(bnb)
    down_lin = nn.Linear(128, 256)
    down = Linear4bit.from_linear(down_lin, quant.QuantConfig(bnb_4bit_compute_dtype=torch.float32))
    return _Block(up, down), up, down


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_float64_gradients(bnb, use_reentrant):
    block, up, down = _blocks(bnb)
    x = torch.randn(4, 256, requires_grad=True)
    y = checkpoint(block, x, use_reentrant=use_reentrant)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    # Oracle: the same block in float64 on the dequantized weights, no checkpointing.
    W_up = quant.dequantize_4bit(up.weight, up.quant_state).double()
    W_down = quant.dequantize_4bit(down.weight, down.quant_state).double()
    x64 = x.detach().double().requires_grad_()
    h = nn.functional.silu(nn.functional.linear(x64, W_up, up.bias.detach().double()))
    y64 = x64 + nn.functional.linear(h, W_down, down.bias.detach().double())
    y64.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
    assert up.bias.grad is not None and down.bias.grad is not None


def test_autocast_bf16_matches_bitsandbytes_and_float64(bnb):
    # Inside CPU autocast the 4-bit matmul runs in bf16, as F.linear and bitsandbytes' Linear4bit
    # do, and the layer returns the input's dtype (bitsandbytes' convention); gradients flow back
    # through the cast. The two libraries' bf16 kernels differ (oneDNN vs our fused kernel), so
    # they agree to bf16's resolution (8 bits of mantissa: ~0.4% per rounding), not bit for bit.
    ours, theirs = _layer_pair(bnb)
    x = torch.randn(3, 5, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        y_ref = theirs(x_ref)
        raw = quant.matmul_4bit(x, ours.weight, ours.quant_state)
    assert y.dtype == torch.float32 and raw.dtype == torch.bfloat16
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    assert x.grad.dtype == torch.float32
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, atol=1e-2 * scale, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-2 * x_ref.grad.abs().max().item(), rtol=0)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-2, rtol=1e-2)  # summed in bf16
    # And both within bf16 rounding of the float64 answer; outside autocast ours is float32-exact.
    W = quant.dequantize_4bit(ours.weight, ours.quant_state)
    y64, gx64, _ = _float64_reference(x, W, ours.bias, grad_out)
    torch.testing.assert_close(y.double(), y64, atol=1e-2 * scale, rtol=0)
    torch.testing.assert_close(x.grad.double(), gx64, atol=1e-2 * gx64.abs().max().item(), rtol=0)
    assert (y.double() - y64).abs().max() > 1e-4  # it really ran in bf16
    torch.testing.assert_close(ours(x).double(), y64, atol=5e-5, rtol=1e-5)
