"""The native int8 CPU kernels (kernels/cpu/int8_cpu.cpp) at every instruction-set level this CPU
has (scalar, AVX2, AVX-512 VNNI), byte for byte against the pure-PyTorch reference, over the
shapes that reach every tail: K not a multiple of 8/32/64, activation rows beyond a tile (4) and a
panel (64), weight rows beyond a group, outliers, biases, and sums that wrap the VNNI accumulator."""

from __future__ import annotations

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.backends import cpu_int8
from quantserve.quant.backends import default as ref

from ..native import require_native
from .test_int8_parity import with_outliers

LEVELS = {0: "scalar", 1: "AVX2", 2: "AVX-512 VNNI"}


@pytest.fixture(scope="module")
def lib():
    return require_native(cpu_int8._native)


@pytest.fixture(params=sorted(LEVELS), ids=lambda level: LEVELS[level])
def level(request, lib):
    if request.param > lib.i8_detected_isa():
        pytest.skip(f"this CPU has no {LEVELS[request.param]}")
    lib.i8_set_isa_cap(request.param)
    assert lib.i8_isa() == request.param
    yield request.param
    lib.i8_set_isa_cap(99)


def test_native_kernels_are_registered_for_cpu(lib):
    assert "native C++ int8 kernels" in cpu_int8.status()
    assert quant.backends.backend_report()["int8"] == cpu_int8.status()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (5, 100), (70, 33), (2, 4099)], ids=str)
def test_quantize_equals_reference(level, shape, dtype):
    A = with_outliers(shape, dtype, scale=2.0)
    A[0, 0] = float("nan") if shape[0] > 1 else A[0, 0]
    for threshold in (0.0, 6.0, 6.099):
        got = cpu_int8.int8_vectorwise_quant(A, threshold)
        want = ref.int8_vectorwise_quant(A, threshold)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert torch.equal(got[1].nan_to_num(-1.0), want[1].nan_to_num(-1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "M,K,N", [(1, 64, 8), (1, 100, 13), (3, 33, 9), (4, 128, 16), (7, 250, 5), (65, 96, 11), (130, 64, 9)]
)
@pytest.mark.parametrize("int_mm", [False, True], ids=["native", "int_mm"])
def test_gemm_equals_reference(level, M, K, N, dtype, int_mm, monkeypatch):
    if int_mm and not cpu_int8.int_mm_available():
        pytest.skip("no fast torch._int_mm on this CPU")
    # Every row count through each integer product: the native GEMM, or torch._int_mm between
    # the native quantization and epilogue.
    monkeypatch.setattr(cpu_int8, "INT_MM_MIN_ROWS", 1 if int_mm else 10**9)
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(N, K))
    x = with_outliers((M, K), dtype, seed=M * K)
    bias = torch.randn(N).to(dtype)
    for threshold in (0.0, 6.0):
        for b in (None, bias):
            got = cpu_int8.gemm_int8(x, CB, SCB, threshold, b)
            assert torch.equal(got, ref.gemm_int8(x, CB, SCB, threshold, b)), (threshold, b is not None)


def test_gemm_weights_with_minus_128_and_long_rows(level):
    # -128 never comes out of quantization but a foreign checkpoint may hold it; K = 70000 makes
    # the VNNI kernel's uint8 x int8 partial sums pass 2^31 (they wrap; the result must not).
    K = 70000
    CB = torch.full((3, K), -128, dtype=torch.int8)
    CB[1] = 127
    CB[2, ::2] = -127
    SCB = torch.tensor([1.0, 2.0, 3.0])
    x = torch.full((2, K), -1.0)
    x[1, ::3] = 1.0
    got = cpu_int8.gemm_int8(x, CB, SCB, 0.0, None)
    assert torch.equal(got, ref.gemm_int8(x, CB, SCB, 0.0, None))


def test_empty_and_3d_inputs(lib):
    CB, SCB, _ = quant.int8_vectorwise_quant(torch.randn(6, 40))
    assert cpu_int8.gemm_int8(torch.randn(0, 40), CB, SCB, 6.0, None).shape == (0, 6)
    x = with_outliers((2, 3, 40), torch.bfloat16)
    assert torch.equal(cpu_int8.gemm_int8(x, CB, SCB, 6.0, None), ref.gemm_int8(x, CB, SCB, 6.0, None))
