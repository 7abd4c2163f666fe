"""Model adapters the runner drives: `forward_logits(input_ids, positions, meta, kv_caches, rows)`.

- llama.LlamaModel: native forward for the decoder families in families.py (fused q/k/v and
  gate/up linears, per-layer sliding windows and soft-capping in the paged attention).
- generic.TransformersModel: any other transformers causal LM, our paged attention registered
  with transformers' attention interface.
A model neither can serve raises UnsupportedModelError (a ValueError) naming why, at load.
"""

from __future__ import annotations

import logging
from typing import Any, Union

from torch import nn

from . import generic, llama

logger = logging.getLogger(__name__)

ModelAdapter = Union[llama.LlamaModel, generic.TransformersModel]


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model (one line: the model type and why)."""


def build_model(model: nn.Module, impl: str = "auto") -> ModelAdapter:
    """The adapter for `model`: "native", "transformers" (generic) or "auto" (native where it
    applies, else generic). Raises UnsupportedModelError when the asked path cannot serve it."""
    if impl not in ("auto", "native", "transformers"):
        raise ValueError(f"model_impl must be 'auto', 'native' or 'transformers', got {impl!r}")
    name = type(model).__name__
    native_reason = llama.unsupported_reason(model) if impl != "transformers" else None
    if impl == "native" and native_reason is not None:
        raise UnsupportedModelError(f"{name}: the native forward cannot serve it ({native_reason})")
    if impl != "transformers" and native_reason is None:
        return llama.LlamaModel(model)
    generic_reason = generic.unsupported_reason(model)
    if generic_reason is not None:
        native = f"native forward: {native_reason}; " if native_reason else ""
        raise UnsupportedModelError(f"cannot serve {name}: {native}transformers path: {generic_reason}")
    if native_reason is not None:
        logger.info("serving %s through transformers' modules (native forward: %s)", name, native_reason)
    return generic.TransformersModel(model)


def kv_cache_shape(adapter: Any) -> tuple[int, int, int]:
    return adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
