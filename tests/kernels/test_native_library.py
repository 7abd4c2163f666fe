"""kernels/cpu/build.py, the one loader of the native CPU libraries: a real compiler builds real
sources here. A library builds once and is called; an edited source or header rebuilds; a broken
source, a wrong ABI or a missing compiler under QUANTSERVE_REQUIRE_NATIVE=1 raise BuildError with
the reason; only a machine without a compiler gets None (and one log line)."""

from __future__ import annotations

import ctypes
import logging
import os

import pytest

from quantserve.kernels.cpu import build
from quantserve.kernels.cpu.build import BuildError, NativeLibrary

from ..native import require_native

SIGNATURES = {"t_abi": (ctypes.c_int, []), "t_add": (ctypes.c_int, [ctypes.c_int, ctypes.c_int])}
SOURCE = 'extern "C" { int t_abi() { return %s; } int t_add(int a, int b) { return a + b; } }\n'

require_native(build.load)  # the tests below need a compiler


def _lib(tmp_path, monkeypatch, text: str, abi: int = 3, openmp: bool = False) -> NativeLibrary:
    monkeypatch.setenv("QUANTSERVE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "t.cpp"
    source.write_text(text)
    return NativeLibrary(source, SIGNATURES, ("t_abi", abi), "computing with torch", openmp=openmp)


def _cache_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "kernels").glob("*"))


def test_builds_once_and_calls(tmp_path, monkeypatch):
    native = _lib(tmp_path, monkeypatch, SOURCE % 3)
    lib = native.load()
    assert lib is not None and lib.t_add(2, 40) == 42
    assert native.load() is lib and native.error is None
    assert native.path.parent == tmp_path / "cache" / "kernels"
    assert _cache_files(tmp_path) == [native.path.name]


def test_broken_source_raises_with_the_compiler_output(tmp_path, monkeypatch):
    native = _lib(tmp_path, monkeypatch, "#error broken on purpose\n")
    with pytest.raises(BuildError, match="broken on purpose") as first:
        native.load()
    with pytest.raises(BuildError) as again:
        native.load()
    assert again.value is first.value  # one attempt per process
    assert _cache_files(tmp_path) == []  # no library, no temporary file left


def test_wrong_abi_raises(tmp_path, monkeypatch):
    native = _lib(tmp_path, monkeypatch, SOURCE % 2, abi=3)
    with pytest.raises(BuildError, match="has ABI 2, expected 3"):
        native.load()


def test_an_edited_header_rebuilds(tmp_path, monkeypatch):
    """The cache key covers the headers next to the source (kernels/cpu/common.h): after a header
    edit the new library is built and loaded, not the one built from the old header."""
    header = tmp_path / "abi.h"
    header.write_text("#define T_ABI 3\n")
    native = _lib(tmp_path, monkeypatch, '#include "abi.h"\n' + SOURCE % "T_ABI", abi=3)
    assert native.load().t_abi() == 3
    header.write_text("#define T_ABI 4\n")
    edited = NativeLibrary(native.source, SIGNATURES, ("t_abi", 4), "computing with torch", openmp=False)
    assert edited.load().t_abi() == 4
    assert edited.path != native.path and len(_cache_files(tmp_path)) == 2


def _without_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert build.find_compiler() is None


def test_no_compiler_gives_none_and_one_log_line(tmp_path, monkeypatch, caplog):
    native = _lib(tmp_path, monkeypatch, SOURCE % 3)
    _without_compiler(tmp_path, monkeypatch)
    monkeypatch.delenv(build.REQUIRE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert native.load() is None
        assert native.load() is None
    lines = [r.getMessage() for r in caplog.records if r.name == build.__name__]
    assert len(lines) == 1 and "t.cpp not built: no C++ compiler found" in lines[0], lines
    assert "computing with torch" in lines[0] and "no C++ compiler" in native.error


def test_no_compiler_raises_when_native_is_required(tmp_path, monkeypatch):
    native = _lib(tmp_path, monkeypatch, SOURCE % 3)
    _without_compiler(tmp_path, monkeypatch)
    monkeypatch.setenv(build.REQUIRE_ENV, "1")
    with pytest.raises(BuildError, match=r"no C\+\+ compiler found.*QUANTSERVE_REQUIRE_NATIVE=1 requires"):
        native.load()


def test_compiler_without_openmp_gets_the_single_threaded_build(tmp_path, monkeypatch, caplog):
    """A compiler that rejects -fopenmp (clang without libomp): the build without it is loaded,
    and the log says why."""
    real = build.find_compiler()
    fake = tmp_path / "cxx-without-openmp"
    fake.write_text('#!/bin/sh\n'
                    'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "fake: no OpenMP" >&2; exit 1; }; done\n'
                    f'exec "{real}" "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    native = _lib(tmp_path, monkeypatch, SOURCE % 3, openmp=True)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        lib = native.load()
    assert lib is not None and lib.t_add(1, 1) == 2
    assert "after the first flags failed" in caplog.text and "fake: no OpenMP" in caplog.text
    assert build.OPENMP_FLAG not in native.flag_sets[1] and os.path.exists(native.path)
