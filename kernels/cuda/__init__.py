"""CUDA C++ kernels (batch-1 4-bit GEMV), built on first use with torch.utils.cpp_extension.

    load()       True once torch.ops.quant_cuda.gemv_4bit is registered (builds and caches it the
                 first time); False, with one warning logged, where it cannot be built.
    describe()   one line: built, not built yet, or why unavailable

Importing this package imports nothing heavy and builds nothing. See build.py.
"""

from .build import describe, load

__all__ = ["describe", "load"]
