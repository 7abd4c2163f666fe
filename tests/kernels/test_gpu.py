"""The GPU kernels (Triton and CUDA C++) on a real GPU: against the pure-PyTorch reference, against
bitsandbytes' CUDA kernels, under CUDA-graph capture and torch.compile. Deselected by default:

    pytest -m gpu tests/kernels

(tests/conftest.py leaves TRITON_INTERPRET unset where torch sees a GPU.) The engine's paged
attention on the GPU: test_gpu_paged_attention.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.backends import default as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LLAMA_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in)


@pytest.fixture(scope="module", autouse=True)
def _gpu_backend():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need the compiled kernels")
    from quantserve.quant.backends import triton as backend

    if "reason" in backend._state:
        pytest.fail(f"Triton backend not registered on a GPU machine: {backend.status()}")
    ops = _kt()
    ops.AUTOTUNE = False  # heuristic configs: no minutes of autotuning per shape (test_autotuned covers it)
    yield
    ops.AUTOTUNE = True


def _kt():
    from quantserve.kernels.triton import ops

    return ops


def _quantize(N, K, blocksize=64, quant_type="nf4", nested=False, dtype=torch.bfloat16):
    W = torch.randn(N, K, device=DEV, dtype=dtype)
    return quant.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _ref_matmul(A, packed, state, bias=None):
    """float64 A @ W.T with W the reference's dequantized weight rounded to A's dtype."""
    absmax = quant.functional.dequantize_absmax(state)
    W = ref.dequantize_4bit(packed, absmax, state.blocksize, state.quant_type, list(state.shape), A.dtype)
    out = A.double() @ W.double().T
    return out if bias is None else out + bias.to(A.dtype).double()


def _assert_close(out, expected, dtype, K):
    # Our kernels accumulate in fp32 from fp32 weights; the reference rounds W to A's dtype first.
    # The difference is bounded by the dtype's rounding of W, summed over K in random directions.
    eps = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(out.double(), expected, atol=4 * eps * scale, rtol=4 * eps)


# --------------------------------------------------------------------------------------------
# correctness against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(1024, 4096), (33, 65), (7, 3)], ids=str)
def test_dequantize(dtype, quant_type, blocksize, nested, shape):
    packed, state = _quantize(*shape, blocksize, quant_type, nested, dtype)
    out = quant.dequantize_4bit(packed, state, dtype)
    absmax = quant.functional.dequantize_absmax(state)
    expected = ref.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 16, 64, 256, 600])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 14336), (300, 96), (64, 32)], ids=str)
def test_matmul_all_paths(dtype, M, shape):
    """M=1 CUDA C++ or Triton GEMV, M<=4 Triton GEMV, tl.dot GEMM (split-K for small M), dequantize + GEMM."""
    N, K = shape
    for quant_type, nested, blocksize in [("nf4", True, 64), ("fp4", False, 128)]:
        packed, state = _quantize(N, K, blocksize, quant_type, nested)
        A = torch.randn(M, K, device=DEV, dtype=dtype)
        bias = torch.randn(N, device=DEV, dtype=dtype)
        for b in (None, bias):
            if nested:
                n = state.nested
                out = torch.ops.quant.gemm_4bit_nested(A, packed, [N, K], state.absmax, n.absmax, n.code, n.offset,
                                                       blocksize, n.blocksize, quant_type, b)
            else:
                out = quant.matmul_4bit(A, packed, state, b)
            _assert_close(out, _ref_matmul(A, packed, state, b), dtype, K)


@pytest.mark.parametrize("M", [1, 4, 16, 256])
def test_autotuned(monkeypatch, M):
    monkeypatch.setattr(_kt(), "AUTOTUNE", True)
    packed, state = _quantize(1024, 4096, nested=True)
    A = torch.randn(M, 4096, device=DEV, dtype=torch.bfloat16)
    for _ in range(2):  # the second call reuses the tuned config
        _assert_close(quant.matmul_4bit(A, packed, state), _ref_matmul(A, packed, state), torch.bfloat16, 4096)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=str)
def test_native_gemv_matches_triton(dtype, shape):
    from quantserve.kernels.cuda import build

    if build.unavailable_reason() is not None:
        pytest.skip(f"CUDA C++ kernels unavailable: {build.unavailable_reason()}")
    assert build.load(), build.describe()
    from quantserve.quant.backends import cuda as native
    from quantserve.quant.backends.triton import _code

    N, K = shape
    for nested in (False, True):
        packed, state = _quantize(N, K, nested=nested)
        x = torch.randn(1, K, device=DEV, dtype=dtype)
        bias = torch.randn(N, device=DEV, dtype=dtype)
        code = _code("nf4", x.device)
        nst = state.nested
        native_args = (nst.absmax, nst.code, nst.offset, nst.blocksize) if nested else None
        out = native.gemv_4bit(x, packed.view(-1), N, K, code, state.absmax, 64, bias, native_args)
        assert out is not None
        triton_out = _kt().gemm_4bit(x, packed.view(-1), N, K, code, state.absmax, 64, bias,
                                     _kt().Nested(*native_args) if nested else None)
        _assert_close(out, _ref_matmul(x, packed, state, bias), dtype, K)
        torch.testing.assert_close(out.float(), triton_out.float(), atol=1e-2, rtol=1e-2)


def test_opcheck_cuda_kernels():
    packed, state = _quantize(64, 128, nested=True, dtype=torch.float16)
    n = state.nested
    A = torch.randn(3, 128, device=DEV, dtype=torch.float16)
    absmax = quant.functional.dequantize_absmax(state)
    torch.library.opcheck(torch.ops.quant.gemm_4bit.default, (A, packed, [64, 128], absmax, 64, "nf4", None))
    torch.library.opcheck(torch.ops.quant.gemm_4bit_nested.default,
                          (A, packed, [64, 128], state.absmax, n.absmax, n.code, n.offset, 64, 256, "nf4", None))
    torch.library.opcheck(torch.ops.quant.dequantize_4bit.default,
                          (packed, absmax, 64, "nf4", [64, 128], torch.float16))


# --------------------------------------------------------------------------------------------
# against bitsandbytes' CUDA kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M", [1, 4, 16, 256])
def test_against_bitsandbytes_cuda(bnb, dtype, quant_type, nested, M):
    """bitsandbytes quantizes on the GPU; our kernels read its bytes and states and match its results."""
    import bitsandbytes.functional as BF

    N, K = 1024, 4096
    W = torch.randn(N, K, device=DEV, dtype=dtype)
    packed, bstate = BF.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    state = quant.QuantState.from_dict(bstate.as_dict(packed=True), device=DEV)
    ours_w = quant.dequantize_4bit(packed, state)
    theirs_w = BF.dequantize_4bit(packed, bstate)
    assert torch.equal(ours_w, theirs_w)  # -0.0 (bnb's FP4 code 8) equals +0.0
    A = torch.randn(M, K, device=DEV, dtype=dtype)
    with torch.inference_mode():
        ours = quant.matmul_4bit(A, packed, state)
        theirs = bnb.matmul_4bit(A, packed.t(), quant_state=bstate)
    _assert_close(ours, theirs.double(), dtype, K)


# --------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


@pytest.mark.parametrize("M", [1, 3, 16, 64])
def test_cuda_graph_capture_and_replay(M):
    N, K = 1024, 4096
    packed, state = _quantize(N, K, nested=True)
    layer_args = (packed, state)
    static_x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: autotuning, the CUDA extension build, the code tables
            quant.matmul_4bit(static_x, *layer_args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = quant.matmul_4bit(static_x, *layer_args)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(static_out, _ref_matmul(static_x, packed, state), torch.bfloat16, K)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer = quant.Linear4bit.from_linear(
        torch.nn.Linear(4096, 1024, device=DEV, dtype=torch.bfloat16), quant.QuantConfig(bnb_4bit_use_double_quant=True)
    ).to(DEV)
    x = torch.randn(2, 4096, device=DEV, dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x)
    torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)


def test_triton_op_compiles():
    """torch.compile traces into the quant_triton triton_ops (inductor sees the Triton kernels)."""
    torch._dynamo.reset()
    from quantserve.quant.backends.triton import _code

    packed, state = _quantize(1024, 4096)
    code = _code("nf4", torch.device(DEV))

    def f(x):
        return torch.ops.quant_triton.gemm_4bit(x, packed.view(-1), 1024, 4096, code, state.absmax, 64) * 2

    x = torch.randn(4, 4096, device=DEV, dtype=torch.bfloat16)
    out = torch.compile(f, fullgraph=True)(x)
    _assert_close(out / 2, _ref_matmul(x, packed, state), torch.bfloat16, 4096)
