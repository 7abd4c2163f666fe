"""RMSNorms as one fused op, where a model's norm module is one.

transformers' RMSNorms (Llama, Mistral, Qwen 2/3, Phi-3, OLMo 2/3, SmolLM 3: weight * x *
rsqrt(mean(x^2) + eps), computed in float32; Gemma 1/2/3: the same with (1 + weight)) become
nn.functional.rms_norm with the multiplier and eps read off the module. The fused decoder step
(fused_step.py) reads both. tests/server/engine/test_norms.py checks, per family, that the fused
op equals the module's forward bit for bit on float32 input; any other norm module (LayerNorm,
a norm in another dtype) is called as it is.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

_EPS_NAMES = ("variance_epsilon", "eps")


class RMSNorm:
    """nn.functional.rms_norm over the last dim with a fixed multiplier (Gemma's 1 + weight already
    added) and eps."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps, self.shape = weight, float(eps), (weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.shape, self.weight, self.eps)


def _adds_one(module: nn.Module) -> bool:
    """Gemma's RMSNorms scale by (1 + weight): their weights are stored as offsets from one."""
    return type(module).__name__.startswith("Gemma")


def norm_fn(module: Optional[nn.Module]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A transformers RMSNorm in float32 as an RMSNorm, anything else as the module itself."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    eps = next((getattr(module, n) for n in _EPS_NAMES if isinstance(getattr(module, n, None), float)), None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None \
            or weight.dtype != torch.float32:
        return module
    w = weight.detach()
    return RMSNorm(1.0 + w if _adds_one(module) else w, eps)
