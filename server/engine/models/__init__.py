"""Model adapters the runner drives: `forward_logits(input_ids, positions, meta, kv_caches, rows)`.

- llama.LlamaModel: native forward for the Llama family (fused q/k/v and gate/up linears).
- generic.TransformersModel: any transformers causal LM, our paged attention registered with
  transformers' attention interface.
"""

from __future__ import annotations

import logging
from typing import Any, Union

from torch import nn

from . import generic, llama

logger = logging.getLogger(__name__)

ModelAdapter = Union[llama.LlamaModel, generic.TransformersModel]


def build_model(model: nn.Module, impl: str = "auto") -> ModelAdapter:
    """The adapter for `model`: "native" (Llama family), "transformers" (generic) or "auto"."""
    if impl not in ("auto", "native", "transformers"):
        raise ValueError(f"model_impl must be 'auto', 'native' or 'transformers', got {impl!r}")
    if impl == "native":
        return llama.LlamaModel(model)
    if impl == "auto":
        reason = llama.unsupported_reason(model)
        if reason is None:
            return llama.LlamaModel(model)
        logger.info("serving %s through transformers' modules (native forward: %s)",
                    type(model).__name__, reason)
    return generic.TransformersModel(model)


def kv_cache_shape(adapter: Any) -> tuple[int, int, int]:
    return adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
