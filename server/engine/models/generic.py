"""Any transformers causal LM, through our paged attention registered with transformers'
attention interface (`AttentionInterface`).

The whole step runs as one "sequence" of T tokens (batch 1) with each token's own position id;
transformers' modules do everything but attention, and the registered function reads and
writes the paged cache per layer (with the layer's sliding window and logit soft-capping, which
transformers passes as keyword arguments). The attention implementation is switched to ours only
for the duration of our forward, so the same model object still works with transformers' generate.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn

from ..attention import AttentionBackend

if TYPE_CHECKING:  # step_inputs imports this package
    from ..step_inputs import StepInputs

logger = logging.getLogger(__name__)

ATTENTION_NAME = "quantserve_paged"
_local = threading.local()  # the step being run on this thread: (backend, metadata, kv_caches, layer index map)
_registered = False


def _paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None)."""
    step = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called outside an engine step")
    backend, meta, kv_caches, layer_ids = step
    if kwargs.get("s_aux") is not None:  # unsupported_reason refuses such models at load
        raise NotImplementedError("attention sinks are not supported by the engine")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = layer_ids.setdefault(id(module), len(layer_ids))
    k_cache, v_cache = kv_caches[layer]
    _, H, T, D = query.shape
    if key.shape[1] != v_cache.shape[-2] or key.shape[-1] != v_cache.shape[-1] or value.shape[-1] != D:
        raise RuntimeError(
            f"layer {layer}: attention shapes q{tuple(query.shape)} k{tuple(key.shape)} v{tuple(value.shape)} "
            f"do not match the KV cache ({v_cache.shape[-2]} heads x {v_cache.shape[-1]})"
        )
    scale = scaling if scaling is not None else D**-0.5
    out = backend.forward(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                          (k_cache, v_cache), meta, scale, kwargs.get("sliding_window") or 0, kwargs.get("softcap") or 0.0)
    return out.view(1, T, H, D), None


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _paged_attention_forward)
        _registered = True


def unsupported_reason(model: nn.Module) -> Optional[str]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        return f"layer types {other} (full and sliding-window attention are supported)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention is not supported"
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        return "attention sinks are not supported"
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return "the model does not use transformers' attention interface"
    return None


class TransformersModel:
    """forward_logits(step, kv_caches) -> float32 logits of the step's logit rows, and forward(step,
    kv_caches) -> final hidden states [T, hidden], through transformers' own modules with
    `attention` (the engine's backend) as their attention."""

    def __init__(self, model: nn.Module, attention: AttentionBackend) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"cannot serve this model: {reason}")
        register()
        self.model = model
        self.attention = attention
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.sliding_window = None  # no block is freed early on this path (windows are per call)
        rope = getattr(text_config, "rope_parameters", None) or {}
        types = {rope.get("rope_type")} if "rope_type" in rope else \
            {v.get("rope_type") for v in rope.values() if isinstance(v, dict)}
        self.length_dependent_rope = any(t and ("dynamic" in t or t == "longrope") for t in types)
        if self.length_dependent_rope:
            logger.warning("rope type %s on the transformers path: its frequencies follow the longest sequence of "
                           "each step (transformers' rotary module sees the whole flattened batch)", sorted(types))
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._layer_ids: dict[int, int] = {}

    @contextlib.contextmanager
    def _paged(self, step: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """transformers' modules attend through the engine's paged attention for this block only."""
        config = self.model.config
        previous = config._attn_implementation
        _local.step = (self.attention, step.attention, kv_caches, self._layer_ids)
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous
            _local.step = None

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Final hidden states [T, hidden] of the flattened batch (the decoder's last_hidden_state:
        after its final norm, before the head), as DecoderModel.forward; embeddings pool them."""
        with self._paged(step, kv_caches):
            out = self.model.base_model(input_ids=step.input_ids.unsqueeze(0),
                                        position_ids=step.positions.unsqueeze(0), use_cache=False)
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def forward_logits(self, step: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits [len(rows), V] of the step's logit rows of the flattened batch."""
        rows = step.logit_rows
        with self._paged(step, kv_caches):
            kwargs: dict[str, Any] = dict(input_ids=step.input_ids.unsqueeze(0),
                                          position_ids=step.positions.unsqueeze(0), use_cache=False)
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = rows
            logits = self.model(**kwargs).logits[0]
        return (logits if self._logits_to_keep else logits[rows]).float()
