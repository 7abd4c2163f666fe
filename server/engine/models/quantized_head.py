"""An opt-in quantized output head (`--quantize-lm-head int8|nf4`), float32 logits on every device.

The head is the single largest read of a decode step for a small model with a large vocabulary
(SmolLM2-135M: 49152 x 576, 57 MB at 16 bits per step vs ~55 MB for all its 4-bit layers);
llama.cpp keeps it at Q6_K. `quantize_lm_head(model, kind)` converts a transformers model in
place, after loading (its head already 16-bit, sixteen_bit.py, or still float), so that its own
forward (generate) and the engine (DecoderModel.forward_logits calls the model's output embeddings
module) compute the same thing:
- int8 (`Int8Head`): symmetric per-output-row absmax int8 weights (the rows bitsandbytes'
  int8_vectorwise_quant makes), weight-only: activations stay float32, float32 sums and logits;
  on CPU the native kernel (kernels/cpu/linear8.cpp), else torch a slice at a time.
- nf4 (`NF4Head`): our own 4-bit quantization (NF4, blocksize 64, no double quant: the same
  bytes as bitsandbytes' quantize_4bit), computed by torch.ops.quant.gemm_4bit, as the 4-bit
  linears of the decoder forward (fused_linear.FusedLinear), with float32 activations.
- Tied embeddings (the default model): the input embedding becomes a `QuantizedEmbedding` over
  the head's own tensors (no second 16-bit copy), dequantizing the looked-up rows (as llama.cpp
  does). An untied model keeps its 16-bit embedding.
The tensors are buffers (not trainable parameters): the model's parameter count stays that of
the original model only if it is taken before this conversion (the loader does).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import quantserve.quant as quant
from quantserve.kernels.cpu import linear8

from .sixteen_bit import compute_dtype, module_bytes

logger = logging.getLogger(__name__)

HEAD_QUANTIZATIONS = ("none", "int8", "nf4")
# The 4-bit settings of the nf4 head (fixed: the flag takes no further options).
NF4_HEAD_CONFIG = quant.QuantConfig(bnb_4bit_quant_type="nf4", blocksize=64, bnb_4bit_use_double_quant=False)
_SLICE_ROWS = 8192  # weight rows widened to float32 at a time on the torch paths: bounded scratch


class Int8Head(nn.Module):
    """logits [..., V] float32 = scale[V] * (x . weight^T) (+ bias): weight int8 [V, K]."""

    quantization = "int8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)  # float32 [V]: row absmax / 127
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "Int8Head":
        # bitsandbytes' rows: CB = round(w * 127 / absmax), SCB = absmax (zero rows stay zero).
        CB, SCB, _ = quant.int8_vectorwise_quant(weight.detach())
        return cls(CB, (SCB / 127.0).to(torch.float32), _float32(bias))

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows [*ids.shape, K] of the dequantized weight."""
        return self.weight[ids].to(torch.float32) * self.scale[ids].unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        if x.device.type == "cpu":
            out = linear8.linear_int8(x32, self.weight, self.scale, self.bias)
            if out is not None:
                return out
        # Without the kernel, and on CUDA (correct, not tuned: unmeasured there).
        parts = [F.linear(x32, self.weight[i : i + _SLICE_ROWS].to(torch.float32)) * self.scale[i : i + _SLICE_ROWS]
                 for i in range(0, self.out_features, _SLICE_ROWS)]
        out = torch.cat(parts, dim=-1)
        return out + self.bias if self.bias is not None else out


class NF4Head(nn.Module):
    """logits [..., V] float32 = x . dequant(weight)^T (+ bias): weight NF4-packed [V, K / 2] bytes,
    one float32 absmax per 64 weights (in row-major order)."""

    quantization = "nf4"

    def __init__(self, weight: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                 bias: Optional[torch.Tensor], blocksize: int) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.blocksize = blocksize
        self.register_buffer("weight", weight)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", quant.get_4bit_code("nf4", weight.device))  # 16 floats: the row lookup's table
        self.register_buffer("bias", bias)
        self._op_args = ([self.out_features, self.in_features], blocksize, "nf4")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "NF4Head":
        V, K = weight.shape
        if K % 2:
            raise ValueError(f"--quantize-lm-head nf4 needs an even hidden size (two weights a byte per row), got {K}")
        cfg = NF4_HEAD_CONFIG
        packed, state = quant.quantize_4bit(weight.detach(), blocksize=cfg.blocksize,
                                            quant_type=cfg.bnb_4bit_quant_type, compress_statistics=False)
        # [V, K / 2]: the same bytes as quantize_4bit's [V * K / 2, 1], one row of bytes per vocabulary
        # row, so the embedding's weight.shape[0] is the vocabulary size (as an nn.Embedding's).
        return cls(packed.view(V, K // 2), state.absmax, (V, K), _float32(bias), cfg.blocksize)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows [*ids.shape, K] of the dequantized weight (only those rows are decoded)."""
        K = self.in_features
        index = ids.reshape(-1, 1).long() * K + torch.arange(K, device=ids.device)  # element index [n, K]
        byte = self.weight.reshape(-1)[index // 2]
        nibble = torch.where(index % 2 == 0, byte >> 4, byte & 0xF)  # high nibble first (bitsandbytes)
        rows = self.code[nibble.long()] * self.absmax[index // self.blocksize]
        return rows.view(*ids.shape, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, blocksize, quant_type = self._op_args
        return torch.ops.quant.gemm_4bit(x.to(torch.float32), self.weight, shape, self.absmax, blocksize, quant_type,
                                         self.bias)


QuantizedHead = (Int8Head, NF4Head)


class QuantizedEmbedding(nn.Module):
    """The input embedding of a tied model whose head is quantized: the looked-up rows dequantized
    from the head's own tensors (one copy), in the model's compute dtype.

    The head is referenced, not registered as a submodule (it would be listed twice among the
    model's modules and its tensors twice in the state dict), and its tensors are not registered
    here either: `model.to(device)` would then make two copies. `weight` is the head's (an
    nn.Embedding's users read its device and weight.shape[0], the vocabulary size)."""

    def __init__(self, head: nn.Module, dtype: torch.dtype, padding_idx: Optional[int]) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.compute_dtype = padding_idx, dtype
        self.quantization = head.quantization

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.dequantized_rows(input_ids).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quantization} (rows of the tied output head)"


def quantize_lm_head(model: nn.Module, kind: str) -> Optional[dict]:
    """Replace the model's output head with a quantized one in place ("int8" or "nf4"; "none" does
    nothing), and a tied input embedding with a QuantizedEmbedding over it. ValueError for an unknown
    kind, or a head that is not a float linear. Returns head_memory(model) (None for "none")."""
    if kind not in HEAD_QUANTIZATIONS:
        raise ValueError(f"--quantize-lm-head must be one of {', '.join(HEAD_QUANTIZATIONS)}, got {kind!r}")
    if kind == "none":
        return None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"--quantize-lm-head {kind}: {type(model).__name__} has no output head")
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point() or head.weight.device.type == "meta":
        raise ValueError(f"--quantize-lm-head {kind}: the output head is a {type(head).__name__} "
                         f"({getattr(getattr(head, 'weight', None), 'dtype', 'no weight')}), not a float linear layer")
    dtype = compute_dtype(model)
    tied = embed is not None and getattr(embed, "weight", None) is not None \
        and embed.weight.data_ptr() == head.weight.data_ptr()
    before = module_bytes(embed, head)
    cls = Int8Head if kind == "int8" else NF4Head
    new_head = cls.from_weight(head.weight, head.bias)
    model.set_output_embeddings(new_head)
    if tied and type(embed) is nn.Embedding:
        model.set_input_embeddings(QuantizedEmbedding(new_head, dtype, embed.padding_idx))
    elif tied:  # e.g. Gemma's scaled embedding: its own forward is kept, with its own 16-bit rows
        logger.warning("--quantize-lm-head: the input embedding (%s) keeps its own 16-bit copy of the tied weight",
                       type(embed).__name__)
    info = head_memory(model)
    logger.info("output head quantized to %s%s: %.1f MiB (embedding + head were %.1f MiB)", kind,
                " (tied input embedding reads its rows)" if info["tied"] else "", info["bytes"] / 2**20,
                before / 2**20)
    return info


def head_memory(model: nn.Module) -> dict:
    """The output head as held: {"quantization": none|int8|nf4, "dtype", "bytes", "tied"} (bytes of
    its weight, scales and bias; a tied embedding shares them)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return {"quantization": "none", "dtype": None, "bytes": 0, "tied": False}
    kind = getattr(head, "quantization", "none")
    tied = embed is not None and (isinstance(embed, QuantizedEmbedding) or (
        getattr(embed, "weight", None) is not None and embed.weight.data_ptr() == head.weight.data_ptr()))
    dtype = "nf4" if kind == "nf4" else str(head.weight.dtype).removeprefix("torch.")
    return {"quantization": kind, "dtype": dtype, "bytes": module_bytes(head), "tied": tied}


def _float32(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if bias is None else bias.detach().to(torch.float32)
