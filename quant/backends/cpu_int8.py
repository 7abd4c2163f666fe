"""CPU backend for the LLM.int8 ops: native kernels (kernels/cpu/int8_cpu.cpp) registered for "cpu".

- int8_vectorwise_quant: one pass per row (absmax without the outliers, then the int8 codes).
- gemm_int8: the activations are quantized per row on the fly (through float16, as bitsandbytes),
  int8 x int8 -> int32 with AVX-512 VNNI (AVX2, scalar elsewhere) and the dequantizing epilogue
  (+ bias) fused; the outlier columns' 16-bit product is then added with torch's addmm, the very
  call bitsandbytes makes, so the result is identical to it byte for byte.
  From INT_MM_MIN_ROWS rows on AVX-512 CPUs the int32 product comes from torch._int_mm (oneDNN,
  AMX where the CPU has it) between the same native quantization and epilogue: one thread, a
  4096 x 4096 weight, Xeon with AMX: 8 rows 3.0 ms native vs 2.0 ms oneDNN, 1 row 0.7 vs 1.9 ms,
  256 rows 106 vs 13 ms. The integer sums are exact either way, so the result does not change.
- int8_linear (the default forward, weight-only), no float copy of the whole weight:
  below INT8_LINEAR_TILED_MIN_ROWS rows (decode) kernels/cpu/int8_linear.cpp widens the int8
  weight tiles to float32 in registers and multiplies the unquantized activations with AVX-512
  FMAs (float32 sums, the row scale applied once per output; batch-invariant); from that many rows
  on (prefill) the weight is dequantized by a native kernel one L2-sized tile of rows at a time
  (bnb's W = CB * (SCB / 127), one rounding; float32, or bf16/fp16 for 16-bit activations below
  the "highest" precision) into one reused buffer and multiplied by torch's GEMM, ~2.5x faster than
  the register kernel there (one thread, 256 x 576 @ 576 x 1536 on an AVX-512 Xeon: 4.6 vs 11.3 ms).
  At "highest" both are within float32 rounding of the dequantized matmul; at "medium" the GEMM
  may use bf16 products, as torch does for every float32 matmul.
Anything the native code does not take (no C++ compiler on this machine, odd dtypes or shapes)
goes to the reference in quant.backends.default, which also raises the errors.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from quantserve.kernels.cpu import int8 as _int8
from quantserve.kernels.cpu import int8_linear as _int8_linear

from . import default as _ref
from ..ops import NAMESPACE
from .cpu import DTYPE_CODE

INT_MM_MIN_ROWS = 8
INT8_LINEAR_TILED_MIN_ROWS = 16
INT8_LINEAR_TILE_BYTES = 1 << 20  # float32 bytes of one dequantized weight tile (stays in L2)


@functools.cache
def int_mm_available() -> bool:
    """Whether torch._int_mm has a fast CPU kernel here: oneDNN's, used on AVX-512 (and AMX) CPUs;
    elsewhere torch falls back to a scalar loop slower than our AVX2 kernel (bitsandbytes makes
    the same call)."""
    return hasattr(torch, "_int_mm") and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


_native = _int8.load  # the library, None without a C++ compiler; a failed build raises


def status() -> str:
    """One line for quant.backends.backend_report(): the default (weight-only) kernel, then the
    int8-activation ones."""
    return f"default forward: {_int8_linear.describe()}; int8 activations: {_int8.describe()}"


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    lib = _native()
    if lib is None or A.dtype not in DTYPE_CODE or A.dim() == 0 or A.shape[-1] == 0:
        return _ref.int8_vectorwise_quant(A, threshold)
    A = A.contiguous()
    K = A.shape[-1]
    M = A.numel() // K
    CB = torch.empty(A.shape, dtype=torch.int8)
    SCB = torch.empty(M, dtype=torch.float32)
    mask = torch.empty(K, dtype=torch.bool)
    rc = lib.i8_quantize(A.data_ptr(), DTYPE_CODE[A.dtype], M, K, float(threshold), 0, CB.data_ptr(),
                         SCB.data_ptr(), mask.data_ptr(), torch.get_num_threads())
    return _ref.int8_vectorwise_quant(A, threshold) if rc else (CB, SCB, mask)


def gemm_int8(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    lib = _native()
    N, K = CB.shape if CB.dim() == 2 else (0, 0)
    if lib is None or A.dtype not in DTYPE_CODE or CB.dtype != torch.int8 or SCB.dtype != torch.float32 \
            or N == 0 or K == 0 or A.dim() == 0 or A.shape[-1] != K or SCB.numel() != N \
            or (bias is not None and (bias.numel() != N or bias.dtype not in DTYPE_CODE)):
        return _ref.gemm_int8(A, CB, SCB, threshold, bias)
    # Every tensor whose pointer is passed stays bound to a name until the call returns.
    A2 = A.reshape(-1, K).contiguous()
    CB, SCB = CB.contiguous(), SCB.contiguous()
    if bias is not None:
        bias = bias.to(A.dtype).contiguous()  # bitsandbytes adds the bias in the activations' dtype
    M = A2.shape[0]
    out = torch.empty((M, N), dtype=A.dtype)
    mask = torch.empty(K, dtype=torch.bool)
    if M >= INT_MM_MIN_ROWS and int_mm_available():
        rc = _gemm_via_int_mm(lib, A2, CB, SCB, threshold, bias, out, mask)
    else:
        rc = lib.i8_gemm(A2.data_ptr(), DTYPE_CODE[A.dtype], M, K, CB.data_ptr(), SCB.data_ptr(), N,
                         float(threshold), None if bias is None else bias.data_ptr(), out.data_ptr(), mask.data_ptr(),
                         torch.get_num_threads())
    if rc:
        return _ref.gemm_int8(A, CB, SCB, threshold, bias)
    if threshold > 0.0 and bool(mask.any()):
        cols = torch.argwhere(mask).view(-1)
        sub_weight = _ref.int8_vectorwise_dequant(CB[:, cols].contiguous(), SCB).to(A.dtype).t()
        out = out.addmm(A2[:, cols], sub_weight)
    return out.reshape(*A.shape[:-1], N)


def _gemm_via_int_mm(lib, A2, CB, SCB, threshold, bias, out, mask) -> int:
    M, K = A2.shape
    N = CB.shape[0]
    threads = torch.get_num_threads()
    CA = torch.empty((M, K), dtype=torch.int8)
    SCA = torch.empty(M, dtype=torch.float32)
    rc = lib.i8_quantize(A2.data_ptr(), DTYPE_CODE[A2.dtype], M, K, float(threshold), 1, CA.data_ptr(),
                         SCA.data_ptr(), mask.data_ptr(), threads)
    if rc:
        return rc
    acc = torch._int_mm(CA, CB.t())
    return lib.i8_epilogue(acc.data_ptr(), M, N, SCA.data_ptr(), SCB.data_ptr(),
                           None if bias is None else bias.data_ptr(), out.data_ptr(), DTYPE_CODE[A2.dtype], threads)


def int8_linear(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None, portable: bool = False
) -> torch.Tensor:
    lib = _int8_linear.load()
    N, K = CB.shape if CB.dim() == 2 else (0, 0)
    if lib is None or A.dtype not in DTYPE_CODE or CB.dtype != torch.int8 or SCB.dtype != torch.float32 \
            or N == 0 or K == 0 or A.dim() == 0 or A.shape[-1] != K or SCB.numel() != N \
            or (bias is not None and (bias.numel() != N or not bias.is_floating_point())):
        return _ref.int8_linear(A, CB, SCB, bias)
    # Every tensor whose pointer is passed stays bound to a name until the call returns.
    A2 = A.reshape(-1, K).contiguous()
    CB, SCB = CB.contiguous(), SCB.contiguous()
    if bias is not None:
        bias = bias.reshape(N).to(A.dtype).contiguous()  # added in the activations' dtype, as F.linear
    if A2.shape[0] >= INT8_LINEAR_TILED_MIN_ROWS and not portable:
        return _int8_linear_tiled(lib, A2, CB, SCB, bias).to(A.dtype).reshape(*A.shape[:-1], N)
    out = torch.empty((A2.shape[0], N), dtype=A.dtype)
    rc = lib.i8l_linear(A2.data_ptr(), DTYPE_CODE[A.dtype], A2.shape[0], K, CB.data_ptr(), SCB.data_ptr(), N,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), int(portable),
                        torch.get_num_threads())
    if rc:
        return _ref.int8_linear(A, CB, SCB, bias)
    return out.reshape(*A.shape[:-1], N)


def _int8_linear_tiled(lib, A2: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, N] in A2's dtype = A2 @ (CB * SCB / 127).T (+ bias), the weight dequantized by the native
    kernel one tile of rows at a time (INT8_LINEAR_TILE_BYTES, a multiple of 64 rows) into one
    reused buffer, each tile multiplied by torch's GEMM. The tile and the GEMM are float32, except
    for 16-bit activations below the "highest" float32 matmul precision: then both are in the
    activations' dtype (one rounding of each weight to it, float32 sums inside the GEMM), as
    bitsandbytes' own dequantized-weight path computes."""
    M, K = A2.shape
    N = CB.shape[0]
    exact = A2.dtype == torch.float32 or torch.get_float32_matmul_precision() == "highest"
    dtype = torch.float32 if exact else A2.dtype
    x = A2.to(dtype)
    b = None if bias is None else bias.to(dtype)
    out = torch.empty((M, N), dtype=dtype)
    tile = min(N, max(64, INT8_LINEAR_TILE_BYTES // (4 * K) // 64 * 64))
    weight = torch.empty((tile, K), dtype=dtype)
    threads = torch.get_num_threads()
    for n0 in range(0, N, tile):
        n1 = min(N, n0 + tile)
        w = weight[: n1 - n0]
        if lib.i8l_dequant(CB[n0].data_ptr(), SCB[n0:].data_ptr(), n1 - n0, K, w.data_ptr(), DTYPE_CODE[dtype], 0,
                           threads):
            raise RuntimeError("i8l_dequant refused its arguments")
        out[:, n0:n1] = x @ w.t() if b is None else torch.addmm(b[n0:n1], x, w.t())
    return out


def _int8_linear_kernel(A, CB, SCB, bias=None):
    return int8_linear(A, CB, SCB, bias)


torch.library.register_kernel(f"{NAMESPACE}::int8_linear", "cpu")(_int8_linear_kernel)
for _name, _fn in {"int8_vectorwise_quant": int8_vectorwise_quant, "gemm_int8": gemm_int8}.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "cpu")(_fn)
