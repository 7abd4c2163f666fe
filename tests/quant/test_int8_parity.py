"""LLM.int8 byte-for-byte against bitsandbytes 0.50.2 (the oracle, run on the CPU in this process):
row-wise quantization, dequantization and Linear8bitLt's forward over shapes x dtypes x thresholds,
with planted outliers. Every comparison is torch.equal: the same bytes, the same roundings.

bitsandbytes' forward is taken in eval mode: in training mode its CPU path is a different
algorithm (dequantize + float matmul), see quant/linear8bit.py.
"""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
THRESHOLDS = [0.0, 1.5, 6.0]
QUANT_SHAPES = [(1, 1), (1, 64), (7, 130), (64, 576), (300, 129), (3, 4099)]
# (rows, in_features, out_features): one row (decode), a few, many (prefill); odd sizes.
MATMUL_SHAPES = [(1, 64, 32), (1, 576, 192), (5, 130, 33), (16, 576, 64), (70, 256, 96), (2, 4099, 17)]


def with_outliers(shape, dtype, scale=1.0, seed=0) -> torch.Tensor:
    """randn with planted outliers: two whole columns up to ~10x, and scattered single elements."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, generator=g) * scale
    K = shape[-1]
    if K > 4:
        A[..., 3] *= 9.0
        A[..., K - 2] *= 5.0
    spikes = torch.rand(shape, generator=g) < 0.01
    A[spikes] = 20.0 * torch.sign(torch.randn(int(spikes.sum()), generator=g))
    return A.to(dtype)


def bnb_linear(bnb, weight, bias, threshold):
    N, K = weight.shape
    layer = bnb.nn.Linear8bitLt(K, N, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu").eval()  # the first move quantizes


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_vectorwise_quant_identical(bnb, shape, dtype, threshold):
    A = with_outliers(shape, dtype)
    ref_CB, ref_SCB, ref_cols = bnb.functional.int8_vectorwise_quant(A.clone(), threshold)
    CB, SCB, cols = quant.int8_vectorwise_quant(A, threshold)
    assert torch.equal(CB, ref_CB) and torch.equal(SCB, ref_SCB)
    if threshold == 0.0:
        assert cols is None and ref_cols is None
    else:
        assert torch.equal(cols, ref_cols)
        if shape[-1] > 4:
            assert cols.numel() > 0  # the planted outliers are found
    assert torch.equal(quant.int8_vectorwise_dequant(CB, SCB), bnb.functional.int8_vectorwise_dequant(ref_CB, ref_SCB))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vectorwise_quant_special_values_identical(bnb, dtype):
    A = torch.randn(10, 96)
    A[0] = 0.0  # all zero: scale 0, codes 0 (0 * inf = NaN -> 0)
    A[1, 5] = float("nan")
    A[2, 7] = float("inf")
    A[3] = -0.0
    A[4] = 1e-41 if dtype == torch.float32 else 1e-7  # subnormal
    A[5, :] = 7.0  # every element an outlier at threshold 6
    A[6, 0] = -1e4
    A = A.to(dtype)
    for threshold in (0.0, 6.0):
        ref = bnb.functional.int8_vectorwise_quant(A.clone(), threshold)
        ours = quant.int8_vectorwise_quant(A, threshold)
        assert torch.equal(ours[0], ref[0])
        assert torch.equal(ours[1].nan_to_num(-1.0), ref[1].nan_to_num(-1.0))


def test_threshold_compared_in_the_input_dtype(bnb):
    # 6.09765625 is a float16 value; float16(6.099) is that same value, so it is an outlier in
    # float16 although 6.09765625 < 6.099 in float32.
    A = torch.ones(2, 8, dtype=torch.float16)
    A[1, 2] = 6.09765625
    ref = bnb.functional.int8_vectorwise_quant(A.clone(), 6.099)
    ours = quant.int8_vectorwise_quant(A, 6.099)
    assert torch.equal(ours[2], ref[2]) and ours[2].tolist() == [2]
    assert torch.equal(ours[0], ref[0])


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=str)
def test_linear8bitlt_forward_identical(bnb, shape, dtype, threshold):
    M, K, N = shape
    weight = (torch.randn(N, K) / K**0.5).to(dtype)
    bias = torch.randn(N).to(dtype)
    x = with_outliers((M, K), dtype, seed=M + K)
    theirs = bnb_linear(bnb, weight, bias, threshold)
    ours = quant.Linear8bitLt(K, N, bias=True, threshold=threshold)
    ours.load_state_dict({"weight": weight, "bias": bias})
    ours = ours.to("cpu")  # the first move quantizes, as bitsandbytes
    assert torch.equal(ours.weight.data, theirs.weight.data) and torch.equal(ours.weight.SCB, theirs.weight.SCB)
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
    assert got.dtype == dtype and got.shape == (M, N)
    assert torch.equal(got, want)
    # The functional form and the op give the same, bias or not.
    with torch.no_grad():
        no_bias = bnb_linear(bnb, weight, None, threshold)(x)
    assert torch.equal(quant.int8_matmul(x, ours.weight.data, ours.weight.SCB, None, threshold), no_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_input_identical(bnb, dtype):
    weight = torch.randn(48, 80).to(dtype)
    x = with_outliers((2, 9, 80), dtype, scale=2.0)
    theirs = bnb_linear(bnb, weight, None, 6.0)
    ours = quant.Linear8bitLt.from_linear(torch.nn.Linear(80, 48, bias=False).to(dtype).requires_grad_(False))
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_float16_overflow_of_activations_identical(bnb):
    # bitsandbytes quantizes activations through float16: |x| > 65504 becomes inf there. As an
    # outlier its column is computed in float32 from the original value.
    weight = torch.randn(16, 32)
    x = torch.randn(3, 32)
    x[1, 4] = 1e5
    for threshold in (0.0, 6.0):
        theirs = bnb_linear(bnb, weight, None, threshold)
        ours = quant.Linear8bitLt(32, 16, bias=False, threshold=threshold)
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            want, got = theirs(x), ours(x)
        assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
        assert torch.isfinite(got).all() == (threshold > 0)
