"""Native CPU kernels for the 4-bit ops (quant4_cpu.cpp), compiled on first use and loaded with ctypes.

    lib = load()        # ctypes.CDLL, or None when no compiler / the build failed (one warning logged)
    describe()          # one line: which instruction set is used, or why the library is unavailable

Importing this package builds nothing; `load()` does, once per process (cached on disk across
processes, keyed by the source and the compiler flags). See build.py.
"""

from .build import describe, load

__all__ = ["describe", "load"]
