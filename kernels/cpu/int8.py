"""Native CPU kernels for LLM.int8 (int8_cpu.cpp, next to this file): row-wise int8 quantization and
the int8 GEMM with activations quantized per row on the fly (AVX-512 VNNI / AVX2 / scalar, picked
at run time).

Built on first use with kernels/cpu/build.py's compiler and flags into the same cache folder
($QUANTSERVE_CACHE/kernels), keyed by source, compiler and flags, and loaded with ctypes. Without a
compiler, or if the build fails, `load()` returns None (one warning logged) and the quant ops use
their pure-PyTorch reference.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("int8_cpu.cpp")
ABI_VERSION = 1  # must equal i8_abi_version() in the source
ISA_NAMES = {0: "scalar", 1: "AVX2", 2: "AVX-512 VNNI"}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}

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


def _build() -> Path:
    from .build import CXXFLAGS, CXXFLAGS_NO_OPENMP, BuildError, build_source, find_compiler

    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    try:
        return build_source(cxx, SOURCE, CXXFLAGS)
    except BuildError as exc:
        try:
            path = build_source(cxx, SOURCE, CXXFLAGS_NO_OPENMP)
        except BuildError:
            raise exc from None
        _log.warning("int8 CPU kernels built without OpenMP (single-threaded): %s", exc)
        return path


def load() -> Optional[ctypes.CDLL]:
    """The library (built on first use), or None if it cannot be built or loaded."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib, error = None, None
            try:
                path = _build()
                _state["path"] = path
                lib = ctypes.CDLL(str(path))
                for name, (restype, argtypes) in _SIGNATURES.items():
                    getattr(lib, name).restype = restype
                    getattr(lib, name).argtypes = argtypes
                if lib.i8_abi_version() != ABI_VERSION:
                    raise RuntimeError(f"{path} has ABI {lib.i8_abi_version()}, expected {ABI_VERSION}")
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference kernels
                error = f"{type(exc).__name__}: {exc}"
                _log.warning("int8 native CPU kernels unavailable, using the PyTorch reference: %s", error)
                lib = None
            _state["error"] = error
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def describe() -> str:
    """One line: the instruction set the int8 kernels use, or why they are unavailable."""
    lib = load()
    if lib is None:
        return f"unavailable ({_state.get('error')}); using the PyTorch reference"
    return f"native C++ int8 kernels, {ISA_NAMES.get(lib.i8_isa(), '?')} ({_state.get('path')})"
