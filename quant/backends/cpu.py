"""CPU backend: native C++ kernels (kernels/cpu/quant4_cpu.cpp) registered for the "cpu" device.

Each wrapper makes its inputs contiguous, allocates the outputs with torch and calls the library
on their data pointers. Whatever the native code does not handle (no C++ compiler on this machine,
an unusual dtype or size, arguments the reference would reject) goes to the pure-PyTorch reference
in `quant.backends.default`, which also raises the errors. The library is built on the first call;
a build that fails raises (kernels/cpu/build.py).

gemm_4bit runs a fused kernel that decodes the 4-bit weights on the fly (float32 FMAs, or bf16
dot products for bf16 activations on AVX-512-BF16 CPUs) and only ever reads the packed bytes.
float32 activations use the bf16 dot products too when torch's float32 matmul precision for oneDNN
(the CPU) allows bf16 (`torch.set_float32_matmul_precision("medium")`, or
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`), as torch's own float32 matmuls then do:
activations and decoded weights rounded to bf16, float32 sums and output; about twice the speed for
many rows, and each row's result independent of how many rows are in the call. For
what it declines (see gemm_impl in the C++ source: odd K, more than 256 bf16 rows where oneDNN's
bf16 GEMM is faster, no AVX2) it dequantizes once and calls torch's GEMM.
"""

from __future__ import annotations

import functools
from math import prod
from typing import Optional, Sequence

import torch

from quantserve.kernels.cpu import build
from quantserve.kernels.cpu.linear16 import bf16_products_allowed

from . import default as _ref
from ..codebooks import QUANT_TYPES, get_4bit_bounds, get_4bit_code
from ..ops import NAMESPACE

# The dtype codes of the 4-bit and int8 kernels' entry points (DT_F32, DT_F16, DT_BF16 in kernels/cpu/common.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_native = build.load  # the library, None without a C++ compiler; a failed build raises
status = build.describe  # one line for quant.backends.backend_report()


@functools.cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(15 float32 midpoints, 16 uint8 sorted-position -> code, 16 float32 code values), kept alive."""
    midpoints, order = get_4bit_bounds(quant_type)
    return midpoints.contiguous(), order.contiguous(), get_4bit_code(quant_type).contiguous()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    lib = _native()
    n = A.numel()
    nbytes = (n + 1) // 2
    if lib is None or A.dtype not in DTYPE_CODE or quant_type not in QUANT_TYPES or blocksize <= 0 or n == 0 \
            or nbytes % quant_storage.itemsize:
        return _ref.quantize_4bit(A, blocksize, quant_type, quant_storage)
    A = A.contiguous()
    midpoints, order, _ = _tables(quant_type)
    packed = torch.empty(nbytes, dtype=torch.uint8)
    absmax = torch.empty(_blocks(n, blocksize), dtype=torch.float32)
    rc = lib.q4_quantize(A.data_ptr(), DTYPE_CODE[A.dtype], n, blocksize, midpoints.data_ptr(), order.data_ptr(),
                         packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads())
    if rc:
        return _ref.quantize_4bit(A, blocksize, quant_type, quant_storage)
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1), absmax


def _dequantize_native(lib, A, absmax, blocksize, quant_type, shape, dtype) -> Optional[torch.Tensor]:
    n = prod(shape)
    if dtype not in DTYPE_CODE or quant_type not in QUANT_TYPES or absmax.dtype != torch.float32 \
            or blocksize <= 0 or n <= 0 or _nbytes(A) * 2 < n or absmax.numel() < _blocks(n, blocksize):
        return None
    A = A.contiguous()
    absmax = absmax.contiguous()
    out = torch.empty(shape, dtype=dtype)
    rc = lib.q4_dequantize(A.data_ptr(), absmax.data_ptr(), _tables(quant_type)[2].data_ptr(), n, blocksize,
                           out.data_ptr(), DTYPE_CODE[dtype], torch.get_num_threads())
    return None if rc else out


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    lib = _native()
    out = None if lib is None else _dequantize_native(lib, A, absmax, blocksize, quant_type, shape, dtype)
    return _ref.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) if out is None else out


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    lib = _native()
    N, K = (int(s) for s in shapeB) if len(shapeB) == 2 else (0, 0)
    if lib is None or A.dtype not in DTYPE_CODE or quant_type not in QUANT_TYPES or absmax.dtype != torch.float32 \
            or blocksize <= 0 or N <= 0 or K <= 0 or A.dim() == 0 or A.shape[-1] != K or A.numel() == 0 \
            or _nbytes(B) * 2 < N * K or absmax.numel() < _blocks(N * K, blocksize) \
            or (bias is not None and (bias.numel() != N or bias.dtype not in DTYPE_CODE)):
        return _ref.gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias)
    if bias is not None:
        bias = bias.to(A.dtype).contiguous()  # the reference adds the bias in A's dtype
    # Every tensor whose pointer is passed stays bound to a name until the call returns.
    A, B, absmax = A.contiguous(), B.contiguous(), absmax.contiguous()
    out = torch.empty((*A.shape[:-1], N), dtype=A.dtype)
    bf16_products = A.dtype == torch.float32 and bf16_products_allowed()
    rc = lib.q4_gemm(A.data_ptr(), DTYPE_CODE[A.dtype], A.numel() // K, K, B.data_ptr(), absmax.data_ptr(),
                     _tables(quant_type)[2].data_ptr(), N, blocksize, None if bias is None else bias.data_ptr(),
                     out.data_ptr(), int(bf16_products), torch.get_num_threads())
    if rc == 0:
        return out
    # Declined by the fused kernel: dequantize once, then torch's GEMM; float16 in float32 (torch's
    # float16 GEMM on CPU is slow).
    compute = torch.float32 if A.dtype == torch.float16 else A.dtype
    W = _dequantize_native(lib, B, absmax, blocksize, quant_type, (N, K), compute)
    if W is None:
        return _ref.gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias)
    out = torch.nn.functional.linear(A.to(compute), W, None if bias is None else bias.to(compute))
    return out.to(A.dtype)


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    lib = _native()
    n = A.numel()
    if lib is None or A.dtype != torch.uint8 or absmax.dtype != torch.float32 or code.dtype != torch.float32 \
            or code.numel() != 256 or dtype not in DTYPE_CODE or blocksize <= 0 or n == 0 \
            or absmax.numel() < _blocks(n, blocksize):
        return _ref.dequantize_blockwise(A, absmax, code, blocksize, dtype)
    A = A.contiguous()
    absmax = absmax.contiguous()
    code = code.contiguous()
    out = torch.empty(A.shape, dtype=dtype)
    rc = lib.q4_dequantize_blockwise(A.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize, out.data_ptr(),
                                     DTYPE_CODE[dtype], torch.get_num_threads())
    return _ref.dequantize_blockwise(A, absmax, code, blocksize, dtype) if rc else out


for _name, _fn in {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "gemm_4bit": gemm_4bit,
    "dequantize_blockwise": dequantize_blockwise,
}.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "cpu")(_fn)
