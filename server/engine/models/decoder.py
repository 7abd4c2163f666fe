"""The decoder forward for the families in families.py (Llama 3, Mistral, Qwen 2/3, Gemma 1/2/3,
Phi-3, GPT-NeoX, OLMo 2/3, SmolLM) over a flattened batch.

It reuses the transformers model's own modules and weights (embedding, norms, activation,
rotary frequencies, head), so it computes what transformers computes, with two changes:
q/k/v and gate/up are each one fused linear (fused_linear.py: their 4-bit weights concatenated,
same bytes, one matmul instead of three or two), and attention is paged through the engine's
attention backend, with each layer's sliding window and logit soft-capping. The original linear
modules keep working: their weights and quantization statistics become views into the fused
tensors (one copy).

Two ways to run it, chosen once at engine start (forward_path.py): layer by layer in Python
("layers"), or the whole stack in one native call per step on a CPU ("fused", fused_step.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..attention import AttentionBackend
from . import families
from .fused_linear import FusedLinear
from .norms import norm_fn
from .rope import Rope, apply_rope

if TYPE_CHECKING:  # step_inputs imports this package
    from ..step_inputs import StepInputs

logger = logging.getLogger(__name__)


class DecoderLayer:
    """One decoder layer: norms, fused projections, attention settings, rope."""

    def __init__(self, family: families.Family, layer: nn.Module, config: Any, rope: Optional[Rope],
                 attention: AttentionBackend) -> None:
        self.backend = attention
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
                  step: StepInputs) -> torch.Tensor:
        T = h.shape[0]
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(h, step.lora)
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
        return self.backend.forward(q, k, v, kv, step.attention, self.scale, self.window, self.softcap)

    def mlp(self, h: torch.Tensor, lora: object) -> torch.Tensor:
        up = self.up(h, lora)
        if self.gated:
            up = self.act_fn(up[:, : self.intermediate]) * up[:, self.intermediate :]
        else:
            up = self.act_fn(up)
        return self.down(up, lora)

    def __call__(self, x: torch.Tensor, cos_sin: dict, kv: tuple[torch.Tensor, torch.Tensor],
                 step: StepInputs) -> torch.Tensor:
        lora = step.lora
        a = self.o_proj(self.attention(self.attn_in(x) if self.attn_in is not None else x, cos_sin, kv, step), lora)
        if self.attn_out is not None:
            a = self.attn_out(a)
        if self.parallel:  # GPT-NeoX: (mlp + attn) + x, in transformers' order
            return self.mlp(self.mlp_in(x), lora) + a + x
        x = x + a
        m = self.mlp(self.mlp_in(x) if self.mlp_in is not None else x, lora)
        if self.mlp_out is not None:
            m = self.mlp_out(m)
        return x + m


class DecoderModel:
    """forward(step, kv_caches) -> hidden states [T, hidden]; forward_logits(step, kv_caches) -> float32
    logits of the step's logit rows. `fused_step` (set by forward_path.py where fused_step.reason
    finds the model covered): the whole stack in one native call per step instead of the layers."""

    def __init__(self, model: nn.Module, attention: AttentionBackend) -> None:
        reason = families.unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"the decoder forward does not support this model: {reason}")
        config = families.text_config(model)
        family = families.FAMILIES[model.config.model_type]
        base = families.decoder(model)
        self.model = model
        self.attention = attention
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
            self.layers.append(DecoderLayer(family, layer, config, ropes[kind], attention))
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
        self.fused_step: Optional[Any] = None

    @property
    def length_dependent_rope(self) -> bool:
        """Whether the rope frequencies depend on the sequence length (dynamic NTK, longrope)."""
        return any(r.length_dependent for r in self.ropes)

    def _cos_sin(self, step: StepInputs, dtype: torch.dtype) -> dict:
        out = {}
        for rope in self.ropes:
            cos, sin = rope.cos_sin(step.positions, step.rope_lengths, dtype)
            out[id(rope)] = (cos.unsqueeze(1), sin.unsqueeze(1))  # [T, 1, rotary_dim]
        return out

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if self.fused_step is not None:
            return self.fused_step(step, kv_caches)
        hidden = self.embed_tokens(step.input_ids)  # [T, hidden], in the compute dtype (sixteen_bit.py)
        cos_sin = self._cos_sin(step, hidden.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos_sin, kv, step)
        return self.norm(hidden)

    @torch.inference_mode()
    def forward_logits(self, step: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """float32 logits [len(rows), V] of the step's logit rows (the head only sees those)."""
        hidden = self.forward(step, kv_caches)
        logits = self.lm_head(hidden.index_select(0, step.logit_rows)).float()
        if self.final_softcap:  # Gemma 2, in transformers' order
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
