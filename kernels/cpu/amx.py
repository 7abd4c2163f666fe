"""The 4-bit matmul on Intel AMX tiles (amx.cpp, next to this file), for the prompt rows of an
engine step: kernels/cpu/decode.cpp calls `qamx_gemm4` through a function pointer.

Built on first use by kernels/cpu/build.py (without a C++ compiler `load()` is None; a failed build
raises). `available()` is False there and on CPUs without AMX-BF16 (or where Linux refuses the tile
state), and callers then use quant4_cpu.cpp's kernel.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "qamx_abi_version": (_I, []),
    "qamx_available": (_I, []),
    # A (float32), M, K, packed W, absmax, code[16], N, blocksize, bias or NULL, out (float32), threads
    "qamx_gemm4": (_I, [_P, _L, _L, _P, _P, _P, _L, _L, _P, _P, _I]),
}

_LIB = NativeLibrary("amx.cpp", _SIGNATURES, ("qamx_abi_version", 1), "using the AVX-512 4-bit kernel for prompts")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def available() -> bool:
    """Whether this CPU (and the kernel's permission for tile data) runs the AMX kernel."""
    lib = load()
    return lib is not None and bool(lib.qamx_available())


def gemm4(A: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, int],
          blocksize: int, bias: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> Optional[torch.Tensor]:
    """A [M, K] float32 times the 4-bit weight (packed bytes, float32 absmax, 16-entry float32 code,
    (N, K)) with bf16 products and float32 sums -> [M, N] float32 (+ bias [N] float32). None when
    the kernel does not run here or declines the shape (K and blocksize multiples of 64)."""
    lib = load()
    N, K = shape
    if lib is None or A.dtype != torch.float32 or A.dim() != 2 or A.shape[1] != K:
        return None
    A, weight, absmax, code = A.contiguous(), weight.contiguous(), absmax.contiguous(), code.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    out = torch.empty(A.shape[0], N, dtype=torch.float32)
    rc = lib.qamx_gemm4(A.data_ptr(), A.shape[0], K, weight.data_ptr(), absmax.data_ptr(), code.data_ptr(), N,
                        blocksize, None if b is None else b.data_ptr(), out.data_ptr(),
                        torch.get_num_threads() if threads is None else threads)
    return None if rc else out
