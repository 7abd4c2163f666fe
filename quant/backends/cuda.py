"""The CUDA C++ batch-1 GEMV (kernels/cuda) behind the "cuda"-key matmul kernels of quant/backends/triton.py.

A device key holds one kernel per op, so this module registers nothing itself: the kernels
registered in triton.py ask `gemv_4bit()` first for single-row activations and use Triton when it
returns None (no GPU toolkit or ninja, a failed build, an unsupported shape, dtype or alignment).
The extension is built on the first call that could use it (cached on disk across processes,
see kernels/cuda/build.py); importing this module is cheap and builds nothing.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _build():
    try:
        from quantserve.kernels.cuda import build
    except ImportError:  # an unrelated top-level "kernels" package shadows ours
        return None
    return build


def _loaded() -> bool:
    build = _build()
    return build is not None and build.load()


def status() -> str:
    """One line for quant.backends.backend_report()."""
    build = _build()
    return "unavailable (kernels.cuda not importable)" if build is None else build.describe()


def supported(x: torch.Tensor, N: int, K: int, blocksize: int) -> bool:
    """Shapes the kernel handles: one row, K % 32 == 0 (rows start on a 16-byte chunk), blocksize >= 32."""
    return (
        x.shape[0] == 1 and x.dtype in _DTYPES and K % 32 == 0 and K > 0 and N > 0 and blocksize >= 32
        and x.is_contiguous() and x.data_ptr() % 16 == 0
    )


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    N: int,
    K: int,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    bias: Optional[torch.Tensor] = None,
    nested: Optional[tuple[torch.Tensor, torch.Tensor, float, int]] = None,
) -> Optional[torch.Tensor]:
    """[1, N] = x [1, K] @ W.T (+ bias) with the native kernel, or None if it cannot run this call.

    packed: the weight's bytes as contiguous uint8; code: float32 [16] on x's device; absmax float32,
    or uint8 codes with nested = (nested_absmax, nested_code, offset, nested_blocksize).
    """
    if not supported(x, N, K, blocksize) or packed.data_ptr() % 16 or not _loaded():
        return None
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    if nested is None:
        return torch.ops.quant_cuda.gemv_4bit(x, packed, code, absmax, None, None, 0.0, N, blocksize, 256, bias)
    nested_absmax, nested_code, offset, nested_blocksize = nested
    return torch.ops.quant_cuda.gemv_4bit(
        x, packed, code, absmax, nested_absmax, nested_code, float(offset), N, blocksize, nested_blocksize, bias
    )
