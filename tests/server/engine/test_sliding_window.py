"""Sliding windows and logit soft-capping: the attention (native kernel, fast and portable, and the
PyTorch path) against a float64 oracle; blocks behind every layer's window freed by the block
manager and never read again; a sliding-window model serving a sequence longer than its KV cache."""

from __future__ import annotations

import asyncio

import pytest
import torch

from quantserve.kernels.cpu import paged_attention as native
from quantserve.server.engine.block_manager import FREED, BlockManager
from quantserve.server.engine.sequence import SamplingParams, Sequence

from . import family_models as fm
from .conftest import run
from .helpers import assert_blocks_all_free, collect, started
from .test_attention import MIXED, attend, build_step, native_mode  # noqa: F401 - fixture
from .test_families import one_thread  # noqa: F401 - fixture


def naive(q, keys, values, scale, offset, window=0, softcap=0.0):
    """q [n, H, D] at positions offset.., keys/values [L, KVH, D] -> [n, H, D], float64: causal,
    within the window, soft-capped scores (transformers' eager attention in float64)."""
    n, H, D = q.shape
    g = H // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1).double()
    v = values.repeat_interleave(g, dim=1).double()
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(n).unsqueeze(1) + offset
    key = torch.arange(keys.shape[0]).unsqueeze(0)
    hidden = key > pos
    if window:
        hidden |= key <= pos - window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).float()


def check(out, q, seqs, full_k, full_v, scale, window, softcap, atol=2e-5, rtol=1e-4):
    start = 0
    for (computed, new), keys, values in zip(seqs, full_k, full_v):
        ref = naive(q[start : start + new], keys, values, scale, computed, window, softcap)
        torch.testing.assert_close(out[start : start + new], ref, atol=atol, rtol=rtol,
                                   msg=lambda m: f"sequence (cached {computed}, new {new}): {m}")
        start += new


def poison_out_of_window(k_cache, v_cache, meta, seqs, block_size, window, value):
    """Fill the blocks wholly before every row's window with `value`, as if freed and reused: an
    attention that reads them gives a wrong (NaN: poisoned) result."""
    tables = [s.table for s in meta.seqs if s.start]
    cached = [s.start for s in meta.seqs if s.start]
    for table, computed in zip(tables, cached):
        first_visible = computed - window + 1  # of the sequence's first new row
        for b in range(max(first_visible, 0) // block_size):
            k_cache[table[b]] = value
            v_cache[table[b]] = value


@pytest.mark.parametrize("window, softcap", [(1, 0.0), (5, 0.0), (16, 0.0), (17, 50.0), (40, 0.0), (0, 30.0), (100, 5.0)])
@pytest.mark.parametrize("heads, kv_heads, block_size, dim", [
    (9, 3, 16, 64),    # fast kernels (AVX-512 where present)
    (8, 1, 16, 256),   # Gemma 3's shape: MQA, head dim 256
    (6, 2, 5, 20),     # odd block size and head dim: portable kernels
])
def test_native_window_and_softcap(native_mode, window, softcap, heads, kv_heads, block_size, dim):
    q, k_new, v_new, k_cache, v_cache, meta, full_k, full_v = build_step(MIXED, heads, kv_heads, block_size, dim)
    if window:
        poison_out_of_window(k_cache, v_cache, meta, MIXED, block_size, window, float("nan"))
    scale = dim**-0.5
    out = attend("native", q, k_new, v_new, k_cache, v_cache, meta, scale, window, softcap)
    check(out.view(-1, heads, dim), q, MIXED, full_k, full_v, scale, window, softcap)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("contexts, window", [([1000], 100), ([5000], 4096), ([300, 70], 33), ([1000], 7)])
def test_native_long_decodes_in_a_window(native_mode, contexts, window, threads):
    """Long decodes split over the threads: only the window's keys are split and merged."""
    heads, kv_heads, D = 9, 3, 64
    seqs = [(c - 1, 1) for c in contexts]
    q, k_new, v_new, k_cache, v_cache, meta, full_k, full_v = build_step(seqs, heads, kv_heads, 16, D)
    poison_out_of_window(k_cache, v_cache, meta, seqs, 16, window, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attend("native", q, k_new, v_new, k_cache, v_cache, meta, D**-0.5, window, 0.0)
    finally:
        torch.set_num_threads(before)
    check(out.view(-1, heads, D), q, seqs, full_k, full_v, D**-0.5, window, 0.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, softcap", [(5, 0.0), (17, 50.0), (0, 30.0)])
@pytest.mark.parametrize("heads, kv_heads, block_size, dim", [(9, 3, 16, 64), (4, 4, 8, 32)])
def test_pytorch_path_window_and_softcap(window, softcap, heads, kv_heads, block_size, dim):
    """The PyTorch path reads whole blocks and masks: freed blocks hold finite garbage there (a
    reused block holds another sequence's keys), never NaN (the cache starts zeroed)."""
    q, k_new, v_new, k_cache, v_cache, meta, full_k, full_v = build_step(
        MIXED, heads, kv_heads, block_size, dim, num_blocks=300, fill=0.0)
    if window:
        poison_out_of_window(k_cache, v_cache, meta, MIXED, block_size, window, 1e4)
    scale = dim**-0.5
    out = attend("torch", q, k_new, v_new, k_cache, v_cache, meta, scale, window, softcap)
    check(out.view(-1, heads, dim), q, MIXED, full_k, full_v, scale, window, softcap)


# ------------------------------------------------------------------------------ block manager


def _seq(n: int) -> Sequence:
    return Sequence("r", list(range(100, 100 + n)), SamplingParams(max_tokens=100))


def test_blocks_behind_the_window_are_released():
    bm = BlockManager(20, 4, sliding_window=6)
    seq = _seq(30)
    assert bm.allocate(seq, 30)
    assert bm.num_free_blocks == 20 - 8
    seq.num_computed_tokens = 30  # the next token is at 30: it sees 25..30, blocks 0..5 (0..23) are dead
    assert bm.release_out_of_window(seq) == 6
    assert seq.block_table[:6] == [FREED] * 6 and FREED not in seq.block_table[6:]
    assert bm.num_free_blocks == 20 - 2
    assert bm.release_out_of_window(seq) == 0  # idempotent
    seq.num_computed_tokens = 33  # sees 28..33: block 6 (24..27) is dead now
    assert bm.release_out_of_window(seq) == 1
    assert bm.allocate(seq, 4)  # positions still index the table: 34..37 -> blocks 8, 9
    assert len(seq.block_table) == 10
    bm.free(seq)
    assert bm.num_free_blocks == 20 and all(c == 0 for c in bm.ref_counts)


def test_released_shared_blocks_stay_with_their_other_holder():
    bm = BlockManager(20, 4, sliding_window=4)
    a = _seq(17)
    assert bm.allocate(a, 17)
    b = _seq(17)
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 4 and cached[:3] == [FREED] * 3  # blocks before b's first window: not needed
    assert bm.allocate(b, 1, cached)
    assert b.block_table[:3] == [FREED] * 3 and b.block_table[3] == a.block_table[3]
    assert bm.ref_counts[a.block_table[3]] == 2
    a.num_computed_tokens = 17
    bm.release_out_of_window(a)
    assert bm.ref_counts[b.block_table[3]] == 2  # 17 - 4 + 1 = 14: block 3 (12..15) still visible
    a.num_computed_tokens = 21
    bm.release_out_of_window(a)
    assert bm.ref_counts[b.block_table[3]] == 1  # a let go; b still holds it
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 20 and all(c == 0 for c in bm.ref_counts)


def test_no_window_no_release():
    bm = BlockManager(20, 4)
    seq = _seq(30)
    assert bm.allocate(seq, 30)
    seq.num_computed_tokens = 30
    assert bm.release_out_of_window(seq) == 0 and FREED not in seq.block_table


# ------------------------------------------------------------------------------ engine


def test_sliding_model_serves_sequences_longer_than_its_cache(one_thread):
    """Mistral (every layer slides over 16 tokens) with a 4-block cache (64 tokens): a 100-token
    prompt and 60 generated tokens fit, since blocks behind the window are given back; greedy
    output equals transformers' generate."""
    from .test_families import hf_generate

    model = fm.family_model("mistral")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, fm.VOCAB, (100,), generator=g).tolist()
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        # float32 KV cache: compared token for token with transformers (float32 cache)
        engine = await started(model, None, num_kv_blocks=4, max_num_batched_tokens=32, kv_cache_dtype="float32")
        try:
            assert engine.runner.sliding_window == fm.WINDOW and engine.max_model_len > 64
            res = await collect(engine, prompt, params, "long")
            assert_blocks_all_free(engine)
            return res, engine.block_manager.num_released_out_of_window
        finally:
            await engine.shutdown()

    res, released = run(main())
    assert res.finish_reason[0] == "length" and released >= 6
    want, _ = hf_generate(model, prompt, 60)
    assert res.token_ids[0] == want
