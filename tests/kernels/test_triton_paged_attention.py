"""The Triton paged-attention and KV-write kernels (kernels/triton/paged_attention.py) on the engine's own
cache layout (keys [blocks, KVH, D, block_size], values [blocks, block_size, KVH, D]) under
TRITON_INTERPRET=1, small shapes, fp32/fp16, against a float64 reference written from the
definition (each row's visible positions looked up one by one through its block table).

Covered: decode rows, fresh prompts and prefill chunks continuing a cached prefix in one launch;
GQA and MQA; contexts not multiples of the block size; shuffled blocks and table entries before a
sliding window pointing at a NaN-filled block (the engine's freed entries: never read); logit
soft-capping; split-K with more splits than key tiles; empty (padding) items.
TRITON_INTERPRET=1 is set for the whole run by tests/conftest.py on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from .triton_helpers import triton_module, work_items

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def kt():
    return triton_module("ops")


def keys_view(k_cache):
    return k_cache.permute(0, 3, 1, 2)  # [blocks, KVH, D, bs] -> [blocks, bs, KVH, D]


def make_case(seqs, H, KVH, D, bs, dtype, window=0, seed=0):
    """seqs: [(n_q, ctx)]. Random cache in the engine's layout with shuffled blocks; the table
    entries of blocks wholly before the first row's window name a NaN-filled block."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(ctx / bs) for _, ctx in seqs]
    num_blocks = sum(need) + 2
    nan_block = num_blocks - 1
    k_cache = torch.randn(num_blocks, KVH, D, bs, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, KVH, D, generator=g).to(dtype)
    k_cache[nan_block] = float("nan")
    v_cache[nan_block] = float("nan")
    perm = torch.randperm(num_blocks - 1, generator=g).tolist()
    T = sum(n for n, _ in seqs)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    entries, row = [], 0
    for (n_q, ctx), blocks in zip(seqs, need):
        table = [perm.pop() for _ in range(blocks)]
        if window:
            first_visible = ctx - n_q - window + 1
            for i in range(max(first_visible, 0) // bs):
                table[i] = nan_block  # freed: out of every row's window
        entries.append((row, n_q, ctx, table))
        row += n_q
    return q, k_cache, v_cache, entries


def reference(q, k_cache, v_cache, entries, scale, window=0, softcap=0.0):
    """float64, from the definition: row r of a sequence sits at position ctx - n_q + r."""
    T, H, D = q.shape
    KVH, bs = k_cache.shape[1], k_cache.shape[3]
    group = H // KVH
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for row0, n_q, ctx, table in entries:
        for r in range(n_q):
            p = ctx - n_q + r
            keys = [k for k in range(p + 1) if not window or k > p - window]
            K = torch.stack([k_cache[table[k // bs], :, :, k % bs] for k in keys]).double()  # [L, KVH, D]
            V = torch.stack([v_cache[table[k // bs], k % bs] for k in keys]).double()
            for h in range(H):
                s = K[:, h // group] @ q[row0 + r, h].double() * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                out[row0 + r, h] = torch.softmax(s, 0) @ V[:, h // group]
    return out


def assert_close(out, expected, dtype):
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


MIXED = [(1, 17), (1, 1), (12, 12), (5, 37), (1, 40)]  # decodes, a fresh prompt, a chunk after a cached prefix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("H, KVH, D, bs", [(4, 2, 32, 16), (6, 1, 80, 8), (3, 3, 16, 4)], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_mixed_batch_matches_float64(kt, dtype, H, KVH, D, bs, splits):
    q, kc, vc, entries = make_case(MIXED, H, KVH, D, bs, dtype)
    block_q = kt.default_block_q(H // KVH, 16)
    work, tables = work_items(entries, block_q)
    scale = D ** -0.5
    out = kt.paged_attention(q, keys_view(kc), vc, work, tables, scale, block_q=block_q, splits=splits, block_n=16)
    assert_close(out, reference(q, kc, vc, entries, scale), dtype)


@pytest.mark.parametrize("window, softcap", [(7, 0.0), (20, 0.0), (0, 5.0), (9, 3.0)], ids=str)
@pytest.mark.parametrize("splits", [1, 4])
def test_window_and_softcap(kt, window, softcap, splits):
    seqs = [(1, 45), (6, 30), (1, 3), (9, 9)]
    q, kc, vc, entries = make_case(seqs, 4, 2, 32, 8, torch.float32, window=window)
    work, tables = work_items(entries, 4)
    out = kt.paged_attention(q * 3, keys_view(kc), vc, work, tables, 0.2, window=window, softcap=softcap,
                             block_q=4, splits=splits, block_n=16)
    assert torch.isfinite(out).all()  # the NaN blocks behind the windows were never read
    assert_close(out, reference(q * 3, kc, vc, entries, 0.2, window, softcap), torch.float32)


def test_block_q_larger_tiles(kt):
    """Prefill tiles of 64 rows (the GPU's prefill choice): 16 positions x a group of 4."""
    q, kc, vc, entries = make_case([(40, 50), (1, 20)], 8, 2, 32, 16, torch.float32)
    work, tables = work_items(entries, 16)
    out = kt.paged_attention(q, keys_view(kc), vc, work, tables, 0.3, block_q=16, block_n=32)
    assert_close(out, reference(q, kc, vc, entries, 0.3), torch.float32)


def test_padding_items(kt):
    """rows = 0 leaves its rows untouched; pos0 = -1 (no visible key) writes zeros."""
    q, kc, vc, entries = make_case([(1, 10), (1, 5)], 4, 2, 16, 4, torch.float32)
    work, tables = work_items(entries, 1)
    work = torch.cat([work, torch.tensor([[2, 0, 0, 0], [3, 1, -1, 0]], dtype=torch.int32)])
    q = torch.cat([q, torch.randn(2, 4, 16)])
    out = torch.full_like(q, 7.0)
    for splits in (1, 2):
        kt.paged_attention(q, keys_view(kc), vc, work, tables, 0.25, block_q=1, splits=splits, out=out)
        assert_close(out[:2], reference(q[:2], kc, vc, entries, 0.25), torch.float32)
        assert (out[2] == 7.0).all() and (out[3] == 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_write_kv_engine_layout(kt, dtype):
    blocks, KVH, D, bs = 5, 2, 24, 4
    kc = torch.zeros(blocks, KVH, D, bs, dtype=dtype)
    vc = torch.zeros(blocks, bs, KVH, D, dtype=dtype)
    qkv = torch.randn(6, 3 * KVH * D).to(dtype)  # k, v as strided views of a fused projection
    k = qkv[:, KVH * D : 2 * KVH * D].view(6, KVH, D)
    v = qkv[:, 2 * KVH * D :].view(6, KVH, D)
    slots = torch.tensor([3, 17, -1, 8, 0, 19])
    kt.write_kv(k, v, keys_view(kc), vc, slots)
    ek, ev = torch.zeros_like(kc), torch.zeros_like(vc)
    keep = slots >= 0
    s = slots[keep]
    keys_view(ek).index_put_((s // bs, s % bs), k[keep])
    ev.view(-1, KVH, D).index_copy_(0, s, v[keep])
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("items, kv_heads, ctx, sms, expected", [
    (1, 8, 4096, 132, 16),  # batch-1 long context: split to fill the GPU (capped)
    (64, 8, 4096, 132, 1),  # enough programs already
    (1, 8, 100, 132, 1),  # too few key tiles to share
    (4, 8, 1024, 132, 8),
])
def test_decode_splits(kt, items, kv_heads, ctx, sms, expected):
    assert kt.decode_splits(items, kv_heads, ctx, sms=sms) == expected
