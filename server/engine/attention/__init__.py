"""Paged attention backends, one chosen per engine at start (`select_backend`).

- native (native.py): the C++ CPU kernel, float32 queries, any --kv-cache-dtype it reads.
- triton (triton.py): the Triton kernels; a GPU's backend (on a CPU only under TRITON_INTERPRET=1).
- torch (sdpa.py): blocks gathered + torch's sdpa; any device and dtype.
Each builds its own metadata from the step's layout (base.py) and is called by every layer.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import native, triton
from .base import AttentionBackend, SeqRows, StepLayout, keys_view, kv_cache_shapes
from .native import NativeBackend
from .sdpa import SdpaBackend
from .triton import TritonBackend

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[AttentionBackend]] = {"native": NativeBackend, "torch": SdpaBackend, "triton": TritonBackend}

__all__ = ["AttentionBackend", "BACKENDS", "NativeBackend", "SdpaBackend", "SeqRows", "StepLayout", "TritonBackend",
           "keys_view", "kv_cache_shapes", "resolve", "select_backend"]


def unusable(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
             block_size: int) -> Optional[str]:
    """Why backend `name` cannot serve this model on `device` (None: it can)."""
    if name == "native":
        return native.unusable(device, dtype, heads, kv_heads, head_dim, block_size)
    if name == "triton":
        return triton.unusable(device)
    return None


def resolve(wanted: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
            block_size: int) -> str:
    """The backend name for --attention-backend `wanted` ("auto": Triton on a GPU where it runs, the
    native kernel on a CPU where it applies, else torch). A named backend that cannot run is an error."""
    if wanted == "auto":
        reasons = []
        for name in ("triton", "torch") if device.type == "cuda" else ("native", "torch"):
            reason = unusable(name, device, dtype, heads, kv_heads, head_dim, block_size)
            if reason is None:
                if reasons:
                    logger.info("attention backend %s (%s)", name, "; ".join(reasons))
                return name
            reasons.append(f"{name}: {reason}")
    if wanted not in BACKENDS:
        raise ValueError(f"attention backend must be auto or one of {', '.join(BACKENDS)}, got {wanted!r}")
    reason = unusable(wanted, device, dtype, heads, kv_heads, head_dim, block_size)
    if reason is not None:
        raise ValueError(f"attention_backend {wanted!r} cannot run here: {reason}")
    return wanted


def select_backend(wanted: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                   head_dim: int, block_size: int) -> AttentionBackend:
    """The backend object `resolve` names, for a model of these shapes."""
    name = resolve(wanted, device, dtype, heads, kv_heads, head_dim, block_size)
    return BACKENDS[name](device, heads, kv_heads, head_dim)
