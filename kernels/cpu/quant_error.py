"""One-pass quantization error of a weight on CPU (quant_error.cpp, next to this file), for
server/loading/quant_stats.py: sum of squares of the original and of original - dequantized.

Built on first use by kernels/cpu/build.py: without a C++ compiler the functions return None and
the caller computes the same sums with torch; a failed build raises.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "qse_abi_version": (_I, []),
    "qse_error_4bit": (None, [_P, _P, _P, _P, _L, _L, _L, _P]),  # w, packed, absmax, code, n, blocksize, stride, out
    "qse_error_int8": (None, [_P, _P, _P, _L, _L, _L, _P]),  # w, CB, SCB, rows, cols, stride, out
}


_LIB = NativeLibrary("quant_error.cpp", _SIGNATURES, ("qse_abi_version", 2), "computing with torch",
                     openmp=False, extra_flags=("-ffp-contract=off",))
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def _ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def error_4bit(w: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               blocksize: int, stride: int = 1) -> Optional[tuple[float, float]]:
    """(sum w^2, sum (w - dequantized)^2) for w float32 [n], packed uint8 [(n+1)//2], absmax float32
    per block, code float32 [16], over every `stride`-th block; None when the kernel is unavailable
    or the tensors do not fit it."""
    if w.dtype != torch.float32 or packed.dtype != torch.uint8 or absmax.dtype != torch.float32 \
            or code.dtype != torch.float32 or not _ok(w, packed, absmax, code):
        return None
    n = w.numel()
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize) or code.numel() != 16:
        return None
    lib = load()
    if lib is None:
        return None
    out = (ctypes.c_double * 2)()
    lib.qse_error_4bit(w.data_ptr(), packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize, stride, out)
    return out[0], out[1]


def error_int8(w: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, stride: int = 1) -> Optional[tuple[float, float]]:
    """The same for an int8 weight: w float32 [rows, cols], CB int8 [rows, cols], SCB float32 [rows],
    over every `stride`-th row."""
    if w.dtype != torch.float32 or CB.dtype != torch.int8 or SCB.dtype != torch.float32 or CB.dim() != 2 \
            or w.numel() != CB.numel() or SCB.numel() != CB.shape[0] or not _ok(w, CB, SCB):
        return None
    lib = load()
    if lib is None:
        return None
    out = (ctypes.c_double * 2)()
    lib.qse_error_int8(w.data_ptr(), CB.data_ptr(), SCB.data_ptr(), CB.shape[0], CB.shape[1], stride, out)
    return out[0], out[1]
