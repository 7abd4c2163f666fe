"""Compile quant4_cpu.cpp into a cached shared library and load it with ctypes.

The library lands in $QUANTSERVE_CACHE/kernels (default ~/.cache/quantserve/kernels) as
quant4_cpu-<hash>.so, the hash covering the source, the compiler, the flags and the machine type,
so an edited source rebuilds and stale builds are never loaded. It is compiled to a temporary file
in that folder and renamed into place atomically: two processes building at once both succeed and
one of the identical results wins. Without a C++ compiler, or if the build or load fails, `load()`
logs one warning and returns None; callers then use the pure-PyTorch reference kernels.

No -march=native and no -ffast-math: the file must run on any x86-64 (it picks AVX-512 / AVX2 code
per function at run time) and its quantize / dequantize results are bit-exact IEEE float32.
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
from typing import Optional

from ..cache import cache_root

SOURCE = Path(__file__).with_name("quant4_cpu.cpp")
CXXFLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp")
# A compiler without OpenMP support (e.g. clang without libomp) still gets single-threaded kernels.
CXXFLAGS_NO_OPENMP = CXXFLAGS[:-1]
ABI_VERSION = 2  # must equal q4_abi_version() in the source
ISA_NAMES = {0: "scalar", 1: "AVX2", 2: "AVX-512", 3: "AVX-512 + BF16"}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": CDLL | None, "error": str | None, "path": Path

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_SIGNATURES = {
    # name: (restype, argtypes)
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


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where built libraries are kept: <cache root>/kernels (kernels/cache.py)."""
    return cache_root() / "kernels"


def find_compiler() -> Optional[str]:
    """$CXX if set, else the first of g++, c++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def library_path(cxx: str, flags: Optional[tuple[str, ...]] = None, source: Optional[Path] = None) -> Path:
    """The cache path of `source` (default: the quant kernels) built by `cxx` with `flags`: a new
    source, compiler or flag set gets a new file, so edits rebuild and old builds never load."""
    flags = CXXFLAGS if flags is None else flags
    source = SOURCE if source is None else source
    key = hashlib.sha256()
    for part in (source.read_bytes(), cxx.encode(), " ".join(flags).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """The path of the built library, compiling it if this source/compiler/flags has no build yet."""
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    try:
        return _build(cxx, CXXFLAGS)
    except BuildError as exc:
        try:
            path = _build(cxx, CXXFLAGS_NO_OPENMP)
        except BuildError:
            raise exc from None
        _log.warning("quant native CPU kernels built without OpenMP (single-threaded): %s", exc)
        return path


def _build(cxx: str, flags: tuple[str, ...]) -> Path:
    return build_source(cxx, SOURCE, flags)


class NativeLibrary:
    """One C++ source of kernels/cpu, compiled on first use into the kernel cache and loaded with
    ctypes, once per process (thread-safe). `load()` gives None when there is no compiler or the
    build or load fails (one warning saying what the caller falls back to): callers then compute
    the same with torch. `flag_sets` are tried in order (e.g. with OpenMP, then without); `abi` is
    the (symbol, version) pair that must match, so a stale build never runs."""

    def __init__(self, source: Path, flag_sets: tuple[tuple[str, ...], ...], signatures: dict[str, tuple],
                 abi: tuple[str, int], fallback: str) -> None:
        self.source, self.flag_sets, self.signatures = source, flag_sets, signatures
        self.abi_symbol, self.abi_version = abi
        self.fallback = fallback
        self.path: Optional[Path] = None
        self.error: Optional[str] = None
        self._lib: Optional[ctypes.CDLL] = None
        self._done = False
        self._lock = threading.Lock()

    def load(self) -> Optional[ctypes.CDLL]:
        if self._done:
            return self._lib
        with self._lock:
            if not self._done:
                try:
                    self.path = self._build()
                    lib = ctypes.CDLL(str(self.path))
                    for name, (restype, argtypes) in self.signatures.items():
                        getattr(lib, name).restype = restype
                        getattr(lib, name).argtypes = argtypes
                    found = getattr(lib, self.abi_symbol)()
                    if found != self.abi_version:
                        raise RuntimeError(f"{self.path} has ABI {found}, expected {self.abi_version}")
                    self._lib = lib
                except Exception as exc:  # noqa: BLE001 - any failure means: the caller's fallback
                    self.error = f"{type(exc).__name__}: {exc}"
                    _log.warning("%s unavailable, %s: %s", self.source.name, self.fallback, self.error)
                self._done = True
        return self._lib

    def _build(self) -> Path:
        cxx = find_compiler()
        if cxx is None:
            raise BuildError("no C++ compiler found (set CXX or install g++)")
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
        assert first is not None
        raise first


def build_source(cxx: str, source: Path, flags: tuple[str, ...]) -> Path:
    """Compile one C++ source into a cached shared library (the engine's kernels use this too)."""
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
            raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    if lib.q4_abi_version() != ABI_VERSION:
        raise BuildError(f"{path} has ABI {lib.q4_abi_version()}, expected {ABI_VERSION}")
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The native library (built on first use), or None with one warning logged if unavailable."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib, error = None, None
            try:
                path = build()
                _state["path"] = path
                lib = _open(path)
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference kernels
                error = f"{type(exc).__name__}: {exc}"
                _log.warning("quant native CPU kernels unavailable, using the PyTorch reference: %s", error)
            _state["error"] = error
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def describe() -> str:
    """One line: the instruction set the native kernels use, or why they are unavailable."""
    lib = load()
    if lib is None:
        return f"unavailable ({_state.get('error')}); using the PyTorch reference"
    return f"native C++ kernels, {ISA_NAMES.get(lib.q4_isa(), '?')} ({_state.get('path')})"
