"""Native forward for the Llama family (Llama, Mistral, Qwen2, SmolLM) over a flattened batch.

It reuses the transformers model's own modules and weights (embedding, RMSNorms, rotary
embedding, activation, lm_head), so it computes what transformers computes, with two changes:
q/k/v and gate/up are each one fused linear (their 4-bit weights concatenated: same bytes,
one matmul instead of three or two), and attention is paged (server/engine/attention.py).
The original linear modules keep working: their weights become views into the fused tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant.functional import dequantize_absmax

from ..attention import AttentionMetadata, paged_attention
from .int8_linear import FusedInt8

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class FusedLinear:
    """One or several linears over the same input as one matmul: cat([l(x) for l in linears]).

    4-bit: the packed bytes and (float32) absmax of the parts are concatenated; valid because
    each part's element count is a multiple of the block size, so no block spans two parts.
    The matmul calls the quant op directly (torch.ops.quant.gemm_4bit, the op contract) with its
    arguments prepared once, instead of quant.matmul_4bit's per-call checks: 120 calls a step.
    """

    def __init__(self, linears: list[nn.Module]) -> None:
        self.sizes = [m.out_features for m in linears]
        biases = [m.bias for m in linears]
        if any(b is not None for b in biases):
            dtype = next(b.dtype for b in biases if b is not None)
            self.bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=dtype)
                                   for b, m in zip(biases, linears)])
        else:
            self.bias = None
        self.state: Optional[quant.QuantState] = None
        self.int8: Optional[FusedInt8] = None  # LLM.int8 parts (int8_linear.py)
        if all(isinstance(m, quant.Linear4bit) for m in linears):
            self._fuse_4bit(linears)
            probe = torch.randn(3, linears[0].in_features, device=self.weight.device, dtype=self.compute_dtype)
            expected = quant.matmul_4bit(probe, self.weight, self.state, self.bias)
            if not torch.allclose(self(probe), expected, rtol=1e-4, atol=1e-4):  # pragma: no cover
                raise RuntimeError("direct quant op call disagrees with quant.matmul_4bit")
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
        else:
            packed = torch.cat([m.weight.data.reshape(-1).view(torch.uint8) for m in linears])
            offset = 0
            for m in linears:  # the originals' bytes become views of the fused tensor
                n = m.weight.data.numel() * m.weight.data.element_size()
                m.weight.data = packed[offset : offset + n].view(m.weight.data.dtype).view(m.weight.data.shape)
                offset += n
            packed = packed.unsqueeze(1)
        absmax = torch.cat([dequantize_absmax(s) for s in states]).contiguous()
        self.weight = packed.contiguous()
        self.state = dataclasses.replace(
            first, absmax=absmax, nested=None, shape=torch.Size((sum(self.sizes), first.shape[1]))
        )
        self.compute_dtype = linears[0].compute_dtype or first.dtype
        if self.bias is not None:
            self.bias = self.bias.to(self.compute_dtype)
        self._op_args = (list(self.state.shape), absmax, first.blocksize, first.quant_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return self.int8(x)
        if self.state is None:
            return nn.functional.linear(x, self.weight, self.bias)
        # As Linear4bit.forward: compute in compute_dtype, return in the input's dtype.
        if x.dtype == self.compute_dtype:
            return torch.ops.quant.gemm_4bit(x, self.weight, *self._op_args, self.bias)
        return torch.ops.quant.gemm_4bit(x.to(self.compute_dtype), self.weight, *self._op_args, self.bias).to(x.dtype)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _norm(module: nn.Module):
    """The RMSNorm as one fused op when it is transformers' plain weight * x / rms(x) (float32:
    bit-identical to the module), else the module itself."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ in _RMS_NORMS and weight is not None and eps is not None \
            and weight.dtype == torch.float32:
        shape = (weight.shape[0],)
        return lambda x: nn.functional.rms_norm(x, shape, weight, eps)
    return module


def _lm_head(module: nn.Module):
    """The output head. A float32 nn.Linear on CPU runs through oneDNN with its weight prepacked
    once: 3-6x faster than the default BLAS call on the CPUs we measured (MKL takes a slow path on
    AMD), and each row's logits are the same whatever the number of rows. Else the module."""
    weight = getattr(module, "weight", None)
    if type(module) is not nn.Linear or weight.device.type != "cpu" or weight.dtype != torch.float32 \
            or not torch.backends.mkldnn.is_available():
        return module
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
            bias = None if module.bias is None else module.bias.detach()

            def head(x: torch.Tensor) -> torch.Tensor:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

            probe = torch.randn(3, weight.shape[1])
            if not torch.allclose(head(probe), module(probe), rtol=1e-4, atol=1e-3):
                raise RuntimeError("oneDNN linear disagrees with nn.Linear")
    except Exception as exc:  # noqa: BLE001 - an unavailable fast path is not an error
        logger.info("output head runs as nn.Linear (oneDNN path unavailable: %s)", exc)
        return module
    return head


class _Layer:
    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm = _norm(layer.input_layernorm)
        self.post_attention_layernorm = _norm(layer.post_attention_layernorm)
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = FusedLinear([attn.o_proj])
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = FusedLinear([mlp.down_proj])
        self.act_fn = mlp.act_fn
        self.intermediate = mlp.gate_proj.out_features


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the native forward cannot run this model (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "unexpected module layout"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        return f"rope type {rope_type!r}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "unexpected attention layout"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "unexpected MLP layout"
        kinds = {type(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                   mlp.down_proj)}
        if not (kinds <= {quant.Linear4bit} or kinds <= {quant.Linear8bitLt} or kinds <= {nn.Linear}):
            return "mixed 4-bit and float projections"
    return None


class LlamaModel:
    """forward(input_ids [T], positions [T], meta, kv_caches) -> hidden states [T, hidden]."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"native Llama forward does not support this model: {reason}")
        config = model.config
        base = model.model
        self.model = model
        self.embed_tokens = base.embed_tokens
        self.norm = _norm(base.norm)
        self.rotary_emb = base.rotary_emb
        self.lm_head = _lm_head(model.lm_head)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = base.layers[0].self_attn.scaling
        self.layers = [_Layer(layer) for layer in base.layers]
        self.num_layers = len(self.layers)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        T = input_ids.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = H * D, KVH * D
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(hidden, positions.unsqueeze(0))  # [1, T, D], as transformers computes them
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            residual = hidden
            h = layer.input_layernorm(hidden)
            qkv = layer.qkv(h)
            # Rotary embedding of q and k in one go: [T, H + KVH, D] (elementwise, as transformers).
            qk = qkv[:, : q_size + kv_size].view(T, H + KVH, D)
            qk = qk * cos + _rotate_half(qk) * sin
            v = qkv[:, q_size + kv_size :].view(T, KVH, D)
            attn = paged_attention(qk[:, :H], qk[:, H:], v, k_cache, v_cache, meta, self.scale)
            hidden = residual + layer.o_proj(attn)
            residual = hidden
            h = layer.post_attention_layernorm(hidden)
            gate_up = layer.gate_up(h)
            h = layer.act_fn(gate_up[:, : layer.intermediate]) * gate_up[:, layer.intermediate :]
            hidden = residual + layer.down_proj(h)
        return self.norm(hidden)

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), V] of the given rows of the flattened batch (the lm_head only sees those)."""
        hidden = self.forward(input_ids, positions, meta, kv_caches)
        return self.lm_head(hidden.index_select(0, rows))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
