"""Kernel backends for the quant ops. Each module only registers kernels (see quant/ops.py).

- default: pure PyTorch, every device; the reference.
- cpu: native C++ kernels (built on first use, cached), falling back to the reference.
- triton: Triton kernels for the "cuda" key (NVIDIA and ROCm), registered only when a GPU is present.
- cuda: the CUDA/HIP C++ batch-1 GEMV the Triton backend calls first (built on first use).
"""

from __future__ import annotations

import functools


@functools.cache
def load_backends() -> None:
    """Register every available backend once (idempotent)."""
    from . import cpu, cuda, default, triton  # noqa: F401 - registration happens at import


def backend_report() -> dict[str, str]:
    """Backend name -> one line on whether it is active and why not."""
    from . import cpu, cuda, triton

    load_backends()
    return {
        "default": "pure PyTorch reference (all devices)",
        "cpu": cpu.status(),
        "triton": triton.status(),
        "cuda": cuda.status(),
    }
