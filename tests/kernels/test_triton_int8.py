"""The LLM.int8 Triton kernels (kernels/triton/int8.py) and their "cuda" backend wrappers, run on CPU
under TRITON_INTERPRET=1 on tiny shapes, byte for byte against the pure-PyTorch reference.

TRITON_INTERPRET=1 is set for the whole run by tests/conftest.py on machines without a GPU. bf16
only runs on a GPU (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.backends import default as ref

from .triton_helpers import triton_module

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    # numpy, interpreting the kernels, warns on the NaN of an all-zero row's 0 * inf (expected: -> 0).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def kt():
    return triton_module("int8")


def _activations(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, generator=g) * 2
    A[..., 1] *= 6.0  # an outlier column
    if shape[0] > 2:
        A[2, 0] = 0.0
        A[2] = 0.0  # an all-zero row: scale 0, codes 0
    return A.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_k", [((1, 7), 16), ((5, 40), 16), ((3, 70), 32)], ids=str)
def test_quantize_rows_equals_reference(kt, shape, block_k, dtype):
    A = _activations(shape, dtype)
    for threshold in (0.0, 6.0, 6.099):
        for as_f16 in (False, True):
            CA, SCA, mask = kt.int8_quantize_rows(A, threshold, as_f16, block_k=block_k)
            want = ref.int8_vectorwise_quant(A.to(torch.float16) if as_f16 else A, threshold)
            assert torch.equal(CA, want[0]) and torch.equal(SCA, want[1]) and torch.equal(mask, want[2])


def test_quantize_rows_nan_row(kt):
    A = _activations((4, 20), torch.float32)
    A[1, 3] = float("nan")
    CA, SCA, _ = kt.int8_quantize_rows(A, 6.0, True, block_k=16)
    want = ref.int8_vectorwise_quant(A.to(torch.float16), 6.0)
    assert torch.equal(CA, want[0]) and torch.equal(SCA.nan_to_num(-1.0), want[1].nan_to_num(-1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (5, 33, 17), (3, 64, 40)])
def test_backend_gemm_equals_reference(kt, M, K, N, dtype):
    from quantserve.quant.backends import triton_int8

    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(N, K))
    x = _activations((M, K), dtype, seed=M + K)
    bias = torch.randn(N).to(dtype)
    for threshold in (0.0, 6.0):
        for b in (None, bias):
            got = triton_int8.gemm_int8(x, CB, SCB, threshold, b)
            assert got.dtype == dtype
            assert torch.equal(got, ref.gemm_int8(x, CB, SCB, threshold, b)), (threshold, b is not None)
    got = triton_int8.int8_vectorwise_quant(x.reshape(1, M, K), 6.0)
    want = ref.int8_vectorwise_quant(x.reshape(1, M, K), 6.0)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_gemm_tiles_and_k_tail(kt):
    # Several tiles in both directions, K not a multiple of BLOCK_K.
    CA = torch.randint(-127, 128, (20, 50), dtype=torch.int8)
    CB = torch.randint(-127, 128, (36, 50), dtype=torch.int8)
    SCA, SCB = torch.rand(20) * 4, torch.rand(36) * 4
    out = kt.int8_gemm(CA, CB, SCA, SCB, None, torch.float32, block_m=16, block_n=16, block_k=32)
    acc = (CA.double() @ CB.double().T).to(torch.int32)
    assert torch.equal(out, acc * (SCA[:, None] * SCB[None, :]) * 6.200124e-05)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (5, 33, 17), (3, 64, 40), (20, 50, 36)])
def test_int8_linear_within_float_rounding(kt, M, K, N, dtype):
    """The default (weight-only) forward's kernel, IEEE float32 accumulation: within Higham's bound
    of the float64 dequantized matmul (tests/quant/test_int8_parity.dequant_oracle), several tiles
    and a K tail; with the bias and without."""
    from ..quant.test_int8_parity import assert_dequant_matmul

    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(N, K))
    x = _activations((M, K), dtype, seed=M + K)
    bias = torch.randn(N).to(dtype)
    for b in (None, bias):
        got = kt.int8_linear(x, CB, SCB, b, ieee=dtype == torch.float32, block_m=16, block_n=16, block_k=16)
        assert_dequant_matmul(got, x, CB, SCB, b)


def test_backend_int8_linear(kt):
    from quantserve.quant.backends import triton_int8

    from ..quant.test_int8_parity import assert_dequant_matmul

    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(24, 40))
    x = _activations((2, 3, 40), torch.float32)
    bias = torch.randn(24)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        got = triton_int8.int8_linear(x, CB, SCB, bias)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert got.shape == (2, 3, 24)
    assert_dequant_matmul(got.reshape(6, 24), x.reshape(6, 40), CB, SCB, bias)
