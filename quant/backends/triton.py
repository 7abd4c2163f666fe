"""GPU kernels for the "cuda" device key (NVIDIA, and AMD through ROCm, which torch also calls "cuda").

Registered only when torch sees a GPU and Triton imports; on a CPU-only machine importing this
module costs one torch.cuda.is_available() call and registers nothing (CUDA tensors would then
use the pure-PyTorch reference).

Kernels (kernels/triton, launched through kernels.triton.ops):
- dequantize_4bit: Triton, any shape.
- gemm_4bit, gemm_4bit_nested (absmax double-quantized, decoded in the kernel):
  one row -> the CUDA C++ GEMV (quant/backends/cuda.py) when it is built, else Triton;
  up to DEQUANT_GEMM_MIN_ROWS - 1 rows -> fused Triton GEMV (M <= 4) or tl.dot GEMM;
  more rows (prefill) -> Triton dequantize into the activation dtype + torch's GEMM (cuBLAS /
  hipBLASLt), which beats a fused kernel once the GEMM is compute-bound.
  Weights the fused kernels do not handle (K odd, or K neither a multiple nor a divisor of the
  blocksize) also take dequantize + GEMM.
Anything else (an unknown quant_type or dtype) goes to the reference, which raises the errors.
Every path is asynchronous and CUDA-graph capturable once warmed up (the first call for a new
shape autotunes, the first batch-1 call may build the CUDA extension).
"""

from __future__ import annotations

import functools
import importlib.util
from math import prod
from typing import Optional, Sequence

import torch

from . import default as _ref
from ..codebooks import QUANT_TYPES, get_4bit_code
from ..ops import NAMESPACE
from . import cuda as _native

DEQUANT_GEMM_MIN_ROWS = 512
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_state: dict[str, str] = {}


@functools.cache
def _kernels():
    from quantserve.kernels.triton import ops

    return ops


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 table on `device`, made once (a per-call copy would sync and break graphs)."""
    return get_4bit_code(quant_type, device)


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed.contiguous().reshape(-1).view(torch.uint8)


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    n = prod(shape)
    if quant_type not in QUANT_TYPES or dtype not in _DTYPES or absmax.dtype != torch.float32 or blocksize < 2 \
            or blocksize & (blocksize - 1) or A.numel() * A.element_size() * 2 < n:
        return _ref.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    out = _kernels().dequantize_4bit(_bytes(A), n, _code(quant_type, A.device), absmax.contiguous(), blocksize, dtype)
    return out.reshape(shape)


def _matmul(A, B, shapeB, absmax, blocksize, quant_type, bias, nested):
    """A @ dequant(B).T (+ bias) in A's dtype; nested = (nested_absmax, nested_code, offset, nested_blocksize)."""
    kt = _kernels()
    N, K = (int(s) for s in shapeB)
    x = A.reshape(-1, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    code = _code(quant_type, A.device)
    packed = _bytes(B)
    if bias is not None:
        bias = bias.to(A.dtype)  # the reference adds the bias in the activation dtype too
    nested_args = None if nested is None else kt.Nested(*nested)
    out = None
    if M == 1:
        out = _native.gemv_4bit(x, packed, N, K, code, absmax, blocksize, bias, nested)
    if out is None and M < DEQUANT_GEMM_MIN_ROWS and kt.matmul_supported(N, K, blocksize):
        out = kt.gemm_4bit(x, packed, N, K, code, absmax, blocksize, bias, nested_args)
    if out is None:
        W = kt.dequantize_4bit(packed, N * K, code, absmax, blocksize, A.dtype, nested_args).view(N, K)
        out = torch.nn.functional.linear(x, W, bias)
    return out.reshape(*A.shape[:-1], N)


def _matmul_ok(A, B, shapeB, blocksize, quant_type) -> bool:
    return (
        A.dtype in _DTYPES and quant_type in QUANT_TYPES and len(shapeB) == 2 and A.shape[-1] == shapeB[1]
        and blocksize >= 2 and not blocksize & (blocksize - 1)
        and B.numel() * B.element_size() * 2 >= shapeB[0] * shapeB[1]
    )


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if not _matmul_ok(A, B, shapeB, blocksize, quant_type) or absmax.dtype != torch.float32:
        return _ref.gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias)
    return _matmul(A, B, shapeB, absmax.contiguous(), blocksize, quant_type, bias, None)


def gemm_4bit_nested(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if not _matmul_ok(A, B, shapeB, blocksize, quant_type) or absmax.dtype != torch.uint8 \
            or nested_absmax.dtype != torch.float32 or nested_code.dtype != torch.float32 \
            or nested_blocksize < 1 or nested_blocksize & (nested_blocksize - 1):
        return _ref.gemm_4bit_nested(A, B, shapeB, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, quant_type, bias)
    nested = (nested_absmax.contiguous(), nested_code.contiguous(), float(offset), int(nested_blocksize))
    return _matmul(A, B, shapeB, absmax.contiguous(), blocksize, quant_type, bias, nested)


def _unavailable_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA or ROCm GPU visible"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        _kernels()
    except ImportError as exc:  # triton too old, or an unrelated "kernels" package shadows ours
        return f"kernels.triton not importable ({exc})"
    return None


def status() -> str:
    """One line for quant.backends.backend_report()."""
    if "reason" in _state:
        return f"unavailable ({_state['reason']})"
    return f"Triton kernels registered for 'cuda'; batch-1 CUDA C++ GEMV: {_native.status()}"


def _register() -> None:
    reason = _unavailable_reason()
    if reason is not None:
        _state["reason"] = reason
        return
    for name, fn in {
        "dequantize_4bit": dequantize_4bit,
        "gemm_4bit": gemm_4bit,
        "gemm_4bit_nested": gemm_4bit_nested,
    }.items():
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda")(fn)


_register()
