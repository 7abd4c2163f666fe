"""kernels/cpu/build.py's NativeLibrary, which the engine's C++ kernels (paged attention, the 16-bit
head, LLM.int8, the quantization error) load through: a real compiler builds real sources here."""

from __future__ import annotations

import ctypes
import logging

import pytest

from quantserve.kernels.cpu import build
from quantserve.kernels.cpu.build import NativeLibrary

SIGNATURES = {"t_abi": (ctypes.c_int, []), "t_add": (ctypes.c_int, [ctypes.c_int, ctypes.c_int])}
FLAGS = ("-O1", "-std=c++17", "-fPIC", "-shared")
SOURCE = 'extern "C" { int t_abi() { return %d; } int t_add(int a, int b) { return a + b; } }\n'

pytestmark = pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")


def _lib(tmp_path, monkeypatch, text: str, flag_sets=(FLAGS,), abi: int = 3) -> NativeLibrary:
    monkeypatch.setenv("QUANTSERVE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "t.cpp"
    source.write_text(text)
    return NativeLibrary(source, flag_sets, SIGNATURES, ("t_abi", abi), "computing with torch")


def test_builds_once_and_calls(tmp_path, monkeypatch):
    native = _lib(tmp_path, monkeypatch, SOURCE % 3)
    lib = native.load()
    assert lib is not None and lib.t_add(2, 40) == 42
    assert native.load() is lib and native.error is None
    assert native.path.parent == tmp_path / "cache" / "kernels"


@pytest.mark.parametrize("case", ["broken source", "wrong abi"])
def test_failure_is_none_and_one_warning(tmp_path, monkeypatch, caplog, case):
    text, abi = ("#error broken on purpose\n", 3) if case == "broken source" else (SOURCE % 2, 3)
    native = _lib(tmp_path, monkeypatch, text, abi=abi)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert native.load() is None
        assert native.load() is None  # one attempt per process
    warnings = [r.getMessage() for r in caplog.records if r.name == build.__name__]
    assert len(warnings) == 1 and "t.cpp unavailable, computing with torch" in warnings[0], warnings
    assert ("ABI 2, expected 3" in native.error) == (case == "wrong abi"), native.error


def test_falls_back_to_the_next_flags(tmp_path, monkeypatch, caplog):
    native = _lib(tmp_path, monkeypatch, SOURCE % 3, flag_sets=(FLAGS + ("-fno-such-flag",), FLAGS))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        lib = native.load()
    assert lib is not None and lib.t_add(1, 1) == 2
    assert "after the first flags failed" in caplog.text
