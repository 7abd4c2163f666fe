"""Fused linears of the decoder forward: q/k/v and gate/up each as one matmul over the same input."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant.functional import dequantize_absmax

from .int8_linear import FusedInt8


def gemm_4bit(x: torch.Tensor, weight: torch.Tensor, op_args: tuple, bias: Optional[torch.Tensor],
              compute_dtype: torch.dtype) -> torch.Tensor:
    """The native path's 4-bit matmul: the quant op (torch.ops.quant.gemm_4bit, the op contract)
    with arguments prepared once. As Linear4bit.forward: computes in compute_dtype, returns x's dtype."""
    if x.dtype == compute_dtype:
        return torch.ops.quant.gemm_4bit(x, weight, *op_args, bias)
    return torch.ops.quant.gemm_4bit(x.to(compute_dtype), weight, *op_args, bias).to(x.dtype)


class FusedLinear:
    """One or several linears over the same input as one matmul: cat([l(x) for l in linears]).

    4-bit: the packed bytes and (float32) absmax of the parts are concatenated; valid because
    each part's element count is a multiple of the block size, so no block spans two parts.
    The parts' weights and states are then views of the fused tensors, so the model holds one
    copy; a double-quantized absmax is decoded to float32 once (the op takes float32), and the
    parts' states use the decoded one: double quantization saves memory on disk and at load,
    not while serving on this path (server/api/memory.py reports what is resident).
    The matmul calls the quant op directly (gemm_4bit above) instead of quant.matmul_4bit's
    per-call checks: ~7 calls per layer a step.
    """

    def __init__(self, linears: list[nn.Module]) -> None:
        self.sizes = [m.out_features for m in linears]
        biases = [m.bias for m in linears]
        if any(b is not None for b in biases):
            dtype = next(b.dtype for b in biases if b is not None)
            self.bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=dtype)
                                   for b, m in zip(biases, linears)])
            offset = 0
            for m in linears:  # the originals become views: one copy
                if m.bias is not None:
                    m.bias.data = self.bias[offset : offset + m.out_features]
                offset += m.out_features
        else:
            self.bias = None
        self.state: Optional[quant.QuantState] = None
        self.int8: Optional[FusedInt8] = None  # LLM.int8 parts (int8_linear.py)
        if all(isinstance(m, quant.Linear4bit) for m in linears):
            self._fuse_4bit(linears)
        elif all(type(m) is nn.Linear for m in linears):
            if len(linears) == 1:
                self.weight = linears[0].weight.detach()
            else:
                weight = torch.cat([m.weight.detach() for m in linears])
                offset = 0
                for m in linears:  # the originals become views: no second copy in memory
                    m.weight.data = weight[offset : offset + m.out_features]
                    offset += m.out_features
                self.weight = weight
            self.compute_dtype = None
        elif all(isinstance(m, quant.Linear8bitLt) for m in linears):
            self.int8 = FusedInt8(linears, self.bias)
        else:
            raise NotImplementedError("cannot fuse a mix of 4-bit and float linears")

    def _fuse_4bit(self, linears: list[nn.Module]) -> None:
        states = [m.weight.quant_state for m in linears]
        first = states[0]
        for m, s in zip(linears, states):
            if s is None:
                raise NotImplementedError("Linear4bit is not quantized yet")
            if (s.quant_type, s.blocksize, s.dtype, s.shape[1]) != (first.quant_type, first.blocksize, first.dtype,
                                                                     first.shape[1]):
                raise NotImplementedError("fused linears must share quant type, block size, dtype and input size")
            if len(linears) > 1 and s.shape.numel() % s.blocksize:
                raise NotImplementedError("a fused linear's size must be a multiple of the quantization block size")
            if m.compute_dtype != linears[0].compute_dtype:
                raise NotImplementedError("fused linears must share the compute dtype")
        if len(linears) == 1:
            packed = linears[0].weight.data
            absmax = dequantize_absmax(first)  # the state's own tensor unless double-quantized
        else:
            packed = torch.cat([m.weight.data.reshape(-1).view(torch.uint8) for m in linears])
            offset = 0
            for m in linears:  # the originals' bytes become views of the fused tensor
                n = m.weight.data.numel() * m.weight.data.element_size()
                m.weight.data = packed[offset : offset + n].view(m.weight.data.dtype).view(m.weight.data.shape)
                offset += n
            packed = packed.unsqueeze(1)
            absmax = torch.cat([dequantize_absmax(s) for s in states])
        absmax = absmax.contiguous()
        offset = 0
        for m, s in zip(linears, states):  # the parts' statistics become views of the fused ones
            n = s.absmax.numel()
            if len(linears) > 1 or s.nested is not None:
                m.weight.quant_state = dataclasses.replace(s, absmax=absmax[offset : offset + n], nested=None)
            offset += n
        self.weight = packed.contiguous()
        self.state = dataclasses.replace(
            first, absmax=absmax, nested=None, shape=torch.Size((sum(self.sizes), first.shape[1]))
        )
        self.compute_dtype = linears[0].compute_dtype or first.dtype
        if self.bias is not None:
            self.bias = self.bias.to(self.compute_dtype)
        self._op_args = (list(self.state.shape), absmax, first.blocksize, first.quant_type)

    def __call__(self, x: torch.Tensor, lora: object = None) -> torch.Tensor:
        """lora: the step's adapters, which a LoRALinear wrapping this one adds (lora_layers.py)."""
        if self.int8 is not None:
            return self.int8(x)
        if self.state is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return gemm_4bit(x, self.weight, self._op_args, self.bias, self.compute_dtype)
