"""Every Triton kernel on CPU under TRITON_INTERPRET=1, small shapes, fp32/fp16, against the reference.

The interpreter's bf16 arithmetic is wrong, so bf16 runs only on a GPU (test_gpu.py). The nested
matmul op's pure-PyTorch reference (quant.backends.default) is checked here too, against the
unnested reference ops. The paged-attention kernels: test_triton_paged_attention.py.

Triton decides when a function is decorated whether it is interpreted, its own standard library
(tl.zeros, tl.sum, ...) included, so TRITON_INTERPRET=1 must be set before triton is first imported:
tests/conftest.py sets it for the whole run on machines without a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.backends import default as ref
from quantserve.quant.codebooks import get_4bit_code, get_dynamic_map

from ..rounding import UNIT_ROUNDOFF, gamma
from .triton_helpers import triton_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def kt():
    return triton_module("ops")


def _quantize(N, K, blocksize, quant_type, nested=False, dtype=torch.float32):
    W = torch.randn(N, K, dtype=dtype)
    packed, state = quant.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state


def _nested_args(kt, state):
    n = state.nested
    return kt.Nested(n.absmax, n.code, n.offset, n.blocksize) if n is not None else None


def _ref_weight(packed, state, dtype):
    """The reference's dequantized weight in `dtype` (what gemm_4bit multiplies with)."""
    absmax = quant.functional.dequantize_absmax(state)
    return ref.dequantize_4bit(packed, absmax, state.blocksize, state.quant_type, list(state.shape), dtype)


def _ref_matmul(A, packed, state, bias):
    W = _ref_weight(packed, state, A.dtype)
    out = A.double() @ W.double().T
    if bias is not None:
        out += bias.to(A.dtype).double()
    return out


def _assert_matmul_close(out, A, packed, state, bias):
    """out (A's dtype) against _ref_matmul within the rounding bound of the kernels (tests/rounding.py):
    float32 sums of K products and the bias; the weight's last bit (a fused nested-absmax decode);
    in 16 bits also the weight's rounding to A's dtype (the GEMV multiplies the float32 weight, the
    reference its rounded copy) and the output's."""
    assert out.dtype == A.dtype
    expected = _ref_matmul(A, packed, state, bias)
    terms = A.double().abs() @ _ref_weight(packed, state, torch.float32).double().abs().T
    if bias is not None:
        terms += bias.double().abs()
    u, u32 = UNIT_ROUNDOFF[A.dtype], UNIT_ROUNDOFF[torch.float32]
    weight_error = u32 + (u if A.dtype != torch.float32 else 0.0)  # |W in A's dtype| <= (1 + u) |W|
    bound = (gamma(A.shape[-1] + 1) + weight_error) * (1 + u) * terms
    if A.dtype != torch.float32:
        bound += u * (expected.abs() + bound)  # the output's rounding
    err = (out.double() - expected).abs()
    assert bool((err <= bound).all()), f"max |diff| {err.max().item():.3e}, max excess {(err - bound).max().item():.3e}"


# --------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape, blocksize, block_bytes",
    [((48, 96), 64, 1024), ((33, 65), 32, 64), ((7, 129), 128, 16), ((3, 500), 4096, 256), ((1, 1), 64, 64)],
)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_matches_reference_exactly(kt, quant_type, dtype, shape, blocksize, block_bytes, nested):
    packed, state = _quantize(*shape, blocksize, quant_type, nested)
    n = shape[0] * shape[1]
    out = kt.dequantize_4bit(packed.reshape(-1), n, get_4bit_code(quant_type), state.absmax, blocksize, dtype,
                             _nested_args(kt, state), block_bytes=block_bytes)
    expected = _ref_weight(packed, state, dtype)
    if nested:  # the kernel may fuse the absmax decode's multiply-add: last-bit differences only
        torch.testing.assert_close(out.reshape(shape), expected, atol=0, rtol=2e-6 if dtype == torch.float32 else 1e-3)
    else:
        assert torch.equal(out.reshape(shape), expected)


# --------------------------------------------------------------------------------------------
# fused matmul: GEMV (M <= 4) and tl.dot GEMM, every tile-shape branch, split-K, nested absmax

GEMV_CONFIGS = {
    "default": "default",
    "heuristic": "heuristic",
    "tile_in_block": dict(BLOCK_N=4, BLOCK_KB=16, SPLIT_K=1, num_warps=4, num_stages=1),  # BLOCK_KB <= bs/2
    "split2": dict(BLOCK_N=8, BLOCK_KB=16, SPLIT_K=2, num_warps=4, num_stages=1),
    "split4_wide": dict(BLOCK_N=16, BLOCK_KB=64, SPLIT_K=4, num_warps=4, num_stages=1),
}
GEMM_CONFIGS = {
    "default": "default",
    "heuristic": "heuristic",
    "tile_in_block": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KB=16, SPLIT_K=1, num_warps=4, num_stages=1),
    "split3": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KB=16, SPLIT_K=3, num_warps=4, num_stages=1),
    "wide": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_KB=64, SPLIT_K=1, num_warps=4, num_stages=1),
}

# (N, K, blocksize): K a multiple of the blocksize; K a divisor of it (blocks span rows); N odd.
WEIGHTS = [(64, 128, 64), (40, 96, 32), (24, 64, 256), (33, 256, 128)]


def _check_gemm_4bit(kt, config, M, weight, cases):
    """kt.gemm_4bit with `config` on M rows against the reference, for each (quant type, dtype,
    nested absmax, bias) case."""
    N, K, blocksize = weight
    for quant_type, dtype, nested, with_bias in cases:
        packed, state = _quantize(N, K, blocksize, quant_type, nested)
        A = torch.randn(M, K, dtype=dtype)
        bias = torch.randn(N, dtype=dtype) if with_bias else None
        out = kt.gemm_4bit(A, packed.reshape(-1), N, K, get_4bit_code(quant_type), state.absmax, blocksize, bias,
                           _nested_args(kt, state), config=config)
        _assert_matmul_close(out, A, packed, state, bias)


@pytest.mark.parametrize("config", list(GEMV_CONFIGS))
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_gemv_matches_reference(kt, config, M, weight):
    _check_gemm_4bit(kt, GEMV_CONFIGS[config], M, weight,
                     [("nf4", torch.float16, False, True), ("fp4", torch.float32, True, False)])


@pytest.mark.parametrize("config", list(GEMM_CONFIGS))
@pytest.mark.parametrize("M", [5, 37])
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_gemm_matches_reference(kt, config, M, weight):
    _check_gemm_4bit(kt, GEMM_CONFIGS[config], M, weight,
                     [("fp4", torch.float16, True, True), ("nf4", torch.float32, False, False)])


def test_split_k_leaves_counters_zeroed_and_strided_rows(kt):
    """A split-K launch resets the tile counters it used (the next launch and graph replays need zeros)."""
    N, K, blocksize = 48, 128, 64
    packed, state = _quantize(N, K, blocksize, "nf4")
    big = torch.randn(2, 2 * K)
    A = big[:, :K]  # rows strided by 2K
    counters = torch.zeros(64, dtype=torch.int32)
    for config in (GEMV_CONFIGS["split2"], GEMV_CONFIGS["split2"]):  # twice: the second relies on the reset
        out = kt.gemm_4bit(A, packed.reshape(-1), N, K, get_4bit_code("nf4"), state.absmax, blocksize,
                           config=config, counters=counters)
        assert torch.count_nonzero(counters) == 0
        _assert_matmul_close(out, A, packed, state, None)


def test_gemm_rejects_unsupported_weights(kt):
    assert not kt.matmul_supported(8, 96, 64) and not kt.matmul_supported(8, 33, 32)
    assert kt.matmul_supported(8, 128, 64) and kt.matmul_supported(8, 32, 64)
    with pytest.raises(ValueError, match="unsupported"):
        kt.gemm_4bit(torch.randn(1, 96), torch.zeros(8 * 48, dtype=torch.uint8), 8, 96, get_4bit_code("nf4"),
                     torch.ones(12), 64)


# --------------------------------------------------------------------------------------------
# the "cuda"-key kernels of quant/backends/triton.py, called directly on CPU tensors


@pytest.fixture()
def backend(kt, monkeypatch):
    from quantserve.quant.backends import cuda as native
    from quantserve.quant.backends import triton as backend

    monkeypatch.setattr(native, "_loaded", lambda: False)  # no GPU toolkit here: the Triton path
    backend._code.cache_clear()
    return backend


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("lead_shape", [(1,), (2, 3), (6,)], ids=str)
def test_backend_gemm_and_nested(backend, monkeypatch, quant_type, lead_shape):
    monkeypatch.setattr(backend, "DEQUANT_GEMM_MIN_ROWS", 6)  # 6 rows take the dequantize + F.linear path
    N, K = 40, 128
    for nested in (False, True):
        packed, state = _quantize(N, K, 64, quant_type, nested)
        A = torch.randn(*lead_shape, K, dtype=torch.float16)
        bias = torch.randn(N, dtype=torch.float32)  # cast to A's dtype, as the reference does
        if nested:
            nst = state.nested
            out = backend.gemm_4bit_nested(A, packed, [N, K], state.absmax, nst.absmax, nst.code, nst.offset, 64,
                                           nst.blocksize, quant_type, bias)
        else:
            out = backend.gemm_4bit(A, packed, [N, K], state.absmax, 64, quant_type, bias)
        assert out.shape == (*lead_shape, N)
        _assert_matmul_close(out.reshape(-1, N), A.reshape(-1, K), packed, state, bias)


def test_backend_unsupported_weight_and_storage(backend):
    """K = 96 with blocksize 64 is not fusable: dequantize + F.linear; a bf16 quant_storage is read as bytes."""
    packed, state = quant.quantize_4bit(torch.randn(16, 96), blocksize=64, quant_storage=torch.bfloat16)
    A = torch.randn(3, 96)
    out = backend.gemm_4bit(A, packed, [16, 96], state.absmax, 64, "nf4")
    _assert_matmul_close(out, A, packed, state, None)
    deq = backend.dequantize_4bit(packed, state.absmax, 64, "nf4", [16, 96], torch.float16)
    assert torch.equal(deq, ref.dequantize_4bit(packed, state.absmax, 64, "nf4", [16, 96], torch.float16))


def test_triton_ops_eager(kt):
    N, K = 32, 64
    packed, state = _quantize(N, K, 64, "nf4", nested=True)
    nst = state.nested
    A = torch.randn(2, K)
    out = torch.ops.quant_triton.gemm_4bit(A, packed.reshape(-1), N, K, get_4bit_code("nf4"), state.absmax, 64,
                                           None, nst.absmax, nst.code, nst.offset, nst.blocksize)
    _assert_matmul_close(out, A, packed, state, None)
    deq = torch.ops.quant_triton.dequantize_4bit(packed.reshape(-1), N * K, get_4bit_code("nf4"), state.absmax, 64,
                                                 torch.float32, nst.absmax, nst.code, nst.offset, nst.blocksize)
    torch.testing.assert_close(deq.reshape(N, K), _ref_weight(packed, state, torch.float32), atol=0, rtol=2e-6)


# --------------------------------------------------------------------------------------------
# the nested-absmax op's reference


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemm_4bit_nested_reference(quant_type):
    W = torch.randn(48, 128)
    packed, state = quant.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=True)
    nst = state.nested
    A = torch.randn(3, 128)
    bias = torch.randn(48)
    out = torch.ops.quant.gemm_4bit_nested(A, packed, [48, 128], state.absmax, nst.absmax, nst.code, nst.offset, 64,
                                           nst.blocksize, quant_type, bias)
    torch.testing.assert_close(out, quant.matmul_4bit(A, packed, state, bias))
    decoded = ref.decode_absmax(state.absmax, nst.absmax, nst.code, nst.offset, nst.blocksize)
    assert torch.equal(decoded, quant.functional.dequantize_absmax(state))
    torch.library.opcheck(
        torch.ops.quant.gemm_4bit_nested.default,
        (A, packed, [48, 128], state.absmax, nst.absmax, get_dynamic_map(), nst.offset, 64, 256, quant_type, bias),
    )
