"""Rotary position embeddings for the decoder forward, from the model's own rotary module.

The inverse frequencies and attention scaling are the ones transformers computed when it built
the model (its rotary module's buffers, from ROPE_INIT_FUNCTIONS or the family's default), so
every rope type transformers ships (default, linear, dynamic, yarn, longrope, llama3, ...) and
per-layer-type parameters (Gemma 3's local and global bases) come for free. cos/sin are computed
as transformers computes them (float32, elementwise), per token:

- dynamic NTK and longrope depend on the sequence length: transformers recomputes the
  frequencies in each forward call from the longest position in it. Here every token a step
  computes for a sequence uses that sequence's length (prompt and output so far): what
  transformers' generate computes (the prompt in one call, then one call per token), whatever
  the chunking of the prompt, and never a function of other requests. A cached prefix would
  carry the length of the prompt that computed it, so the engine turns prefix caching off for
  them; Phi-3's switch to the long factors recomputes the sequence (families.Family).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_MAX_CACHED = 64  # dynamic-NTK frequency sets kept (one per sequence length seen recently)


class Rope:
    """cos, sin [T, rotary_dim] of one rotary embedding (one layer type) for T tokens."""

    def __init__(self, rotary: nn.Module, layer_type: Optional[str] = None) -> None:
        prefix = f"{layer_type}_" if layer_type is not None else ""
        rope_type = rotary.rope_type[layer_type] if layer_type is not None else rotary.rope_type
        original = getattr(rotary, prefix + "original_inv_freq", None)
        inv_freq = original if original is not None else getattr(rotary, prefix + "inv_freq")
        self.rotary = rotary
        self.layer_type = layer_type
        self.rope_type = rope_type
        self.inv_freq = inv_freq.detach().to(torch.float32)
        self.scaling = getattr(rotary, prefix + "attention_scaling", 1.0)
        self.dim = 2 * self.inv_freq.numel()
        self.threshold: Optional[int] = None  # sequence lengths above it change the frequencies
        config = rotary.config
        if "dynamic" in rope_type:
            self.threshold = int(getattr(rotary, "original_max_seq_len", config.max_position_embeddings))
        elif rope_type == "longrope":
            params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
            self.threshold = int(params["original_max_position_embeddings"])
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def length_dependent(self) -> bool:
        return self.threshold is not None

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """transformers' frequencies for a forward call whose longest sequence is seq_len."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        key = self.threshold + 1 if self.rope_type == "longrope" else seq_len  # longrope: one long set
        inv = self._cache.get(key)
        if inv is None:
            kwargs = {"layer_type": self.layer_type} if self.layer_type is not None else {}
            inv, _ = ROPE_INIT_FUNCTIONS[self.rope_type](self.rotary.config, self.inv_freq.device, seq_len=key, **kwargs)
            inv = inv.to(torch.float32)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = inv
        return inv

    def cos_sin(self, positions: torch.Tensor, seq_lens: Optional[torch.Tensor] = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; seq_lens [T]: the sequence length transformers would see for each
        token (used by length-dependent rope types). Returns cos, sin [T, dim] in `dtype`."""
        inv = self.inv_freq.to(positions.device)
        pos = positions.to(torch.float32).unsqueeze(-1)  # [T, 1]
        if self.threshold is not None and seq_lens is not None and bool((seq_lens > self.threshold).any()):
            rows = inv.unsqueeze(0).expand(positions.shape[0], -1).clone()
            for length in torch.unique(seq_lens[seq_lens > self.threshold]).tolist():
                rows[seq_lens == length] = self._inv_freq_for(int(length)).to(positions.device)
            freqs = pos * rows
        else:
            freqs = pos * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scaling, emb.sin() * self.scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated by cos/sin [T, 1, rotary_dim] (partial rotary: the first rotary_dim
    dims rotate, the rest pass), elementwise as transformers' apply_rotary_pos_emb."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :rd]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., rd:]), dim=-1)
