"""Paged attention over a flattened batch: decode tokens first, then prefill chunks (no padding).

The KV cache of one layer is a pair of tensors: keys [num_blocks, num_kv_heads, head_dim,
block_size] (transposed within a block, so that the native decode kernel computes a block's
scores as whole-vector FMAs; `keys_view` gives the [num_blocks, block_size, heads, dim] view) and
values [num_blocks, block_size, num_kv_heads, head_dim]. Token p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size.
Per layer, the keys/values of every new token of the step are written first, then every
attention reads the cache (so a block registered for prefix sharing during scheduling is filled
before anyone reads it in the same step).

With the Triton kernels (the GPU's path, triton_attention.py), two launches per layer write the new
keys/values and attend for every row, reading the cache in place as the native kernel does.
With the native kernel (CPU, float32 queries; the cache in float32, bfloat16, float16 or fp8, see
--kv-cache-dtype), one call per layer computes every row: row r of a chunk
at sequence position p attends to positions 0..p through the sequence's block table, read in
place (decodes, fresh prompts, chunked-prefill continuations and prefix hits alike). Otherwise:
- Decode tokens (one new token per sequence) are batched: their blocks are gathered into a
  [num_decodes, max_blocks * block_size] view and masked beyond each context length.
- A prefill chunk with no earlier context is causal attention over its own keys, computed
  exactly as transformers' sdpa path computes a prompt; a chunk that continues a sequence
  (chunked prefill, prefix cache hit) reads its earlier keys from the cache with an offset mask.

Per layer, `window` (sliding-window attention: the token at position p sees p - window < k <= p,
as transformers' sliding-window mask) and `softcap` (Gemma 2's attention logit soft-capping:
score -> softcap * tanh(score / softcap)) are masks and a score transform in both paths. A block
table may name block -1 for blocks freed because no layer's window reaches them any more
(block_manager.py): the runner maps it to block 0, which is never read unmasked.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from quantserve.kernels.cpu import paged_attention as native
from . import triton_attention
from .triton_attention import TritonPlan


@dataclasses.dataclass
class PrefillChunk:
    start: int  # first row in the flattened batch
    num_tokens: int
    context_len: int  # tokens of the sequence in the cache after this step (earlier + these)
    block_ids: Optional[torch.Tensor]  # [blocks] int64, when there is earlier context


@dataclasses.dataclass
class AttentionMetadata:
    """Everything attention needs about one step's batch, built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    slot_blocks: torch.Tensor  # [T] int64: slot // block_size
    slot_offsets: torch.Tensor  # [T] int64: slot % block_size
    num_decodes: int  # rows [0, num_decodes) are decode tokens
    decode_block_tables: Optional[torch.Tensor]  # [num_decodes, max_blocks] int64 (0-padded)
    decode_context_lens: Optional[torch.Tensor]  # [num_decodes] int64
    decode_mask: Optional[torch.Tensor]  # [num_decodes, 1, 1, max_blocks * block_size] bool (PyTorch path)
    prefills: list[PrefillChunk]
    num_tokens: int
    native_decode: bool = False  # native kernels: attention reading the cache in place, cache writes
    # [T] int64, only for rope types whose frequencies depend on the sequence length (dynamic,
    # longrope): the length transformers' generate would see for each row (models/rope.py).
    rope_lengths: Optional[torch.Tensor] = None
    # The native kernel's (seqs [S, 4], block tables) for this step: built by the first layer.
    native_plan: Optional[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default=None, repr=False)
    # The Triton path's work items (triton_attention.py), built by the runner: when set, every layer
    # writes and attends with the Triton kernels (the GPU's path; the interpreter's on a CPU).
    triton: Optional[TritonPlan] = dataclasses.field(default=None, repr=False)


def keys_view(k_cache: torch.Tensor) -> torch.Tensor:
    """The key cache [blocks, KVH, D, block_size] seen as [blocks, block_size, KVH, D] (strided)."""
    return k_cache.permute(0, 3, 1, 2)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """k, v: [T, num_kv_heads, head_dim] -> their slots of the cache, rounded to the cache's dtype
    (--kv-cache-dtype) as torch's .to() rounds."""
    if meta.native_decode and native.write_kv(k, v, k_cache, v_cache, meta.slot_mapping):
        return
    kvh, d = v_cache.shape[-2:]
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if v_cache.dtype.itemsize == 1:  # fp8: no CPU index_copy_ for it; the bytes are what we store
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    keys_view(k_cache).index_put_((meta.slot_blocks, meta.slot_offsets), k)
    v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (the step's new tokens). Returns [T, H * D].
    window > 0: sliding-window attention; softcap > 0: soft-capped attention logits."""
    if meta.triton is not None:
        return triton_attention.attention(q, k, v, k_cache, v_cache, meta.triton, meta.slot_mapping, scale,
                                          int(window or 0), float(softcap or 0.0))
    write_kv(k_cache, v_cache, k, v, meta)
    window, softcap = int(window or 0), float(softcap or 0.0)
    if meta.native_decode:
        if meta.native_plan is None:
            meta.native_plan = native_plan(meta, v_cache.shape[1])
        out = native.attention(q, k_cache, v_cache, *meta.native_plan, scale, window, softcap)
        if out is not None:
            return out
    T, H, D = q.shape
    kvh = v_cache.shape[-2]
    gqa = H != kvh
    nd = meta.num_decodes
    out = q.new_empty(T, H, D) if nd < T else None
    if nd:
        o = _decode_attention_torch(q[:nd], k_cache, v_cache, meta, scale, gqa, window, softcap)
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
            if k_cache.dtype != q.dtype:  # the values as stored, as every later step (and the native path) sees them
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


def native_plan(meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seqs [S, 4], tables) for native.attention: decode rows, then the prefill chunks."""
    rows: list[tuple[int, int, int, int]] = []
    tables: list[torch.Tensor] = []
    offset = 0
    nd = meta.num_decodes
    if nd:
        max_blocks = meta.decode_block_tables.shape[1]
        tables.append(meta.decode_block_tables.reshape(-1))
        rows += [(i, 1, ctx, i * max_blocks) for i, ctx in enumerate(meta.decode_context_lens.tolist())]
        offset = nd * max_blocks
    for c in meta.prefills:
        if c.block_ids is not None:
            table = c.block_ids
        else:  # a fresh prompt: positions 0..n-1, so every block_size-th slot names the next block
            assert c.context_len == c.num_tokens
            table = meta.slot_blocks[c.start : c.start + c.num_tokens : block_size]
        rows.append((c.start, c.num_tokens, c.context_len, offset))
        tables.append(table)
        offset += table.shape[0]
    seqs = torch.tensor(rows, dtype=torch.int64).view(-1, 4)
    flat = torch.cat(tables).to(torch.int64).contiguous() if tables else torch.zeros(1, dtype=torch.int64)
    return seqs, flat


def _decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
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
    if mask is None or window:
        L = keys.shape[2]
        last = (meta.decode_context_lens - 1).unsqueeze(1)  # [nd, 1]: each row's position
        mask = visible(last, torch.arange(L, device=q.device), window).view(nd, 1, 1, L)
    o = attend(q.unsqueeze(2), keys, values, mask, scale, gqa, softcap)
    return o.squeeze(2)  # [nd, H, D]
