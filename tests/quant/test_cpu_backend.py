"""The native CPU kernels (quant/backends/cpu.py, kernels/cpu/quant4_cpu.cpp) against the reference.

quantize_4bit / dequantize_4bit / dequantize_blockwise must equal the pure-PyTorch kernels of
quant/backends/default.py bit for bit (NaN compared by position); gemm_4bit within float
tolerance. Every instruction-set level this CPU has (scalar, AVX2, AVX-512, AVX-512-BF16) is run
by capping the level the library dispatches to.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import quantserve.quant as quant  # noqa: F401 - defines the ops and registers the backends
from quantserve.kernels.cpu import build
from quantserve.kernels.cpu.build import NativeLibrary
from quantserve.quant.backends import cpu
from quantserve.quant.backends import default as ref
from quantserve.quant.codebooks import get_dynamic_map

from ..native import require_native

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(1,), (2,), (7,), (96, 48), (33, 65), (3, 64), (64, 97), (4096 + 3,)]

LIB = require_native(cpu._native)
ISA_LEVELS = [0, 1, 2, 3][: LIB.q4_detected_isa() + 1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded by default: the small tensors here run on one thread anyway, and the
    reference's torch ops are much slower with threads when the machine is busy. Multi-threaded
    runs are tested explicitly below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ISA_LEVELS, ids=lambda level: build.ISA_NAMES[level])
def isa(request):
    """Run the test with the library capped at one instruction-set level."""
    LIB.q4_set_isa_cap(request.param)
    yield request.param
    LIB.q4_set_isa_cap(99)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions, and identical bits everywhere else (so -0.0 != 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan)
        actual, expected = actual[~nan], expected[~nan]
    assert torch.equal(_bits(actual), _bits(expected))


def _special_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values with blocks of zeros, NaN, +-inf, -0.0, subnormals and huge values mixed in."""
    x = torch.randn(n)
    x[:64] = 0.0  # an all-zero block (several, for small blocksizes)
    x[64:128] = -0.0
    x[130] = float("nan")
    x[200] = float("inf")
    x[260] = float("-inf")
    x[300:332] = torch.tensor([1e-40, -3e-39, 1e-45, -1e-45] * 8)  # float32 subnormals
    x[340:350] = 3e38
    x[400:464] = torch.tensor([1e-40, 0.0, -0.0, 2e-41] * 16)  # a block of only subnormals and zeros
    x[500:564] = 6e-5  # float16 subnormals in a float16 input
    x[-1] = float("nan")  # in the trailing partial block
    x[-3] = -0.0
    return x.to(dtype)


def _check_quantize(
    A: torch.Tensor, blocksize: int, quant_type: str, storage: torch.dtype = torch.uint8, out_dtypes=DTYPES
) -> None:
    """quantize_4bit, then dequantize_4bit of its result into each of out_dtypes, against the reference."""
    packed, absmax = cpu.quantize_4bit(A, blocksize, quant_type, storage)
    packed_ref, absmax_ref = ref.quantize_4bit(A, blocksize, quant_type, storage)
    assert packed.dtype == storage and packed.shape == packed_ref.shape
    assert torch.equal(packed.view(torch.uint8), packed_ref.view(torch.uint8))
    assert_bitwise_equal(absmax, absmax_ref)
    for dtype in out_dtypes:
        out = cpu.dequantize_4bit(packed_ref, absmax_ref, blocksize, quant_type, list(A.shape), dtype)
        expected = ref.dequantize_4bit(packed_ref, absmax_ref, blocksize, quant_type, list(A.shape), dtype)
        assert_bitwise_equal(out, expected)


def test_status_names_the_instruction_set():
    assert cpu.status().startswith(f"native C++ kernels, {build.ISA_NAMES[LIB.q4_isa()]} (")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_bitexact(isa, quant_type, dtype):
    for shape in SHAPES:
        A = torch.randn(shape, dtype=dtype) * 3
        for blocksize in BLOCKSIZES:
            _check_quantize(A, blocksize, quant_type, out_dtypes=[dtype])


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32, torch.int16])
def test_quant_storage(isa, storage):
    A = torch.randn(64, 96)
    for quant_type in ("nf4", "fp4"):
        _check_quantize(A, 64, quant_type, storage)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_special_values(isa, quant_type, dtype):
    for n in (4096 + 37, 1000):
        A = _special_values(n, dtype)
        for blocksize in (32, 64, 256):
            _check_quantize(A, blocksize, quant_type)
    # A trailing partial block of subnormals and zeros: its stored absmax is clamped to 1e-38.
    A = torch.zeros(100)
    A[70:80] = torch.tensor([1e-40, -2e-39, 0.0, -0.0, 1e-45] * 2)
    _check_quantize(A.to(dtype), 64, quant_type)
    # NaN anywhere in a block makes its absmax NaN and every code the largest sorted code.
    A = _special_values(1000, dtype)
    packed, absmax = cpu.quantize_4bit(A, 64, quant_type, torch.uint8)
    assert absmax[2].isnan() and not absmax[1].isnan()
    top = {"nf4": 15, "fp4": 3}[quant_type]
    assert torch.all(packed.view(-1)[64:96] == top * 17)
    assert absmax[0] == 0  # all-zero block: absmax 0, the zero code
    assert torch.all(packed.view(-1)[:32] == {"nf4": 0x77, "fp4": 0x00}[quant_type])


@pytest.mark.parametrize("blocksize", [1, 7, 33, 48, 100])
def test_unusual_blocksizes(isa, blocksize):
    """The op accepts any positive blocksize (quant.functional restricts it to 32..4096)."""
    for n in (1, 99, 1000):
        A = torch.randn(n)
        for quant_type in ("nf4", "fp4"):
            _check_quantize(A, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_any_bytes(isa, quant_type):
    """Every code, and absmax values whose products overflow, underflow or are NaN in 16 bits."""
    n = 64 * 40 + 17
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(math.ceil(n / 64)) * 10
    absmax[:8] = torch.tensor([0.0, float("nan"), float("inf"), 1e5, 7e4, 1e-6, 1e-40, 3e38])
    for dtype in DTYPES:
        for shape in ([n], [1, n]):
            out = cpu.dequantize_4bit(packed, absmax, 64, quant_type, shape, dtype)
            assert_bitwise_equal(out, ref.dequantize_4bit(packed, absmax, 64, quant_type, shape, dtype))


def test_dequantize_blockwise(isa):
    code = get_dynamic_map()
    A = torch.randint(0, 256, (300, 7), dtype=torch.uint8)
    absmax = torch.rand(math.ceil(A.numel() / 256)) * 3
    absmax[0] = float("nan")
    for dtype in DTYPES:
        for blocksize in (256, 64, 100):
            absmax_b = torch.rand(math.ceil(A.numel() / blocksize)) * 3
            out = cpu.dequantize_blockwise(A, absmax_b, code, blocksize, dtype)
            assert_bitwise_equal(out, ref.dequantize_blockwise(A, absmax_b, code, blocksize, dtype))
        out = cpu.dequantize_blockwise(A, absmax, code, 256, dtype)
        assert_bitwise_equal(out, ref.dequantize_blockwise(A, absmax, code, 256, dtype))


# gemm: tolerances relative to the largest output; the reference rounds the weight to A's dtype
# and lets torch's GEMM accumulate, ours accumulates in float32 (bf16 products on AVX-512-BF16).
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _check_gemm(x, W, blocksize, quant_type, bias):
    N, K = W.shape
    packed, absmax = ref.quantize_4bit(W, blocksize, quant_type, torch.uint8)
    out = cpu.gemm_4bit(x, packed, [N, K], absmax, blocksize, quant_type, bias)
    expected = ref.gemm_4bit(x, packed, [N, K], absmax, blocksize, quant_type, bias)
    assert out.dtype == x.dtype and out.shape == expected.shape
    scale = expected.float().abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=GEMM_TOL[x.dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_rows(isa, dtype):
    N = 40
    for K, blocksize in [(256, 64), (128, 32), (192, 128), (64, 4096)]:
        W = torch.randn(N, K)
        bias = torch.randn(N, dtype=dtype)
        for M in (1, 2, 3, 7, 16, 33, 64, 300):
            x = torch.randn(M, K, dtype=dtype)
            _check_gemm(x, W, blocksize, "nf4", bias if M % 2 else None)
        _check_gemm(torch.randn(5, K, dtype=dtype), W, blocksize, "fp4", bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_odd_shapes(isa, dtype):
    """K not a multiple of 32 or of the blocksize, odd N, 3-D and non-contiguous activations."""
    for N, K, blocksize in [(17, 96, 64), (8, 100, 64), (5, 33, 32), (3, 31, 64), (64, 4096 + 64, 128)]:
        W = torch.randn(N, K)
        bias = torch.randn(N)  # float32 bias: the kernel adds it in the activation dtype
        for M in (1, 3, 16):
            _check_gemm(torch.randn(M, K, dtype=dtype), W, blocksize, "nf4", bias)
        _check_gemm(torch.randn(2, 3, K, dtype=dtype), W, blocksize, "fp4", None)
        _check_gemm(torch.randn(K, 4, dtype=dtype).t(), W, blocksize, "nf4", bias)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_large_weight(threads):
    """The blocked paths (several K blocks and row panels) on a bigger layer, bf16 and fp32."""
    torch.set_num_threads(threads)
    W = torch.randn(96, 2048)
    for dtype in (torch.bfloat16, torch.float32):
        for M in (1, 5, 70):
            _check_gemm(torch.randn(M, 2048, dtype=dtype), W, 64, "nf4", torch.randn(96, dtype=dtype))


@pytest.fixture
def bf16_products():
    """torch's float32 matmul precision set to allow bf16 products on CPU, restored afterwards."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    yield
    torch.backends.mkldnn.matmul.fp32_precision = before


HAS_BF16_PRODUCTS = bool(LIB.q4_has_bf16_products())


def test_gemm_float32_with_bf16_products(isa, bf16_products):
    """With bf16 products allowed, float32 activations on an AVX-512-BF16 CPU give exactly the sums
    of bf16(x) * bf16(w) (float64 oracle; only float32 summation error left), not float32 products;
    at the AVX2 and AVX-512 levels the float32 kernels ignore the setting: the float32 result.

    The scalar level has no fused GEMM: every call is declined and runs torch's float32 linear on
    the dequantized weight, under the same setting. The ISA cap only reaches this library, not
    oneDNN, so that linear computes as torch does on the real CPU: float32 on CPUs without AMX,
    but with AMX (Sapphire Rapids and later) bf16 products from 7 rows up. So the scalar level
    must give torch's own result bit for bit, and that result one of the two oracles'."""
    assert cpu.bf16_products_allowed()
    N = 40
    for K, blocksize in [(256, 64), (192, 128), (1088, 64)]:
        W = torch.randn(N, K)
        packed, absmax = ref.quantize_4bit(W, blocksize, "nf4", torch.uint8)
        w = ref.dequantize_4bit(packed, absmax, blocksize, "nf4", [N, K], torch.float32)
        bias = torch.randn(N)
        for M in (1, 2, 3, 5, 9, 33, 300):
            x = torch.randn(M, K)
            out = cpu.gemm_4bit(x, packed, [N, K], absmax, blocksize, "nf4", bias)
            exact = x.double() @ w.double().T + bias.double()
            bf16 = x.bfloat16().double() @ w.bfloat16().double().T + bias.double()
            scale = exact.abs().max().item()
            if isa >= 3:
                torch.testing.assert_close(out.double(), bf16, rtol=0, atol=2e-6 * scale)
                assert (out.double() - exact).abs().max().item() > 1e-4 * scale  # the products were bf16
            elif isa >= 1:
                torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * scale)
            else:
                assert torch.equal(out, torch.nn.functional.linear(x, w, bias)), (K, M)
                # The two oracles are >1e-3 * scale apart, so this admits nothing in between.
                err_f32 = (out.double() - exact).abs().max().item()
                err_bf16 = (out.double() - bf16).abs().max().item()
                assert err_f32 <= 1e-5 * scale or err_bf16 <= 2e-6 * scale, (K, M, err_f32, err_bf16)


@pytest.mark.skipif(not HAS_BF16_PRODUCTS, reason="CPU without AVX-512-BF16")
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_bf16_products_batch_invariant(threads, bf16_products):
    """A row's result is the same bits whatever other rows share the call (the engine batches
    different requests together and must give each the result it would get alone)."""
    torch.set_num_threads(threads)
    N, K = 200, 1536
    W = torch.randn(N, K)
    packed, absmax = ref.quantize_4bit(W, 64, "nf4", torch.uint8)
    x = torch.randn(301, K)
    bias = torch.randn(N)
    alone = torch.cat([cpu.gemm_4bit(x[i : i + 1], packed, [N, K], absmax, 64, "nf4", bias) for i in range(x.shape[0])])
    for M in (2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 301):
        for start in (0, x.shape[0] - M):
            out = cpu.gemm_4bit(x[start : start + M], packed, [N, K], absmax, 64, "nf4", bias)
            assert torch.equal(out, alone[start : start + M]), (M, start)
    # bf16 activations take the same kernel (up to 256 rows, beyond which oneDNN is faster)
    xb = x[:256].bfloat16()
    alone = torch.cat([cpu.gemm_4bit(xb[i : i + 1], packed, [N, K], absmax, 64, "nf4", None) for i in range(256)])
    assert torch.equal(cpu.gemm_4bit(xb, packed, [N, K], absmax, 64, "nf4", None), alone)


def test_gemm_special_values():
    W = torch.randn(32, 128)
    W[3, 5] = float("nan")
    packed, absmax = ref.quantize_4bit(W, 64, "nf4", torch.uint8)
    x = torch.randn(4, 128)
    out = cpu.gemm_4bit(x, packed, [32, 128], absmax, 64, "nf4", None)
    expected = ref.gemm_4bit(x, packed, [32, 128], absmax, 64, "nf4", None)
    assert torch.equal(out.isnan(), expected.isnan()) and out[:, 3].isnan().all()


def test_results_do_not_depend_on_thread_count():
    """Large enough that every op splits its work across threads."""
    W = torch.randn(256, 1024)
    A = torch.randn(3, 256, 1024)
    packed, absmax = ref.quantize_4bit(W, 64, "nf4", torch.uint8)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append((
            *cpu.quantize_4bit(A, 64, "fp4", torch.uint8),
            cpu.dequantize_4bit(packed, absmax, 64, "nf4", [256, 1024], torch.bfloat16),
            cpu.gemm_4bit(A[0, :32].bfloat16(), packed, [256, 1024], absmax, 64, "nf4", None),
            cpu.gemm_4bit(A[0, :40], packed, [256, 1024], absmax, 64, "nf4", None),
            cpu.gemm_4bit(A[1, :1], packed, [256, 1024], absmax, 64, "nf4", None),
        ))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["quantize_4bit", "dequantize_4bit", "gemm_4bit", "dequantize_blockwise"])
def test_cpu_kernels_registered(op):
    """torch.ops.quant.* on CPU tensors run these kernels, not the CompositeExplicitAutograd ones."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quant::{op}", "CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    A = torch.randn(48, 96, dtype=dtype)
    for storage in (torch.uint8, torch.int16):
        torch.library.opcheck(torch.ops.quant.quantize_4bit.default, (A, 64, "fp4", storage))
    packed, absmax = cpu.quantize_4bit(A, 64, "nf4", torch.uint8)
    torch.library.opcheck(torch.ops.quant.dequantize_4bit.default, (packed, absmax, 64, "nf4", [48, 96], dtype))
    bias = torch.randn(48, dtype=dtype)
    for x in (torch.randn(1, 96, dtype=dtype), torch.randn(2, 5, 96, dtype=dtype)):
        for b in (None, bias):
            torch.library.opcheck(torch.ops.quant.gemm_4bit.default, (x, packed, [48, 96], absmax, 64, "nf4", b))
    q = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    torch.library.opcheck(
        torch.ops.quant.dequantize_blockwise.default, (q, torch.rand(4), get_dynamic_map(), 256, dtype)
    )


def test_builds_and_runs_without_openmp(tmp_path, monkeypatch):
    """A compiler without OpenMP (kernels/cpu/build.py then drops -fopenmp) still gets working,
    single-threaded 4-bit kernels from this source."""
    monkeypatch.setenv("QUANTSERVE_CACHE", str(tmp_path))
    native = NativeLibrary(build.SOURCE, build.QUANT4.signatures, ("q4_abi_version", build.ABI_VERSION), "",
                           openmp=False, extra_flags=("-O1",))  # -O1: a quicker build, the same results
    lib = native.load()
    out = torch.empty(100)
    packed = torch.randint(0, 256, (50,), dtype=torch.uint8)
    absmax = torch.rand(2)
    code = cpu._tables("nf4")[2]
    assert lib.q4_dequantize(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), 100, 64, out.data_ptr(), 0, 2) == 0
    assert_bitwise_equal(out, ref.dequantize_4bit(packed, absmax, 64, "nf4", [100], torch.float32))


def test_found_when_another_kernels_module_shadows_ours(tmp_path):
    """A kernels.py next to a script (e.g. a bench script) or the PyPI `kernels` package first on
    sys.path must not switch the native backend off."""
    (tmp_path / "kernels.py").write_text("SHADOW = True\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kernels; assert kernels.SHADOW; "
        "import torch; from quantserve.quant.backends import cpu; assert cpu._native() is not None, cpu.status(); "
        "print(cpu.status())"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "native" in proc.stdout
