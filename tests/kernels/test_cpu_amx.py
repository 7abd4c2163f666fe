"""The AMX 4-bit matmul (kernels/cpu/amx.cpp) against bitsandbytes: weights quantized and
dequantized by bitsandbytes (NF4 and FP4), the product computed in float64 on the bf16-rounded
activations and weights (the kernel's bf16 products), for row counts that are and are not multiples
of the 32-row tile pass, output sizes that are not multiples of the 32-row weight panel, with and
without bias, one and two threads; a row's result independent of the other rows; and shapes it
must decline (nothing written). Skipped on CPUs without AMX-BF16 (the engine then uses the AVX-512
kernel for prompts: tests/server/engine/test_fused_step.py covers both)."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from quantserve.kernels.cpu import amx

from ..native import require_native

require_native(amx.load)  # without a compiler: skipped; a failed build: an error
pytestmark = pytest.mark.skipif(not amx.available(), reason="no AMX-BF16 on this CPU")


def _weight(n, k, quant_type, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    return packed, state, bnbf.dequantize_4bit(packed, state)


def _reference(a, w, bias):
    out = a.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().t()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 40, 128), (32, 96, 576), (77, 960, 576), (33, 576, 1536),
                                   (130, 3072, 576)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_on_bitsandbytes_weights(quant_type, m, n, k, threads, with_bias):
    packed, state, w = _weight(n, k, quant_type)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    out = amx.gemm4(a, packed, state.absmax.float(), state.code.float(), (n, k), 64, bias, threads=threads)
    assert out is not None
    want = _reference(a, w, bias)
    # float32 sums of bf16 products over k terms: relative error ~ k * 2^-24 of the terms' magnitude
    err = (out.double() - want).abs().max().item()
    scale = (a.to(torch.bfloat16).double().abs() @ w.to(torch.bfloat16).double().abs().t()).max().item()
    assert err <= 4e-6 * scale, f"max |diff| {err:.3e} (terms' scale {scale:.1f})"


def test_row_result_does_not_depend_on_other_rows():
    packed, state, _ = _weight(960, 576, "nf4")
    a = torch.randn(77, 576, generator=torch.Generator().manual_seed(2))
    args = (packed, state.absmax.float(), state.code.float(), (960, 576), 64)
    full = amx.gemm4(a, *args)
    for rows in (slice(0, 1), slice(31, 33), slice(40, 77)):
        assert torch.equal(amx.gemm4(a[rows], *args), full[rows])


@pytest.mark.parametrize("k,blocksize", [(96, 32), (576, 32), (100, 64)])
def test_declines_shapes_it_does_not_take(k, blocksize):
    """K and the block size must be multiples of 64 (a 64-input chunk is one nibble load, one block)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, k, generator=g)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert amx.gemm4(torch.randn(4, k, generator=g), packed, state.absmax.float(), state.code.float(), (64, k),
                     blocksize) is None
