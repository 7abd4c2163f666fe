"""GPU backend for the LLM.int8 ops: Triton kernels (kernels/triton/int8.py) registered for "cuda".

Registered only when quant.backends.triton registers (a GPU, and Triton importable); elsewhere
CUDA tensors use the pure-PyTorch reference. gemm_int8: the activations are quantized per row by
one kernel (the outlier columns found first by one torch pass), the int8 product and its epilogue
(+ bias) by a tl.dot kernel with int32 accumulation, then the outlier columns' 16-bit product is
added with torch's addmm, as bitsandbytes does. Rows are summed exactly in int32; the epilogue may
fuse a multiply-add, so GPU results can differ from the CPU's in the last bit.

int8_linear (the default, weight-only forward): one tl.dot kernel converting each int8 weight tile
to the activations' dtype in registers (exact), float32 accumulation, the row scale and bias in the
epilogue; float32 activations in IEEE float32 at torch's "highest" float32 matmul precision, TF32
otherwise (10-bit products: within the bf16 rounding "medium" allows).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import default as _ref
from . import triton as _triton
from ..ops import NAMESPACE

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _kernels():
    from quantserve.kernels.triton import int8

    return int8


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    if A.dtype not in _DTYPES or A.dim() == 0 or A.shape[-1] == 0:
        return _ref.int8_vectorwise_quant(A, threshold)
    A2 = A.reshape(-1, A.shape[-1]).contiguous()
    CA, SCA, mask = _kernels().int8_quantize_rows(A2, float(threshold), as_f16=False)
    return CA.reshape(A.shape), SCA, mask


def gemm_int8(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    N, K = CB.shape if CB.dim() == 2 else (0, 0)
    if A.dtype not in _DTYPES or CB.dtype != torch.int8 or SCB.dtype != torch.float32 or N == 0 or K == 0 \
            or A.dim() == 0 or A.shape[-1] != K or SCB.numel() != N \
            or (bias is not None and bias.numel() != N):
        return _ref.gemm_int8(A, CB, SCB, threshold, bias)
    kt = _kernels()
    A2 = A.reshape(-1, K).contiguous()
    CA, SCA, mask = kt.int8_quantize_rows(A2, float(threshold), as_f16=True)
    if bias is not None:
        bias = bias.to(A.dtype).contiguous()
    out = kt.int8_gemm(CA, CB.contiguous(), SCA, SCB.contiguous(), bias, A.dtype)
    if threshold > 0.0:
        # The outlier columns' product; argwhere waits for the mask (a data-dependent size), as
        # bitsandbytes' own outlier gathering does. An empty index set adds nothing.
        cols = torch.argwhere(mask).view(-1)
        sub_weight = _ref.int8_vectorwise_dequant(CB[:, cols].contiguous(), SCB).to(A.dtype).t()
        out = out.addmm(A2[:, cols], sub_weight)
    return out.reshape(*A.shape[:-1], N)


def int8_linear(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    N, K = CB.shape if CB.dim() == 2 else (0, 0)
    if A.dtype not in _DTYPES or CB.dtype != torch.int8 or SCB.dtype != torch.float32 or N == 0 or K == 0 \
            or A.dim() == 0 or A.shape[-1] != K or SCB.numel() != N \
            or (bias is not None and (bias.numel() != N or not bias.is_floating_point())):
        return _ref.int8_linear(A, CB, SCB, bias)
    A2 = A.reshape(-1, K).contiguous()
    if bias is not None:
        bias = bias.reshape(N).to(A.dtype).contiguous()
    # IEEE float32 products only matter (and only apply) for float32 activations.
    ieee = A.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    out = _kernels().int8_linear(A2, CB.contiguous(), SCB.contiguous(), bias, ieee)
    return out.reshape(*A.shape[:-1], N)


def _register() -> None:
    if "reason" in _triton._state:
        return
    for name, fn in {"int8_vectorwise_quant": int8_vectorwise_quant, "gemm_int8": gemm_int8,
                     "int8_linear": int8_linear}.items():
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda")(fn)


_register()
