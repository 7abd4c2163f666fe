"""The PyTorch attention backend: gathers blocks and runs torch's scaled_dot_product_attention.

Any device and dtype; the reference the kernels are tested against in the engine, and the path
for what no kernel covers (a float16 model on a CPU, a GPU without Triton).
- Decode rows (one new token per sequence) are batched: their blocks are gathered into a
  [num_decodes, max_blocks * block_size] view and masked beyond each context length.
- A prefill chunk with no earlier context is causal attention over its own keys, computed exactly
  as transformers' sdpa path computes a prompt; a chunk that continues a sequence (chunked
  prefill, prefix cache hit) reads its earlier keys from the cache with an offset mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .base import AttentionBackend, StepLayout, decode_table_rows, keys_view, slot_tensor


@dataclasses.dataclass
class PrefillChunk:
    start: int  # first row in the flattened batch
    num_tokens: int
    context_len: int  # tokens of the sequence in the cache after this step (earlier + these)
    block_ids: Optional[torch.Tensor]  # [blocks] int64, when there is earlier context


@dataclasses.dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    slot_blocks: torch.Tensor  # [T] int64: slot // block_size
    slot_offsets: torch.Tensor  # [T] int64: slot % block_size
    num_decodes: int  # rows [0, num_decodes) are decode tokens
    decode_block_tables: Optional[torch.Tensor]  # [num_decodes, max_blocks] int64 (0-padded)
    decode_context_lens: Optional[torch.Tensor]  # [num_decodes] int64
    decode_mask: Optional[torch.Tensor]  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillChunk]


class SdpaBackend(AttentionBackend):
    name = "torch"

    def make_metadata(self, layout: StepLayout) -> SdpaMetadata:
        dev, bs, nd = self.device, layout.block_size, layout.num_decodes
        long = dict(dtype=torch.long, device=dev)
        slots = slot_tensor(layout, dev)
        tables = lens = mask = None
        if nd:
            flat, width = decode_table_rows(layout)
            tables = torch.tensor(flat, **long).view(nd, width)
            lens = torch.tensor([s.context for s in layout.seqs[:nd]], **long)
            mask = (torch.arange(width * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1)).view(nd, 1, 1, width * bs)
        chunks = [PrefillChunk(s.first_row, s.num_rows, s.context,
                               torch.tensor(list(s.table), **long) if s.start else None)
                  for s in layout.seqs[nd:]]
        return SdpaMetadata(slots, torch.div(slots, bs, rounding_mode="floor"), torch.remainder(slots, bs), nd,
                            tables, lens, mask, chunks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: SdpaMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, meta)
        return attention(q, k, v, k_cache, v_cache, meta, scale, int(window or 0), float(softcap or 0.0))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: SdpaMetadata) -> None:
    """k, v: [T, num_kv_heads, head_dim] -> their slots of the cache, rounded to the cache's dtype
    (--kv-cache-dtype) as torch's .to() rounds."""
    kvh, d = v_cache.shape[-2:]
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if v_cache.dtype.itemsize == 1:  # fp8: no CPU index_copy_ for it; the bytes are what we store
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    keys_view(k_cache).index_put_((meta.slot_blocks, meta.slot_offsets), k)
    v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: SdpaMetadata, scale: float, window: int, softcap: float) -> torch.Tensor:
    T, H, D = q.shape
    kvh = v_cache.shape[-2]
    gqa = H != kvh
    nd = meta.num_decodes
    out = q.new_empty(T, H, D) if nd < T else None
    if nd:
        o = _decode_attention(q[:nd], k_cache, v_cache, meta, scale, gqa, window, softcap)
        if nd == T:
            return o.reshape(T, H * D)
        out[:nd] = o
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qc = q[rows].unsqueeze(0).transpose(1, 2)  # [1, H, n, D]
        n, start = chunk.context_len, chunk.context_len - chunk.num_tokens
        if chunk.block_ids is None:
            keys = k[rows].unsqueeze(0).transpose(1, 2)
            values = v[rows].unsqueeze(0).transpose(1, 2)
            if k_cache.dtype != q.dtype:  # the values as stored, as every later step (and the kernels) see them
                keys, values = keys.to(k_cache.dtype).to(q.dtype), values.to(v_cache.dtype).to(q.dtype)
        else:  # earlier context from the cache, in the query's dtype (the cache may hold another)
            keys = keys_view(k_cache).index_select(0, chunk.block_ids).view(-1, kvh, D)[:n].transpose(0, 1).unsqueeze(0)
            values = v_cache.index_select(0, chunk.block_ids).view(-1, kvh, D)[:n].transpose(0, 1).unsqueeze(0)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if chunk.block_ids is None and not window and not softcap:
            o = F.scaled_dot_product_attention(qc, keys, values, scale=scale, is_causal=True, enable_gqa=gqa)
        else:
            # row r (position start + r) sees key positions p - window < k <= p
            first = n - keys.shape[2]  # position of the first key in `keys`
            mask = visible(torch.arange(start, n, device=q.device), torch.arange(first, n, device=q.device), window)
            o = attend(qc, keys, values, mask, scale, gqa, softcap)
        out[rows] = o[0].transpose(0, 1)
    return out.view(T, H * D)


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int = 0) -> torch.Tensor:
    """[..., n, L] bool: which keys each query sees (causal, and within a sliding window if given).
    query_pos [..., n], key_pos [..., L] (or broadcastable)."""
    q, k = query_pos.unsqueeze(-1), key_pos.unsqueeze(-2)
    mask = k <= q
    if window:
        mask &= k > q - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, gqa: bool,
           softcap: float = 0.0) -> torch.Tensor:
    """q [B, H, n, D], k/v [B, KVH, L, D], mask broadcastable to [B, H, n, L] -> [B, H, n, D].
    PyTorch's sdpa; with soft-capping (which sdpa lacks), the eager computation transformers runs."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: SdpaMetadata,
                      scale: float, gqa: bool, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [nd, H, D] -> [nd, H, D]: gather each sequence's blocks, masked sdpa over them."""
    nd, _, D = q.shape
    kvh = v_cache.shape[-2]
    tables = meta.decode_block_tables.view(-1)
    # [nd * max_blocks, bs, KVH, D] -> [nd, KVH, L, D] (a strided view, as sdpa accepts)
    keys = keys_view(k_cache).index_select(0, tables).view(nd, -1, kvh, D).transpose(1, 2)
    values = v_cache.index_select(0, tables).view(nd, -1, kvh, D).transpose(1, 2)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache in another dtype (--kv-cache-dtype)
    mask = meta.decode_mask
    if window:
        L = keys.shape[2]
        last = (meta.decode_context_lens - 1).unsqueeze(1)  # [nd, 1]: each row's position
        mask = visible(last, torch.arange(L, device=q.device), window).view(nd, 1, 1, L)
    o = attend(q.unsqueeze(2), keys, values, mask, scale, gqa, softcap)
    return o.squeeze(2)  # [nd, H, D]
