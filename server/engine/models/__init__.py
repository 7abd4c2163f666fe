"""The forward paths the runner drives: `forward_logits(step, kv_caches)` -> float32 logits.

- decoder.DecoderModel: the decoder forward for the families in families.py (fused q/k/v and
  gate/up linears, per-layer sliding windows and soft-capping), layer by layer ("layers") or as
  one native call per step on a CPU ("fused", fused_step.py).
- generic.TransformersModel: any other transformers causal LM ("transformers"), our paged
  attention registered with transformers' attention interface.
The path is chosen once, at engine start (forward_path.py); a model no path can serve raises
UnsupportedModelError (a ValueError) naming why, at load.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from . import decoder, families, generic

ModelAdapter = Union[decoder.DecoderModel, generic.TransformersModel]


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model (one line: the model type and why)."""


def serving_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(attention heads, KV heads, head dim, layers) of a transformers causal LM as the engine serves
    it: the decoder forward reads the attention module of its first layer, others the config."""
    if families.unsupported_reason(model) is None:
        base = families.decoder(model)
        heads, kv_heads, head_dim = families.head_shape(families.attention_of(base.layers[0]),
                                                        families.text_config(model))
        return heads, kv_heads, head_dim, len(base.layers)
    config = families.text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim, config.num_hidden_layers


def model_max_len(model: nn.Module, tokenizer: object = None) -> int:
    """The model's context length from its config (max_position_embeddings and relatives)."""
    config = families.text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])
