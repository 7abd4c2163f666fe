"""Kernel backends for the quant ops. Each module only registers kernels (see quant/ops.py).

- default: pure PyTorch, every device; the reference.
- cpu: native C++ kernels (built on first use, cached) with the pure-PyTorch path as fallback.
"""

from __future__ import annotations

import functools


@functools.cache
def load_backends() -> None:
    """Register every available backend once (idempotent)."""
    from . import cpu, default  # noqa: F401 - registration happens at import
