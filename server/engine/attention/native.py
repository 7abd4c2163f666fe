"""The native CPU attention backend (kernels/cpu/paged_attention.cpp): one call per layer writes the
step's keys/values and one attends every row, decodes and prefill chunks alike, reading the paged
cache in place. Float32 queries; the cache in float32, bfloat16, float16 or fp8 (--kv-cache-dtype).

Row r of a chunk at sequence position p attends to positions 0..p through the sequence's block
table. The fused decoder step (models/fused_step.py) reads the same metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from quantserve.kernels.cpu import paged_attention as kernel

from .base import AttentionBackend, StepLayout, slot_tensor


@dataclasses.dataclass
class NativeMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    seqs: torch.Tensor  # [S, 4] int64: (first row, rows, context length, offset of its table in `tables`)
    tables: torch.Tensor  # int64: every sequence's block table at its offset
    num_decodes: int


def unusable(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
             block_size: int, cache_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why this backend cannot serve a model (None: it can)."""
    if device.type != "cpu":
        return f"the native kernel runs on a CPU (the model is on {device})"
    if dtype != torch.float32:
        return f"the native kernel takes float32 queries (the model computes in {str(dtype).removeprefix('torch.')})"
    if num_heads % num_kv_heads or head_dim > 256 or block_size > 256:
        return f"{num_heads} heads / {num_kv_heads} KV heads of {head_dim} dims in blocks of {block_size}"
    if cache_dtype is not None and cache_dtype not in kernel.CACHE_DTYPE_CODES:
        return f"a {cache_dtype} KV cache"
    if kernel.load() is None:
        return "the C++ kernel is not built (no compiler)"
    return None


class NativeBackend(AttentionBackend):
    name = "native"

    def make_metadata(self, layout: StepLayout) -> NativeMetadata:
        rows, tables, offset = [], [], 0
        for s in layout.seqs:
            rows.append((s.first_row, s.num_rows, s.context, offset))
            tables.extend(s.table)
            offset += len(s.table)
        return NativeMetadata(slot_tensor(layout, self.device),
                              torch.tensor(rows, dtype=torch.int64).view(-1, 4),
                              torch.tensor(tables or [0], dtype=torch.int64), layout.num_decodes)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: NativeMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        k_cache, v_cache = kv
        d = k.shape[-1]
        # The kernels take rows of any stride but dense heads; GPT-NeoX's interleaved q/k/v are not.
        if k.stride()[1:] != (d, 1):
            k = k.contiguous()
        if v.stride()[1:] != (d, 1):
            v = v.contiguous()
        if q.stride(2) != 1:
            q = q.contiguous()
        if not kernel.write_kv(k, v, k_cache, v_cache, meta.slot_mapping):
            raise RuntimeError(f"native KV write refused k{tuple(k.shape)} {k.dtype} into a {v_cache.dtype} cache")
        out = kernel.attention(q, k_cache, v_cache, meta.seqs, meta.tables, scale, int(window or 0),
                               float(softcap or 0.0))
        if out is None:
            raise RuntimeError(f"native attention refused q{tuple(q.shape)} {q.dtype} over a {v_cache.dtype} cache")
        return out
