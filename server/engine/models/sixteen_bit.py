"""Input embeddings and the output head at 16 bits, with float32 logits, on every device.

They are the largest tensors a 4-bit model keeps unquantized (Gemma 3's 262k-row embedding is
two thirds of its 270M parameters): kept in float32 on CPU, they made a "4-bit" Gemma 3 bigger
than its 16-bit self. At 16 bits they cost what the 16-bit reference counts for them, and the
head reads half the bytes per step.

`to_16bit(model)` converts a transformers model in place, so that its own forward (generate)
and the engine compute the same thing:
- the input embedding keeps its class; its weight becomes 16-bit and a forward hook casts its
  output to the compute dtype (what the rest of the model computes in);
- the output head (a plain nn.Linear) becomes a `Head16`, an nn.Linear whose forward returns
  float32 logits with float32 sums (`head_logits`); tied weights stay one Parameter.
The 16-bit dtype is the compute dtype when that is 16-bit, else bfloat16 (float32's range).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from quantserve.kernels.cpu import linear16

logger = logging.getLogger(__name__)

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_MARK = "_quantserve_16bit"  # set on converted embeddings (idempotence)


def sixteen_bit_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if compute_dtype in SIXTEEN_BIT else torch.bfloat16


class CastOutput:
    """Forward hook: the module's output in `dtype` (a class, not a lambda: models stay picklable)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(self.dtype)


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] times a 16-bit weight [V, K] -> float32 logits [..., V], float32 sums.

    CPU + bfloat16: the native kernel (exact float32 products, or bf16 products under torch's
    "medium" matmul precision, as the 4-bit kernels). CUDA: torch.mm with a float32 output.
    Else (no compiler, float16 on CPU): the weight widened to float32, a slice at a time."""
    if weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        out = linear16.linear_bf16(x.to(torch.float32), weight, bias)
        if out is not None:
            return out
    if x.device.type == "cuda":
        out = _cuda_mm_float32(x.reshape(-1, x.shape[-1]).to(weight.dtype), weight)
        if out is not None:
            out = out.view(*x.shape[:-1], weight.shape[0])
            return out + bias.to(torch.float32) if bias is not None else out
    x32 = x.to(torch.float32)
    step = 8192  # rows of the weight widened at a time: bounded scratch memory
    parts = [F.linear(x32, weight[i : i + step].to(torch.float32)) for i in range(0, weight.shape[0], step)]
    out = torch.cat(parts, dim=-1)
    return out + bias.to(torch.float32) if bias is not None else out


_cuda_out_dtype: dict[str, bool] = {}


def _cuda_mm_float32(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """torch.mm with out_dtype=float32 (torch >= 2.8 on CUDA): 16-bit products, float32 output."""
    if _cuda_out_dtype.get("ok") is False:
        return None
    try:
        out = torch.mm(x, weight.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        _cuda_out_dtype["ok"] = False
        return None
    _cuda_out_dtype["ok"] = True
    return out


class Head16(nn.Linear):
    """An output head with a 16-bit weight that returns float32 logits (see head_logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_logits(x, self.weight, self.bias)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first floating-point tensor that is neither a 4-bit
    weight nor part of the embeddings or head (norms, biases, float linears)."""
    skip = {id(m) for m in _embedding_and_head(model) if m is not None}
    for module in model.modules():
        if id(module) in skip:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and getattr(param, "quant_state", None) is None:
                return param.dtype
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embed.weight.dtype if embed is not None else torch.float32


def _embedding_and_head(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return embed, head


def to_16bit(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Convert the input embedding and a plain nn.Linear output head in place (see the module
    docstring). dtype: the compute dtype (default: compute_dtype(model)). Returns the bytes saved."""
    dtype = compute_dtype(model) if dtype is None else dtype
    half = sixteen_bit_dtype(dtype)
    embed, head = _embedding_and_head(model)
    before = module_bytes(embed, head)
    converted: dict[int, nn.Parameter] = {}  # old weight -> new: tied weights stay one Parameter

    def convert(module: nn.Module) -> None:
        weight = module.weight
        if weight.dtype == half:
            return
        if id(weight) not in converted:
            converted[id(weight)] = nn.Parameter(weight.detach().to(half), requires_grad=False)
        module.weight = converted[id(weight)]

    if isinstance(embed, nn.Embedding) and embed.weight.is_floating_point():
        convert(embed)
        if half != dtype and not getattr(embed, _MARK, False):
            embed.register_forward_hook(CastOutput(dtype))
        setattr(embed, _MARK, True)
    if head is not None and type(head) in (nn.Linear, Head16) and head.weight.is_floating_point():
        convert(head)
        if head.bias is not None and head.bias.dtype != torch.float32:
            head.bias = nn.Parameter(head.bias.detach().to(torch.float32), requires_grad=False)
        head.__class__ = Head16
    saved = before - module_bytes(embed, head)
    if saved:
        logger.info("input embeddings and output head at 16 bits (%s): %.1f MiB saved", str(half).removeprefix("torch."),
                    saved / 2**20)
    return saved


def module_bytes(*modules: Optional[nn.Module]) -> int:
    """Bytes of the modules' own parameters and buffers, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.numel() * t.element_size()
    return total
