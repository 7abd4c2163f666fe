"""Native CPU kernels for LLM.int8 (int8_cpu.cpp, next to this file): row-wise int8 quantization and
the int8 GEMM with activations quantized per row on the fly (AVX-512 VNNI / AVX2 / scalar, picked
at run time).

Built on first use by kernels/cpu/build.py: without a C++ compiler `load()` is None and the quant
ops use their pure-PyTorch reference; a failed build raises.
"""

from __future__ import annotations

import ctypes

from .build import NativeLibrary

ISA_NAMES = {0: "scalar", 1: "AVX2", 2: "AVX-512 VNNI"}


_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "i8_abi_version": (_I, []),
    "i8_detected_isa": (_I, []),
    "i8_isa": (_I, []),
    "i8_set_isa_cap": (None, [_I]),
    # A, dtype, M, K, threshold, as float16, CB, SCB, mask, threads
    "i8_quantize": (_I, [_P, _I, _L, _L, _D, _I, _P, _P, _P, _I]),
    # int32 acc, M, N, SCA, SCB, bias or NULL, out, dtype, threads
    "i8_epilogue": (_I, [_P, _L, _L, _P, _P, _P, _P, _I, _I]),
    # A, dtype, M, K, CB, SCB, N, threshold, bias or NULL, out, mask, threads
    "i8_gemm": (_I, [_P, _I, _L, _L, _P, _P, _L, _D, _P, _P, _P, _I]),
}


_LIB = NativeLibrary("int8_cpu.cpp", _SIGNATURES, ("i8_abi_version", 1), "using the PyTorch reference")
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def describe() -> str:
    """One line: the instruction set the int8 kernels use, or why they are unavailable."""
    lib = load()
    if lib is None:
        return f"unavailable ({_LIB.error}); using the PyTorch reference"
    return f"native C++ int8 kernels, {ISA_NAMES.get(lib.i8_isa(), '?')} ({_LIB.path})"
