"""Rounding-error bounds from the oracle's side, for kernels compared with a float64 oracle.

A sum of n terms computed in a floating-point format of unit roundoff u, in any order and with or
without fused multiply-adds, is within gamma(n) * sum |term| of the exact sum, gamma(n) = n u / (1 -
n u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1). The bound depends only
on the length of the reduction and the magnitude of its terms, never on a kernel's measured error;
a bug that changes a term (an index, a scale, a mask) lands far outside it.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n for sums of n terms accumulated in `dtype`."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, f"{n} terms in {dtype}: no bound"
    return nu / (1 - nu)


def matmul_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - a @ b| for a [..., n] @ b [n, m] with sums in `dtype`:
    gamma(n) * (|a| @ |b|), in float64."""
    return gamma(a.shape[-1], dtype) * (a.double().abs() @ b.double().abs())
