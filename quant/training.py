"""Getting a model with quant 4-bit / 8-bit layers ready for adapter training (QLoRA).

`prepare_model_for_kbit_training` is the counterpart of peft's function of the same name, for
models quantized with `quant.quantize_model` (which peft's version does not recognize as k-bit):

- every parameter frozen (the adapters added afterwards are the only trainable ones);
- the parameters that stay in floating point (norms, embeddings, the output head, biases) cast
  from float16/bfloat16 to float32, so that they and the adapters' gradients are not rounded to
  16 bits (the packed 4-bit/8-bit weights are integer bytes and are left alone);
- the input embeddings' output made to require grad, so that gradients flow back into the first
  layer's adapters even though the embedding is frozen (needed by reentrant checkpointing);
- optionally gradient checkpointing (transformers' `gradient_checkpointing_enable`), which
  recomputes each decoder layer's activations in backward instead of keeping them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .linear8bit import Int8Params
from .nn import Params4bit

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _make_inputs_require_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (transformers' method when the model has it)."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if embeddings is None:
        raise ValueError("the model has no get_input_embeddings(): cannot enable input gradients")
    embeddings.register_forward_hook(_make_inputs_require_grad)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Freeze `model`, keep its non-quantized parameters in float32, enable input gradients and
    (optionally) gradient checkpointing. Returns the same model, changed in place.

    gradient_checkpointing_kwargs go to torch.utils.checkpoint (default {"use_reentrant": True},
    peft's default); checkpointing needs a model with `gradient_checkpointing_enable` (transformers)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in _HALF_DTYPES and not isinstance(param, (Params4bit, Int8Params)):
            param.data = param.data.to(torch.float32)
    enable_input_require_grads(model)
    if use_gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError("gradient checkpointing needs a model with gradient_checkpointing_enable() "
                             "(transformers)")
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # a KV cache is incompatible with recomputation in backward
    return model
