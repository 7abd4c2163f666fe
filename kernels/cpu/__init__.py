"""Native CPU kernels for the 4-bit ops (quant4_cpu.cpp), compiled on first use and loaded with ctypes.

    lib = load()        # ctypes.CDLL; None without a C++ compiler; BuildError if the build fails
    describe()          # one line: which instruction set is used, or why the library is unavailable

Importing this package builds nothing; `load()` does, once per process (cached on disk across
processes, keyed by the sources, headers and compiler flags). See build.py, the one loader of
every library here.
"""

from .build import describe, load

__all__ = ["describe", "load"]
