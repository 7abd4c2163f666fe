"""Paged attention against a naive dense reference: decodes (native kernel and PyTorch path),
prefill chunks with and without earlier context, grouped-query heads."""

from __future__ import annotations

import pytest
import torch

from server.engine import native
from server.engine.attention import AttentionMetadata, PrefillChunk, keys_view, paged_attention


def naive(q, keys, values, scale, offset):
    """q [n, H, D] at positions offset.., keys/values [L, KVH, D] -> [n, H, D] (causal)."""
    n, H, D = q.shape
    g = H // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1).double()
    v = values.repeat_interleave(g, dim=1).double()
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    pos = torch.arange(n).unsqueeze(1) + offset
    scores = scores.masked_fill(torch.arange(keys.shape[0]).unsqueeze(0) > pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize("native_decode", [False, True])
@pytest.mark.parametrize("heads, kv_heads, block_size, dim",
                         [(9, 3, 16, 32), (4, 4, 8, 32), (8, 2, 1, 32), (6, 2, 16, 20)])
def test_mixed_batch_matches_dense_attention(native_decode, heads, kv_heads, block_size, dim):
    if native_decode and native.load() is None:
        pytest.skip("native kernel unavailable (no compiler)")
    torch.manual_seed(0)
    D, num_blocks = dim, 300
    k_cache = torch.randn(num_blocks, kv_heads, D, block_size)  # keys transposed within a block
    v_cache = torch.randn(num_blocks, block_size, kv_heads, D)
    perm = torch.randperm(num_blocks).tolist()
    # (tokens already in the cache, new tokens): decodes first, then prefill chunks
    seqs = [(0, 1), (4, 1), (37, 1), (100, 1), (0, 23), (19, 7), (64, 40)]
    full_k, full_v, tables, slots, q_rows = [], [], [], [], []
    for computed, new in seqs:
        total = computed + new
        nblk = -(-total // block_size)
        table = [perm.pop() for _ in range(nblk)]
        tables.append(table)
        keys, values = torch.randn(total, kv_heads, D), torch.randn(total, kv_heads, D)
        for p in range(computed):  # earlier context already cached
            keys_view(k_cache)[table[p // block_size], p % block_size] = keys[p]
            v_cache[table[p // block_size], p % block_size] = values[p]
        full_k.append(keys)
        full_v.append(values)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(computed, total)]
        q_rows.append(torch.randn(new, heads, D))
    q = torch.cat(q_rows)
    k_new = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    v_new = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    nd = 4
    max_blocks = max(len(t) for t in tables[:nd])
    decode_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables[:nd]])
    chunks, row = [], nd
    for (computed, new), table in zip(seqs[nd:], tables[nd:]):
        context = computed + new
        ids = mask = None
        if computed:
            ids = torch.tensor(table)
            mask = torch.arange(context).unsqueeze(0) <= torch.arange(computed, context).unsqueeze(1)
        chunks.append(PrefillChunk(row, new, context, ids, mask))
        row += new
    slot_mapping = torch.tensor(slots)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping, slot_blocks=slot_mapping // block_size, slot_offsets=slot_mapping % block_size,
        num_decodes=nd, decode_block_tables=decode_tables,
        decode_context_lens=torch.tensor([c + 1 for c, _ in seqs[:nd]]), decode_mask=None, prefills=chunks,
        num_tokens=q.shape[0], native_decode=native_decode,
    )
    scale = D**-0.5
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale).view(-1, heads, D)
    start = 0
    for (computed, new), keys, values in zip(seqs, full_k, full_v):
        ref = naive(q[start : start + new], keys, values, scale, computed)
        torch.testing.assert_close(out[start : start + new], ref, atol=2e-5, rtol=1e-4)
        start += new
    # the new keys/values landed in their slots
    for (computed, new), table, keys in zip(seqs, tables, full_k):
        p = computed + new - 1
        torch.testing.assert_close(keys_view(k_cache)[table[p // block_size], p % block_size], keys[p])
