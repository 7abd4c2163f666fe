"""LLM.int8's default (weight-only) forward on CPU (int8_linear.cpp, next to this file): activations
in float32 / float16 / bfloat16 times an int8 weight with float32 row absmax, the int8 tiles widened
to float32 in registers (AVX-512 FMAs; a portable loop elsewhere), the result in the activations'
dtype. Never a float copy of the weight.

Built on first use by kernels/cpu/build.py: without a C++ compiler `load()` is None and the quant
op uses its PyTorch reference (dequantize + F.linear); a failed build raises.
"""

from __future__ import annotations

import ctypes

from .build import NativeLibrary

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "i8l_abi_version": (_I, []),
    "i8l_has_avx512": (_I, []),
    # A, dtype, M, K, CB, SCB, N, bias or NULL, out, force portable, threads
    "i8l_linear": (_I, [_P, _I, _L, _L, _P, _P, _L, _P, _P, _I, _I]),
    # CB, SCB, rows, K, out, dtype, force portable, threads
    "i8l_dequant": (_I, [_P, _P, _L, _L, _P, _I, _I, _I]),
}

_LIB = NativeLibrary("int8_linear.cpp", _SIGNATURES, ("i8l_abi_version", 2), "using the PyTorch reference")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def describe() -> str:
    """One line: the path the weight-only int8 kernel takes, or why it is unavailable."""
    lib = load()
    if lib is None:
        return f"unavailable ({_LIB.error}); using the PyTorch reference"
    return f"native weight-only int8, {'AVX-512 FMA' if lib.i8l_has_avx512() else 'portable'} ({_LIB.path})"
