"""LLM.int8 projections for the decoder forward (fused_linear.FusedLinear): Linear8bitLt parts over one
input as one int8 matmul.

The parts' int8 rows (CB) and row scales (SCB) are concatenated: each output column depends only
on its own weight row, and the activations' quantization and outlier columns only on the input,
so the fused result is the parts' outputs side by side. The parts' weights and scales then become
views of the fused tensors (one copy in memory). The call is the quant op itself, with its
arguments prepared once; as in Linear8bitLt it computes in the input's dtype:
- default: torch.ops.quant.int8_linear, the dequantized-weight matmul with unquantized activations
  (exact to float rounding; on CPU a native kernel widening int8 weight tiles in registers);
- parts built with int8_activations (--int8-activations): torch.ops.quant.gemm_int8, LLM.int8's
  activation quantization and outlier columns, bitsandbytes' eval forward byte for byte.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import quantserve.quant as quant


class FusedInt8:
    """x -> cat([part(x) for part in linears], -1) for Linear8bitLt parts, in x's dtype."""

    def __init__(self, linears: list[nn.Module], bias: Optional[torch.Tensor]) -> None:
        first = linears[0]
        for m in linears:
            if not isinstance(m.weight, quant.Int8Params) or not m.weight.int8_quantized:
                raise NotImplementedError("Linear8bitLt is not quantized (or keeps float weights)")
            if (m.threshold, m.in_features, _int8_activations(m)) != \
                    (first.threshold, first.in_features, _int8_activations(first)):
                raise NotImplementedError(
                    "fused int8 linears must share the outlier threshold, int8_activations and input size")
        if len(linears) == 1:
            CB, SCB = first.weight.data, first.weight.SCB
        else:
            CB = torch.cat([m.weight.data for m in linears])
            SCB = torch.cat([m.weight.SCB for m in linears])
            offset = 0
            for m in linears:  # the parts become views of the fused tensors
                n = m.out_features
                m.weight.data = CB[offset : offset + n]
                m.weight.SCB = SCB[offset : offset + n]
                offset += n
        self.weight, self.SCB = CB.contiguous(), SCB.contiguous()
        self.threshold = float(first.threshold)
        self.int8_activations = _int8_activations(first)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_activations:
            return torch.ops.quant.gemm_int8(x, self.weight, self.SCB, self.threshold, self.bias)
        return torch.ops.quant.int8_linear(x, self.weight, self.SCB, self.bias)


def _int8_activations(module: nn.Module) -> bool:
    return bool(getattr(module, "int8_activations", False))
