"""Native forward for decoder-only families (families.py: Llama 3, Mistral, Qwen 2/3, Gemma 1/2/3,
Phi-3, GPT-NeoX, OLMo 2/3, SmolLM) over a flattened batch.

It reuses the transformers model's own modules and weights (embedding, norms, activation,
rotary frequencies, head), so it computes what transformers computes, with two changes:
q/k/v and gate/up are each one fused linear (their 4-bit weights concatenated: same bytes,
one matmul instead of three or two), and attention is paged (server/engine/attention.py), with
each layer's sliding window and logit soft-capping. The original linear modules keep working:
their weights and quantization statistics become views into the fused tensors (one copy).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

import quantserve.quant as quant
from quantserve.quant.functional import dequantize_absmax

from ..attention import AttentionMetadata, paged_attention
from .int8_linear import FusedInt8
from . import families, native_step
from .rope import Rope, apply_rope

logger = logging.getLogger(__name__)


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return self.int8(x)
        if self.state is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return gemm_4bit(x, self.weight, self._op_args, self.bias, self.compute_dtype)


# RMSNorms computing weight * (x * rsqrt(mean(x^2) + eps)) (Gemma's: with 1 + weight).
_RMS_NORM_EPS = ("variance_epsilon", "eps")


def norm_fn(module: Optional[nn.Module]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A norm as one fused op (nn.functional.rms_norm) where it is bit-identical to the module on
    float32 input (checked on a probe), else the module itself."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    eps = next((getattr(module, n) for n in _RMS_NORM_EPS if isinstance(getattr(module, n, None), float)), None)
    if "RMSNorm" not in type(module).__name__ or weight is None or eps is None or weight.dtype != torch.float32:
        return module
    g = torch.Generator().manual_seed(0)  # not the global generator: building must not move it
    probe = (torch.randn(4, 3, weight.shape[0], generator=g) * 3).to(weight.device)
    for w in (weight.detach(), 1.0 + weight.detach()):  # plain, or Gemma's (1 + weight)
        fused = RMSNorm(w, eps)
        with torch.inference_mode():
            if torch.equal(fused(probe), module(probe)):
                return fused
    return module


class RMSNorm:
    """nn.functional.rms_norm over the last dim with a fixed multiplier (Gemma's 1 + weight already
    added) and eps: what norm_fn found equal to the model's module; the fused step reads both."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps, self.shape = weight, float(eps), (weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.shape, self.weight, self.eps)


class _Layer:
    """One decoder layer: norms, fused projections, attention settings, rope."""

    def __init__(self, family: families.Family, layer: nn.Module, config: Any, rope: Optional[Rope]) -> None:
        attn, mlp = families.attention_of(layer), layer.mlp
        self.heads, self.kv_heads, self.head_dim = families.head_shape(attn, config)
        norms = {n: norm_fn(getattr(layer, n, None)) for n in
                 ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        # Which norm sits where, per family (see families.Family.residual).
        if family.residual == "sandwich":
            self.attn_in, self.attn_out = norms["input_layernorm"], norms["post_attention_layernorm"]
            self.mlp_in, self.mlp_out = norms["pre_feedforward_layernorm"], norms["post_feedforward_layernorm"]
        elif family.residual == "post":
            self.attn_in, self.attn_out = None, norms["post_attention_layernorm"]
            self.mlp_in, self.mlp_out = None, norms["post_feedforward_layernorm"]
        else:
            self.attn_in, self.attn_out = norms["input_layernorm"], None
            self.mlp_in, self.mlp_out = norms["post_attention_layernorm"], None
        self.parallel = family.residual == "parallel" and getattr(config, "use_parallel_residual", True)
        qkv, mlp_linears = families.projections(family, attn, mlp)
        self.qkv = FusedLinear(qkv)
        self.neox = family.qkv == "neox"
        self.o_proj = FusedLinear([families.out_proj(attn)])
        self.gated = family.mlp != "plain"
        self.up = FusedLinear(mlp_linears[:-1])  # [gate | up] or the plain up projection
        self.down = FusedLinear(mlp_linears[-1:])
        self.act_fn = next(getattr(mlp, n) for n in ("act_fn", "activation_fn", "act") if hasattr(mlp, n))
        self.intermediate = self.up.sizes[0] // 2 if family.mlp == "gated_fused" else self.up.sizes[0]
        # q/k norms: over each head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
        self.q_norm, self.k_norm = norm_fn(getattr(attn, "q_norm", None)), norm_fn(getattr(attn, "k_norm", None))
        q_norm_weight = getattr(getattr(attn, "q_norm", None), "weight", None)
        self.qk_norm_per_head = q_norm_weight is not None and q_norm_weight.shape[-1] == self.head_dim
        self.scale = float(attn.scaling)
        self.window = families.layer_window(family, attn, config)
        self.softcap = float(getattr(attn, "attn_logit_softcapping", None) or 0.0)
        self.rope = rope if getattr(attn, "use_rope", True) else None  # SmolLM3's NoPE layers

    def attention(self, h: torch.Tensor, cos_sin: dict, kv: tuple[torch.Tensor, torch.Tensor],
                  meta: AttentionMetadata) -> torch.Tensor:
        T = h.shape[0]
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(h)
        if self.neox:  # rows [heads, (q, k, v), head_dim]
            parts = qkv.view(T, H, 3, D)
            q, k, v = parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]
        else:
            q = qkv[:, : H * D]
            k = qkv[:, H * D : (H + KVH) * D]
            v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
            if self.q_norm is not None and not self.qk_norm_per_head:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.view(T, H, D), k.view(T, KVH, D)
            if self.q_norm is not None and self.qk_norm_per_head:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            cos, sin = cos_sin[id(self.rope)]
            if k.data_ptr() == q.data_ptr() + H * D * q.element_size() and q.stride() == (qkv.stride(0), D, 1) \
                    and k.stride() == q.stride():  # q and k adjacent in qkv: one rotation for both
                qk = apply_rope(qkv[:, : (H + KVH) * D].view(T, H + KVH, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return paged_attention(q, k, v.contiguous() if self.neox else v, kv[0], kv[1], meta, self.scale,
                               self.window, self.softcap)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        up = self.up(h)
        if self.gated:
            up = self.act_fn(up[:, : self.intermediate]) * up[:, self.intermediate :]
        else:
            up = self.act_fn(up)
        return self.down(up)

    def __call__(self, x: torch.Tensor, cos_sin: dict, kv: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        a = self.o_proj(self.attention(self.attn_in(x) if self.attn_in is not None else x, cos_sin, kv, meta))
        if self.attn_out is not None:
            a = self.attn_out(a)
        if self.parallel:  # GPT-NeoX: (mlp + attn) + x, in transformers' order
            return self.mlp(self.mlp_in(x)) + a + x
        x = x + a
        m = self.mlp(self.mlp_in(x) if self.mlp_in is not None else x)
        if self.mlp_out is not None:
            m = self.mlp_out(m)
        return x + m


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the native forward cannot run this model (None: it can)."""
    return families.unsupported_reason(model)


class LlamaModel:
    """forward(input_ids [T], positions [T], meta, kv_caches) -> hidden states [T, hidden];
    forward_logits(..., rows) -> float32 logits of those rows."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"native forward does not support this model: {reason}")
        config = families.text_config(model)
        family = families.FAMILIES[model.config.model_type]
        base = families.decoder(model)
        self.model = model
        self.embed_tokens = model.get_input_embeddings()
        self.norm = norm_fn(base.norm if hasattr(base, "norm") else base.final_layer_norm)
        self.lm_head = model.get_output_embeddings()
        self.final_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        layer_types = getattr(config, "layer_types", None)
        rotary = base.rotary_emb
        per_type = isinstance(getattr(rotary, "rope_type", None), dict)
        ropes: dict[Optional[str], Rope] = {}
        self.layers = []
        for i, layer in enumerate(base.layers):
            kind = layer_types[i] if per_type else None
            if kind not in ropes:
                ropes[kind] = Rope(rotary, kind)
            self.layers.append(_Layer(family, layer, config, ropes[kind]))
        self.ropes = list(ropes.values())
        self.num_layers = len(self.layers)
        self.num_heads, self.num_kv_heads, self.head_dim = (self.layers[0].heads, self.layers[0].kv_heads,
                                                            self.layers[0].head_dim)
        windows = [layer.window for layer in self.layers]
        # Blocks before the window can be freed only where every layer slides.
        self.sliding_window: Optional[int] = max(windows) if all(windows) else None
        # Sequences longer than this are recomputed from scratch once (see families.Family).
        longrope = [r.threshold for r in self.ropes if r.rope_type == "longrope"]
        self.recompute_above: Optional[int] = min(longrope) if longrope and family.longrope_recompute else None
        # The whole stack in one native call per step where it covers the model (native_step.py).
        why_not = native_step.reason(self)
        self.native_step: Optional[native_step.NativeStep] = native_step.NativeStep(self) if why_not is None else None
        if self.native_step is not None and self.native_step.disabled:
            why_not, self.native_step = self.native_step.disabled, None
        logger.info("decoder step: %s", "one native call per step" if why_not is None
                    else f"Python forward ({why_not})")

    @property
    def length_dependent_rope(self) -> bool:
        """Whether the rope frequencies depend on the sequence length (dynamic NTK, longrope)."""
        return any(r.length_dependent for r in self.ropes)

    def _cos_sin(self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> dict:
        out = {}
        for rope in self.ropes:
            cos, sin = rope.cos_sin(positions, meta.rope_lengths, dtype)
            out[id(rope)] = (cos.unsqueeze(1), sin.unsqueeze(1))  # [T, 1, rotary_dim]
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if self.native_step is not None:
            hidden = self.native_step(input_ids, positions, meta, kv_caches)
            if hidden is not None:
                return hidden
        hidden = self.embed_tokens(input_ids)  # [T, hidden], in the compute dtype (sixteen_bit.py)
        cos_sin = self._cos_sin(positions, meta, hidden.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos_sin, kv, meta)
        return self.norm(hidden)

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
        """float32 logits [len(rows), V] of the given rows of the flattened batch (the head only sees those)."""
        hidden = self.forward(input_ids, positions, meta, kv_caches)
        logits = self.lm_head(hidden.index_select(0, rows)).float()
        if self.final_softcap:  # Gemma 2, in transformers' order
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

