"""The one way a test gets a native CPU library (kernels/cpu): `lib = require_native(module.load)`.

kernels/cpu/build.py's `load()` returns None only when this machine has no C++ compiler; a compiler
that fails to build raises BuildError (the test fails with the compiler's output), and with
QUANTSERVE_REQUIRE_NATIVE=1 (scripts/test.sh, CI) a missing compiler raises too. So a native test
skips only where there is nothing to build with.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import pytest

T = TypeVar("T")


def require_native(load: Callable[[], Optional[T]]) -> T:
    """load()'s library, or skip the calling test (or module, at import) when there is no compiler."""
    lib = load()
    if lib is None:
        pytest.skip("no C++ compiler on this machine (set QUANTSERVE_REQUIRE_NATIVE=1 to fail instead)",
                    allow_module_level=True)
    return lib
