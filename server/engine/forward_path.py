"""The forward path of an engine, chosen once at start from the model, the device and the settings.

- fused: the whole decoder stack in one native call per step (models/fused_step.py): CPU,
  float32, the native attention kernel, a family and layer layout the C++ step covers.
- layers: the decoder forward layer by layer in Python (models/decoder.py), on any device, with
  the attention backend chosen beside it.
- transformers: transformers' own modules with our paged attention (models/generic.py): any
  causal LM the decoder forward does not cover.
`auto` takes the first of those that can serve the model and logs why the ones before it could
not. A named path that cannot serve it is refused at startup; a step the chosen path cannot run
is an error, never a silent switch to another path. /health and /metrics show the choice.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from .attention import AttentionBackend
from .models import ModelAdapter, UnsupportedModelError, decoder, families, fused_step, generic

logger = logging.getLogger(__name__)

FORWARD_PATHS = ("auto", "fused", "layers", "transformers")


@dataclasses.dataclass(frozen=True)
class ForwardChoice:
    path: str  # fused | layers | transformers
    reason: str  # why this one (for auto: why the faster ones could not serve)


def build_forward(model: nn.Module, wanted: str, attention: AttentionBackend,
                  cache_dtype: torch.dtype) -> tuple[ModelAdapter, ForwardChoice]:
    """The model adapter for forward path `wanted` and the choice made. Raises UnsupportedModelError
    when the asked path (or, for auto, every path) cannot serve the model."""
    if wanted not in FORWARD_PATHS:
        raise ValueError(f"forward must be one of {', '.join(FORWARD_PATHS)}, got {wanted!r}")
    name = type(model).__name__
    decoder_reason = families.unsupported_reason(model)
    skipped: list[str] = []
    if wanted in ("auto", "fused", "layers"):
        if decoder_reason is None:
            adapter = decoder.DecoderModel(model, attention)
            fused_reason: Optional[str] = None
            if wanted != "layers":
                fused_reason = fused_step.reason(adapter, cache_dtype)
                if fused_reason is None:
                    adapter.fused_step = fused_step.FusedStep(adapter)
                    return adapter, _chosen("fused", "one native call per step", skipped)
                if wanted == "fused":
                    raise UnsupportedModelError(f"{name}: forward 'fused' cannot serve it ({fused_reason})")
                skipped.append(f"fused: {fused_reason}")
            return adapter, _chosen("layers", f"{family_name(model)} layers in Python", skipped)
        if wanted != "auto":
            raise UnsupportedModelError(f"{name}: forward {wanted!r} cannot serve it ({decoder_reason})")
        skipped.append(f"decoder forward: {decoder_reason}")
    generic_reason = generic.unsupported_reason(model)
    if generic_reason is not None:
        raise UnsupportedModelError(f"cannot serve {name}: " + "; ".join(skipped + [f"transformers: {generic_reason}"]))
    return generic.TransformersModel(model, attention), _chosen("transformers", "transformers' modules", skipped)


def family_name(model: nn.Module) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


def _chosen(path: str, what: str, skipped: list[str]) -> ForwardChoice:
    reason = what + (f" (not {'; not '.join(skipped)})" if skipped else "")
    logger.info("forward path: %s: %s", path, reason)
    return ForwardChoice(path, reason)
