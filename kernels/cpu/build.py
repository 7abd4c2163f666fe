"""The one loader of kernels/cpu's C++ libraries: compile a source into a cached shared library and
load it with ctypes, once per process.

Every wrapper (quant4 here, int8.py, paged_attention.py, linear16.py, ...) declares one
`NativeLibrary` (its source, C signatures and ABI version) and calls its `load()`. This module
also declares quant4_cpu.cpp's (the 4-bit kernels behind quant/backends/cpu.py): `load()` and
`describe()` below are that library's.

The library lands in $QUANTSERVE_CACHE/kernels (default ~/.cache/quantserve/kernels) as
<source>-<hash>.so, the hash covering the source, the headers next to it (common.h), the compiler,
the flags and the machine type, so an edited source or header rebuilds and stale builds are never
loaded. It is compiled to a temporary file in that folder and renamed into place atomically: two
processes building at once both succeed and one of the identical results wins.

Failures are of two kinds:
- No C++ compiler on this machine: `load()` returns None and logs one line; callers then compute
  with torch. With QUANTSERVE_REQUIRE_NATIVE=1 (scripts/test.sh sets it) it raises BuildError.
- A compiler that fails to build the source, a library that does not load or has another ABI:
  `load()` raises BuildError with the compiler's output, on every call. A broken kernel is a bug to
  see, not a reason to run slower in silence.

No -march=native and no -ffast-math: the libraries must run on any x86-64 (they pick AVX-512 / AVX2
code per function at run time) and their quantize / dequantize results are bit-exact IEEE float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

from ..cache import cache_root

HERE = Path(__file__).parent
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared")
OPENMP_FLAG = "-fopenmp"
REQUIRE_ENV = "QUANTSERVE_REQUIRE_NATIVE"

_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """A native library that should have been built and loaded was not (the message says why)."""


def cache_dir() -> Path:
    """Where built libraries are kept: <cache root>/kernels (kernels/cache.py)."""
    return cache_root() / "kernels"


def native_required() -> bool:
    """QUANTSERVE_REQUIRE_NATIVE=1: a missing compiler is an error too (CI sets it)."""
    return os.environ.get(REQUIRE_ENV) == "1"


def find_compiler() -> Optional[str]:
    """$CXX if set, else the first of g++, c++, clang++ on PATH; None when there is none."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def library_path(cxx: str, flags: tuple[str, ...], source: Path) -> Path:
    """The cache path of `source` built by `cxx` with `flags`: a new source, header (*.h next to
    the source), compiler or flag set gets a new file, so edits rebuild and old builds never load."""
    key = hashlib.sha256()
    headers = sorted(source.parent.glob("*.h"))
    parts = [source.read_bytes(), *(h.name.encode() + b"\0" + h.read_bytes() for h in headers),
             cxx.encode(), " ".join(flags).encode(), platform.machine().encode()]
    for part in parts:
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build_source(cxx: str, source: Path, flags: tuple[str, ...]) -> Path:
    """Compile one C++ source into a cached shared library; BuildError with the compiler's output."""
    target = library_path(cxx, flags, source)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(source), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"{' '.join(cmd)} failed: {exc}") from exc
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeLibrary:
    """One C++ source, compiled on first use into the kernel cache and loaded with ctypes, once per
    process (thread-safe).

    source: a file name in kernels/cpu, or a path. signatures: {C function: (restype, argtypes)}.
    abi: (symbol, version) that must match, so a stale build never runs. fallback: what callers
    do without a compiler (for the log line). openmp: build with -fopenmp, and without it if that
    build fails (a compiler without OpenMP, e.g. clang without libomp, still gets single-threaded
    kernels). extra_flags: appended to the common flags.
    """

    def __init__(self, source: Union[str, Path], signatures: dict[str, tuple], abi: tuple[str, int],
                 fallback: str, openmp: bool = True, extra_flags: tuple[str, ...] = ()) -> None:
        self.source = HERE / source if isinstance(source, str) else source
        self.signatures = signatures
        self.abi_symbol, self.abi_version = abi
        self.fallback = fallback
        flags = BASE_FLAGS + extra_flags
        self.flag_sets = ((*flags, OPENMP_FLAG), flags) if openmp else (flags,)
        self.path: Optional[Path] = None
        self.error: Optional[str] = None  # why load() gives None (no compiler)
        self._lib: Optional[ctypes.CDLL] = None
        self._failure: Optional[BuildError] = None
        self._done = False
        self._lock = threading.Lock()

    def load(self) -> Optional[ctypes.CDLL]:
        """The library, built on first use; None when this machine has no C++ compiler (one log
        line). Raises BuildError when the build or load fails, or when there is no compiler and
        QUANTSERVE_REQUIRE_NATIVE=1."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._first_load()
                    self._done = True
        if self._failure is not None:
            raise self._failure
        return self._lib

    def _first_load(self) -> None:
        cxx = find_compiler()
        if cxx is None:
            self.error = "no C++ compiler found (set CXX or install g++)"
            if native_required():
                self._failure = BuildError(f"{self.source.name}: {self.error}, and {REQUIRE_ENV}=1 "
                                           "requires the native kernels")
            else:
                _log.warning("%s not built: %s; %s", self.source.name, self.error, self.fallback)
            return
        try:
            self.path = self._build(cxx)
            self._lib = self._open(self.path)
        except BuildError as exc:
            self._failure = exc
        except OSError as exc:  # the dynamic loader refused the file
            self._failure = BuildError(f"{self.path} does not load: {exc}")

    def _build(self, cxx: str) -> Path:
        first: Optional[BuildError] = None
        for flags in self.flag_sets:
            try:
                path = build_source(cxx, self.source, flags)
            except BuildError as exc:
                first = first or exc
                continue
            if first is not None:
                _log.warning("%s built with %s after the first flags failed: %s", self.source.name,
                             " ".join(flags), first)
            return path
        assert first is not None  # flag_sets is never empty
        raise first

    def _open(self, path: Path) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in self.signatures.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        found = getattr(lib, self.abi_symbol)()
        if found != self.abi_version:
            raise BuildError(f"{path} has ABI {found}, expected {self.abi_version}")
        return lib


# ------------------------------------------------------------------------------------------------
# quant4_cpu.cpp: the 4-bit quantize / dequantize / GEMM kernels (quant/backends/cpu.py).

SOURCE = HERE / "quant4_cpu.cpp"
ABI_VERSION = 2  # must equal q4_abi_version() in the source
ISA_NAMES = {0: "scalar", 1: "AVX2", 2: "AVX-512", 3: "AVX-512 + BF16"}

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "q4_abi_version": (_I, []),
    "q4_detected_isa": (_I, []),
    "q4_isa": (_I, []),
    "q4_set_isa_cap": (None, [_I]),
    # A, dtype, n, blocksize, midpoints[15], order[16], out bytes, absmax, threads
    "q4_quantize": (_I, [_P, _I, _L, _L, _P, _P, _P, _P, _I]),
    # packed, absmax, code[16], n, blocksize, out, dtype, threads
    "q4_dequantize": (_I, [_P, _P, _P, _L, _L, _P, _I, _I]),
    # codes (uint8), absmax, code[256], n, blocksize, out, dtype, threads
    "q4_dequantize_blockwise": (_I, [_P, _P, _P, _L, _L, _P, _I, _I]),
    # A, dtype, M, K, packed W, absmax, code[16], N, blocksize, bias or NULL, out, bf16 products, threads
    "q4_gemm": (_I, [_P, _I, _L, _L, _P, _P, _P, _L, _L, _P, _P, _I, _I]),
    "q4_has_bf16_products": (_I, []),
}

QUANT4 = NativeLibrary(SOURCE, _SIGNATURES, ("q4_abi_version", ABI_VERSION), "using the PyTorch reference")
load = QUANT4.load


def describe() -> str:
    """One line: the instruction set the 4-bit kernels use, or why they are not built."""
    lib = load()
    if lib is None:
        return f"unavailable ({QUANT4.error}); using the PyTorch reference"
    return f"native C++ kernels, {ISA_NAMES.get(lib.q4_isa(), '?')} ({QUANT4.path})"
