"""The Triton paged-attention kernels on a real GPU (deselected by default; `pytest -m gpu`), on the
engine's cache layout, bf16/fp16/fp32, Llama-3-8B's head shapes and long contexts, against a float64
reference; and under CUDA-graph capture with the work items changed between replays (the decode
graphs' contract). tests/conftest.py leaves TRITON_INTERPRET unset where torch sees a GPU."""

from __future__ import annotations

import math
import os

import pytest
import torch

from .triton_helpers import work_items

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run without TRITON_INTERPRET"),
]
DEV = "cuda"


def keys_view(k_cache):
    return k_cache.permute(0, 3, 1, 2)


def case(seqs, H, KVH, D, bs, dtype, seed=0):
    """seqs [(rows, context)] -> q, k_cache [blocks, KVH, D, bs], v_cache, entries (row0, rows, ctx, table)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [math.ceil(ctx / bs) for _, ctx in seqs]
    blocks = sum(need) + 1
    k_cache = torch.randn(blocks, KVH, D, bs, generator=g, device=DEV).to(dtype)
    v_cache = torch.randn(blocks, bs, KVH, D, generator=g, device=DEV).to(dtype)
    perm = torch.randperm(blocks, device="cpu").tolist()
    q = torch.randn(sum(n for n, _ in seqs), H, D, generator=g, device=DEV).to(dtype)
    entries, row = [], 0
    for (n, ctx), b in zip(seqs, need):
        entries.append((row, n, ctx, [perm.pop() for _ in range(b)]))
        row += n
    return q, k_cache, v_cache, entries


def reference(q, k_cache, v_cache, entries, scale, window=0, softcap=0.0):
    """float64 on the GPU, vectorized per sequence: rows at positions ctx - n .. ctx - 1."""
    T, H, D = q.shape
    KVH, bs = k_cache.shape[1], k_cache.shape[3]
    out = torch.zeros(T, H, D, dtype=torch.float64, device=DEV)
    for row0, n, ctx, table in entries:
        idx = torch.tensor(table, device=DEV)
        K = keys_view(k_cache)[idx].reshape(-1, KVH, D)[:ctx].double().repeat_interleave(H // KVH, 1)  # [ctx, H, D]
        V = v_cache[idx].reshape(-1, KVH, D)[:ctx].double().repeat_interleave(H // KVH, 1)
        s = torch.einsum("rhd,khd->hrk", q[row0 : row0 + n].double(), K) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(ctx - n, ctx, device=DEV)[:, None]
        key = torch.arange(ctx, device=DEV)[None, :]
        mask = (key <= pos) & ((key > pos - window) if window else True)
        s = s.masked_fill(~mask, float("-inf"))
        out[row0 : row0 + n] = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), V)
    return out


TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (1000, 0.0), (0, 50.0)], ids=str)
@pytest.mark.parametrize("splits", [1, 8])
def test_llama3_heads_long_contexts(dtype, window, softcap, splits):
    from quantserve.kernels.triton import ops

    seqs = [(1, 4000), (1, 17), (1, 1), (300, 2100), (64, 64), (1, 1025)]  # decodes, a chunk after a prefix, a prompt
    q, kc, vc, entries = case(seqs, 32, 8, 128, 16, dtype)
    block_q = 64 // 4
    work, tables = work_items(entries, block_q, DEV)
    out = ops.paged_attention(q, keys_view(kc), vc, work, tables, 128 ** -0.5, window=window, softcap=softcap,
                              block_q=block_q, splits=splits)
    want = reference(q, kc, vc, entries, 128 ** -0.5, window, softcap)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_graph_replay_with_new_work_items():
    """Captured once with static work/tables buffers, replayed after rewriting them: equals eager."""
    from quantserve.kernels.triton import ops

    q, kc, vc, entries = case([(1, 700), (1, 33), (1, 9), (1, 2000)], 32, 8, 128, 16, torch.bfloat16)
    work, tables = work_items(entries, 1, DEV)
    static_work, static_tables = torch.zeros_like(work), torch.zeros(256, dtype=torch.int32, device=DEV)
    static_work[:, 2] = -1  # captured on rows that see no key
    out = torch.empty_like(q)

    def step():
        ops.paged_attention(q, keys_view(kc), vc, static_work, static_tables, 0.088, block_q=1, splits=4, out=out)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    static_work.copy_(work)
    static_tables[: tables.numel()].copy_(tables)
    graph.replay()
    torch.cuda.synchronize()
    eager = ops.paged_attention(q, keys_view(kc), vc, work, tables, 0.088, block_q=1, splits=4)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_write_kv_skips_negative_slots():
    from quantserve.kernels.triton import ops

    kc = torch.zeros(4, 8, 128, 16, dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros(4, 16, 8, 128, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(3, 8, 128, device=DEV).to(torch.bfloat16)
    v = torch.randn(3, 8, 128, device=DEV).to(torch.bfloat16)
    ops.write_kv(k, v, keys_view(kc), vc, torch.tensor([5, -1, 63], device=DEV))
    assert torch.equal(keys_view(kc)[0, 5], k[0]) and torch.equal(vc[3, 15], v[2])
    assert int((kc != 0).sum()) == 2 * 8 * 128 and int((vc != 0).sum()) == 2 * 8 * 128
