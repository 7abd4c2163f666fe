"""Kernel backends for the quant ops. Each module only registers kernels (see quant/ops.py).

- default: pure PyTorch, every device; the reference.
- cpu: native C++ kernels (built on first use, cached), falling back to the reference.
- cpu_int8: the LLM.int8 ops' native C++ kernels for "cpu" (AVX-512 VNNI / AVX2 / scalar).
- triton: Triton kernels for the "cuda" key (NVIDIA and ROCm), registered only when a GPU is present.
- cuda: the CUDA/HIP C++ batch-1 GEMV the Triton backend calls first (built on first use).
- triton_int8: the LLM.int8 ops' Triton kernels for "cuda", registered along with triton.
"""

from __future__ import annotations

import functools


@functools.cache
def load_backends() -> None:
    """Register every available backend once (idempotent)."""
    from . import cpu, cpu_int8, cuda, default, triton, triton_int8  # noqa: F401 - registration happens at import


def backend_report() -> dict[str, str]:
    """Backend name -> one line on whether it is active and why not."""
    from . import cpu, cpu_int8, cuda, triton

    load_backends()
    return {
        "default": "pure PyTorch reference (all devices)",
        "cpu": cpu.status(),
        "int8": cpu_int8.status(),
        "triton": triton.status(),
        "cuda": cuda.status(),
    }
