"""The decoder families the decoder forward (decoder.py) expresses, and how each one's modules are wired.

Every family here is a stack of (attention, MLP) layers over transformers' own modules; what
differs is named in one `Family` row: where the norms sit around the two residual branches, how
q/k/v and the MLP's projections are laid out, and where a layer's sliding window is read. Per
layer, everything else is read from the attention module transformers built (its scaling,
sliding window, soft-capping, q/k norms, rope on/off), so a config's variations need no code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

import quantserve.quant as quant


@dataclasses.dataclass(frozen=True)
class Family:
    """residual: "pre" (norm -> attention -> add; norm -> MLP -> add), "sandwich" (Gemma 2/3: the
    branches are normed before and after), "post" (OLMo 2: branch -> norm -> add), "parallel"
    (GPT-NeoX with use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x))).
    qkv: "split" (q_proj, k_proj, v_proj), "fused" (qkv_proj rows [q | k | v]), "neox"
    (query_key_value rows [heads, (q, k, v), head_dim]).
    mlp: "gated" (act(gate_proj) * up_proj -> down_proj), "gated_fused" (gate_up_proj rows
    [gate | up]), "plain" (dense_h_to_4h -> act -> dense_4h_to_h).
    window: where a layer's sliding window is read when its attention module has no
    `sliding_window` attribute: "config" (config.sliding_window, every layer: Mistral, Phi-3) or
    "none".
    longrope_recompute: a sequence growing past longrope's original length is recomputed with
    the long factors (transformers' Phi-3 generate drops its cache there); else its earlier keys
    keep the short ones."""

    residual: str = "pre"
    qkv: str = "split"
    mlp: str = "gated"
    window: str = "none"
    longrope_recompute: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(window="config"),
    "ministral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "smollm3": Family(),
    "gemma": Family(),
    "gemma2": Family(residual="sandwich"),
    "gemma3_text": Family(residual="sandwich"),
    "gemma3": Family(residual="sandwich"),  # Gemma3ForConditionalGeneration: its text decoder
    "olmo2": Family(residual="post"),
    "olmo3": Family(residual="post"),
    "phi3": Family(qkv="fused", mlp="gated_fused", window="config", longrope_recompute=True),
    "gpt_neox": Family(residual="parallel", qkv="neox", mlp="plain"),
}

_ATTENTION_NAMES = ("self_attn", "attention")
_QKV = {"split": ("q_proj", "k_proj", "v_proj"), "fused": ("qkv_proj",), "neox": ("query_key_value",)}
_MLP = {"gated": ("gate_proj", "up_proj", "down_proj"), "gated_fused": ("gate_up_proj", "down_proj"),
        "plain": ("dense_h_to_4h", "dense_4h_to_h")}
_OUT = ("o_proj", "dense")
LINEAR_KINDS = (quant.Linear4bit, quant.Linear8bitLt, nn.Linear)  # each fused group must be one kind (see fused_linear.FusedLinear)


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the decoder layers: model.model, model.gpt_neox, or the language model
    of a multimodal wrapper."""
    base = getattr(model, "model", None) or getattr(model, "gpt_neox", None)
    base = getattr(base, "language_model", None) or base
    return base if base is not None and isinstance(getattr(base, "layers", None), nn.ModuleList) else None


def attention_of(layer: nn.Module) -> Optional[nn.Module]:
    return next((getattr(layer, n) for n in _ATTENTION_NAMES if hasattr(layer, n)), None)


def out_proj(attn: nn.Module) -> Optional[nn.Module]:
    return next((getattr(attn, n) for n in _OUT if hasattr(attn, n)), None)


def projections(family: Family, attn: nn.Module, mlp: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(q/k/v linears, MLP linears) in the family's order; missing names raise AttributeError."""
    return [getattr(attn, n) for n in _QKV[family.qkv]], [getattr(mlp, n) for n in _MLP[family.mlp]]


def layer_window(family: Family, attn: nn.Module, config: Any) -> int:
    """The layer's sliding window in tokens (0: full attention)."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(config, "sliding_window", None) if family.window == "config" else None
    return int(window or 0)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the decoder forward cannot run this model (None: it can)."""
    config = text_config(model)
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return f"model type {model_type!r} is not one of the native families {sorted(FAMILIES)}"
    base = decoder(model)
    if base is None or getattr(base, "rotary_emb", None) is None:
        return "unexpected module layout (no decoder layers or rotary embedding)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    for t in getattr(config, "layer_types", None) or ():
        if t not in ("full_attention", "sliding_attention"):
            return f"layer type {t!r}"
    if model.get_output_embeddings() is None:
        return "no output head"
    shapes = set()
    for i, layer in enumerate(base.layers):
        attn, mlp = attention_of(layer), getattr(layer, "mlp", None)
        if attn is None or mlp is None or out_proj(attn) is None or not hasattr(attn, "scaling"):
            return f"layer {i}: unexpected attention / MLP layout"
        try:
            qkv, mlp_linears = projections(family, attn, mlp)
        except AttributeError as exc:
            return f"layer {i}: {exc}"
        if family.mlp != "plain" and not hasattr(mlp, "act_fn") and not hasattr(mlp, "activation_fn"):
            return f"layer {i}: no MLP activation"
        for group in (qkv, [out_proj(attn)], mlp_linears[:-1], mlp_linears[-1:]):
            kinds = {type(m) for m in group}
            if len(kinds) != 1 or not issubclass(kinds.pop(), LINEAR_KINDS):
                return f"layer {i}: projections of unsupported or mixed kinds {sorted(k.__name__ for k in {type(m) for m in group})}"
        if getattr(attn, "sinks", None) is not None:
            return "attention sinks"
        heads, kv_heads, head_dim = head_shape(attn, config)
        if heads % kv_heads:
            return f"layer {i}: {heads} query heads are not a multiple of {kv_heads} key/value heads"
        shapes.add((kv_heads, head_dim))
    if len(shapes) != 1:
        return f"layers differ in key/value shape {sorted(shapes)} (one paged KV cache shape for all)"
    return None


def head_shape(attn: nn.Module, config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of one attention module."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) \
        or getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, int(head_dim)
