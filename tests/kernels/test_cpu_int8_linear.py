"""LLM.int8's default CPU forward (kernels/cpu/int8_linear.cpp, quant op int8_linear): activations in
float32 / float16 / bfloat16 times int8 weight tiles widened in registers, against the float64
dequantized matmul, held to Higham's bound from the oracle's side (tests/rounding.py via
tests/quant/test_int8_parity.dequant_oracle): odd sizes, 1..70 rows, bias or not, both code paths
(AVX-512 and the portable loop), the tiled path for many rows (prefill), one thread or two, and batch
invariance below it."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant
from quantserve.kernels.cpu import int8_linear
from quantserve.quant.backends import cpu_int8, default

from ..native import require_native
from ..quant.test_int8_parity import assert_dequant_matmul, with_outliers

require_native(int8_linear.load)

SHAPES = [(1, 576, 192), (1, 15, 5), (2, 67, 129), (3, 16, 64), (5, 130, 33), (17, 100, 257), (70, 256, 96),
          (2, 4099, 17)]


def _case(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=g) / K**0.5
    weight[:, :3] *= 8.0  # some large rows' absmax
    CB, SCB, _ = quant.int8_vectorwise_quant(weight)
    x = with_outliers((M, K), dtype, seed=seed + 1)
    bias = torch.randn(N, generator=g).to(dtype)
    return x, CB, SCB, bias


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_within_float_rounding_of_the_dequantized_matmul(shape, dtype, with_bias, portable):
    x, CB, SCB, bias = _case(*shape, dtype)
    bias = bias if with_bias else None
    got = cpu_int8.int8_linear(x, CB, SCB, bias, portable=portable)
    assert_dequant_matmul(got, x, CB, SCB, bias)


def test_the_op_dispatches_to_the_native_kernel():
    x, CB, SCB, bias = _case(4, 576, 192, torch.float32)
    assert torch.equal(torch.ops.quant.int8_linear(x, CB, SCB, bias), cpu_int8.int8_linear(x, CB, SCB, bias))
    # The reference (dequantize + F.linear) agrees to float rounding, not bit for bit.
    assert_dequant_matmul(default.int8_linear(x, CB, SCB, bias), x, CB, SCB, bias)
    # 3-D activations keep their leading dimensions.
    x3 = x.reshape(2, 2, 576)
    assert torch.equal(torch.ops.quant.int8_linear(x3, CB, SCB, bias).reshape(4, 192),
                       torch.ops.quant.int8_linear(x, CB, SCB, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariant_and_thread_invariant(dtype):
    """Below the tiled path's rows (decode batches), a row's output does not depend on the rows
    beside it nor on the number of threads."""
    x, CB, SCB, bias = _case(cpu_int8.INT8_LINEAR_TILED_MIN_ROWS - 1, 576, 320, dtype, seed=3)
    whole = cpu_int8.int8_linear(x, CB, SCB, bias)
    for i in (0, 5, x.shape[0] - 1):
        assert torch.equal(cpu_int8.int8_linear(x[i : i + 1], CB, SCB, bias), whole[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_int8.int8_linear(x, CB, SCB, bias), whole)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [16, 64, 300])
def test_tiled_path_within_float_rounding(rows):
    """From INT8_LINEAR_TILED_MIN_ROWS rows on, the weight is dequantized a tile at a time (here
    several tiles: K = 4099 makes a tile 64 rows) and multiplied by torch's GEMM."""
    assert rows >= cpu_int8.INT8_LINEAR_TILED_MIN_ROWS
    x, CB, SCB, bias = _case(rows, 4099 if rows == 16 else 576, 200, torch.float32, seed=rows)
    assert_dequant_matmul(cpu_int8.int8_linear(x, CB, SCB, bias), x, CB, SCB, bias)
    xb = x.bfloat16()
    assert_dequant_matmul(cpu_int8.int8_linear(xb, CB, SCB, bias.bfloat16()), xb, CB, SCB, bias.bfloat16())


def test_special_values():
    x, CB, SCB, _ = _case(3, 64, 16, torch.float32)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    got = cpu_int8.int8_linear(x, CB, SCB)
    ref = default.int8_linear(x, CB, SCB)
    assert torch.isnan(got[1]).all() and torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    # All-zero weight rows (SCB 0) give exactly the bias.
    CB[3] = 0
    SCB[3] = 0.0
    bias = torch.randn(16)
    assert torch.equal(cpu_int8.int8_linear(x[:1], CB, SCB, bias)[0, 3], bias[3])
    # Empty batches.
    assert cpu_int8.int8_linear(x[:0], CB, SCB).shape == (0, 16)


def test_backend_report_names_the_kernel():
    assert "weight-only int8" in int8_linear.describe()


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequant_tile_equals_bitsandbytes_weight(dtype, portable):
    """The tiled path's native dequantization: CB * float32(SCB * float32(1/127)) rounded once to
    the dtype, bit for bit what torch computes (bitsandbytes' formula in float32, then the cast)."""
    lib = int8_linear.load()
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(37, 131) * 3)
    out = torch.empty(37, 131, dtype=dtype)
    assert lib.i8l_dequant(CB.data_ptr(), SCB.data_ptr(), 37, 131, out.data_ptr(),
                           cpu_int8.DTYPE_CODE[dtype], int(portable), 2) == 0
    want = (CB.float() * SCB.mul(1.0 / 127.0).unsqueeze(1)).to(dtype)
    assert torch.equal(out, want)


def test_tiled_path_at_medium_precision_within_bf16_rounding():
    """16-bit activations at "medium": the tile and the GEMM in bf16 (each weight rounded once to
    bf16, float32 sums): within the bf16 rounding of every product plus float32 sums and the output
    cast, i.e. the bound with bf16's unit roundoff per term."""
    from tests.rounding import UNIT_ROUNDOFF, gamma

    from ..quant.test_int8_parity import dequant_oracle

    x, CB, SCB, bias = _case(64, 576, 200, torch.bfloat16, seed=9)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = cpu_int8.int8_linear(x, CB, SCB, bias)
    finally:
        torch.set_float32_matmul_precision(precision)
    oracle, _ = dequant_oracle(x, CB, SCB, bias)
    W = CB.double() * (SCB.double().unsqueeze(1) / 127.0)
    magnitude = x.double().abs() @ W.abs().T + bias.double().abs()
    u = UNIT_ROUNDOFF[torch.bfloat16]
    # a bf16 rounding per product (the weight), float32 sums, then the bias and the output in bf16
    bound = (u + gamma(576 + 2, torch.float32)) * magnitude
    bound = bound + 2 * u * (oracle.abs() + bound)
    assert bool(((got.double() - oracle).abs() <= bound).all())
