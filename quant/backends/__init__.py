"""Kernel backends for the quant ops. Each module only registers kernels (see quant/ops.py).

- default: pure PyTorch, every device; the reference.
- cpu: native C++ kernels (built on first use, cached), falling back to the reference.
"""

from __future__ import annotations

import functools


@functools.cache
def load_backends() -> None:
    """Register every available backend once (idempotent)."""
    from . import cpu, default  # noqa: F401 - registration happens at import


def backend_report() -> dict[str, str]:
    """Backend name -> one line on whether it is active and why not."""
    from . import cpu

    load_backends()
    report = {"default": "pure PyTorch reference (all devices)"}
    status = getattr(cpu, "status", None)
    report["cpu"] = status() if callable(status) else "not built"
    return report
