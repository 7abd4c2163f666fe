"""Public LLM.int8 functions, mirroring bitsandbytes.functional: validate, then call the ops.

    CB, SCB, outlier_cols = int8_vectorwise_quant(W)        # int8 rows, float32 row absmax
    W_hat = int8_vectorwise_dequant(CB, SCB)                # float32, CB * SCB / 127
    y = int8_matmul(x, CB, SCB, bias)                       # Linear8bitLt's forward: x @ W_hat.T + bias
    y = int8_matmul(x, CB, SCB, bias, threshold=6.0, int8_activations=True)  # LLM.int8 proper (opt-in)

Same bytes as bitsandbytes 0.50 (the format is described in quant/ops.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops as _ops  # noqa: F401 - defines the op schemas
from .backends import load_backends
from .functional import FLOAT_DTYPES, _check_float_tensor

load_backends()


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0 turns the outlier decomposition off), got {threshold!r}")
    return float(threshold)


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize each row of A to int8 with its absmax (LLM.int8), as bitsandbytes does.

    Args:
        A: float32/float16/bfloat16 tensor; rows are all dimensions but the last. (bitsandbytes
            takes 2-D tensors; for 2-D inputs the results are identical.)
        threshold: > 0 holds back the outliers: elements with |a| >= threshold are left out of
            their row's absmax, and each column holding one is zero in the result.

    Returns:
        (CB int8 of A's shape, SCB float32 [rows] row absmax, outlier_cols): outlier_cols is None
        when threshold is 0, else the int64 indices of the outlier columns (possibly empty).
    """
    _check_float_tensor("A", A)
    threshold = _check_threshold(threshold)
    if A.dim() == 0 or A.shape[-1] == 0:
        raise ValueError(f"A must have a non-empty last dimension, got shape {tuple(A.shape)}")
    CB, SCB, mask = torch.ops.quant.int8_vectorwise_quant(A.contiguous(), threshold)
    outlier_cols = torch.argwhere(mask).view(-1) if threshold > 0.0 else None
    return CB, SCB, outlier_cols


def _check_weight(CB: torch.Tensor, SCB: torch.Tensor) -> None:
    if not isinstance(CB, torch.Tensor) or CB.dtype != torch.int8 or CB.dim() != 2:
        raise TypeError(f"CB must be a 2-D int8 tensor (out_features, in_features), got {_describe(CB)}")
    if not isinstance(SCB, torch.Tensor) or SCB.dtype != torch.float32 or SCB.shape != (CB.shape[0],):
        raise TypeError(f"SCB must be float32 of shape ({CB.shape[0]},), got {_describe(SCB)}")


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def int8_vectorwise_dequant(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """Undo `int8_vectorwise_quant`: float32 CB * SCB[row] / 127 (times the float32 reciprocal)."""
    if not isinstance(CB, torch.Tensor) or CB.dtype != torch.int8 or CB.dim() == 0:
        raise TypeError(f"CB must be an int8 tensor, got {_describe(CB)}")
    rows = CB.numel() // CB.shape[-1] if CB.shape[-1] else 0
    if not isinstance(SCB, torch.Tensor) or SCB.dtype != torch.float32 or SCB.numel() != rows:
        raise TypeError(f"SCB must be float32 with one value per row ({rows}), got {_describe(SCB)}")
    return torch.ops.quant.int8_vectorwise_dequant(CB, SCB)


def int8_matmul(
    A: torch.Tensor,
    CB: torch.Tensor,
    SCB: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    int8_activations: bool = False,
) -> torch.Tensor:
    """A @ W.T + bias for an int8 W = (CB, SCB) of shape (out_features, in_features).

    Default (int8_activations=False): the activations are not quantized; the result is the
    dequantized-weight matmul A @ (CB * SCB / 127).T within float rounding (quant op int8_linear),
    as bitsandbytes' CPU MatMul8bitFp computes it. `threshold` does not matter there (every column
    is already computed in float).

    int8_activations=True: LLM.int8 proper, bitsandbytes' Linear8bitLt inference forward byte for
    byte (quant op gemm_int8): the activations are quantized per row on the fly (via float16);
    with threshold > 0 the input columns holding any |a| >= threshold are multiplied in A's dtype
    against the dequantized weight columns instead and added to the int8 result. Faster on CPUs
    with int8 dot products (VNNI / AMX) for many rows; ~0.5-0.9% relative error per matmul.
    The result is in A's dtype either way.
    """
    _check_float_tensor("A", A)
    _check_weight(CB, SCB)
    threshold = _check_threshold(threshold)
    if A.dim() == 0 or A.shape[-1] != CB.shape[1]:
        raise ValueError(f"A has {A.shape[-1] if A.dim() else 0} input features, the weight expects {CB.shape[1]}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES or bias.shape != (CB.shape[0],):
            raise ValueError(f"bias must be a float tensor of shape ({CB.shape[0]},), got {_describe(bias)}")
    if int8_activations:
        return torch.ops.quant.gemm_int8(A, CB, SCB, threshold, bias)
    return torch.ops.quant.int8_linear(A, CB, SCB, bias)
