"""Paged attention against a naive dense reference: decodes (native kernel and PyTorch path),
prefill chunks with and without earlier context, grouped-query heads."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels.cpu import paged_attention as native
from quantserve.server.engine.attention import BACKENDS, SeqRows, StepLayout, keys_view, select_backend

from ...native import require_native


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


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("heads, kv_heads, block_size, dim",
                         [(9, 3, 16, 32), (4, 4, 8, 32), (8, 2, 1, 32), (6, 2, 16, 20)])
def test_mixed_batch_matches_dense_attention(backend, heads, kv_heads, block_size, dim):
    """The PyTorch backend (and the native one) on a mixed step. Unowned slots hold zeros: the
    PyTorch decode path reads whole blocks and masks, and 0 * NaN would be NaN."""
    if backend == "native":
        require_native(native.load)
    seqs = [(0, 1), (4, 1), (37, 1), (100, 1), (0, 23), (19, 7), (64, 40)]
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(
        seqs, heads, kv_heads, block_size, dim, num_blocks=300, fill=0.0)
    scale = dim**-0.5
    out = attend(backend, q, k_new, v_new, k_cache, v_cache, layout, scale).view(-1, heads, dim)
    check_against_dense(out, q, seqs, full_k, full_v, scale, atol=2e-5, rtol=1e-4)
    blocks, offsets = slot_parts(layout)
    assert torch.equal(keys_view(k_cache)[blocks, offsets], k_new)
    assert torch.equal(v_cache[blocks, offsets], v_new)


# ------------------------------------------------------------------------------ native kernel


@pytest.fixture(params=["fast", "portable"])
def native_mode(request):
    """The native kernel with its AVX-512 code (where the CPU has it) or forced to portable code."""
    require_native(native.load)
    before = native.set_fast(request.param == "fast")
    if request.param == "fast" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert native.fast_path(64, 16)
    yield request.param
    native.set_fast(before)


def build_step(seqs, heads, kv_heads, block_size, D, num_blocks=None, fill=float("nan"), seed=0):
    """A step over `seqs` [(tokens already cached, new tokens)], decodes (new == 1) first, as the
    runner builds it. Cache slots no sequence owns hold `fill` (NaN: a kernel reading a slot past
    a context end poisons its output). Returns (q, k_new, v_new, k_cache, v_cache, layout, full
    keys, full values)."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-(c + n) // block_size) for c, n in seqs)
    num_blocks = num_blocks or need + 5
    k_cache = torch.full((num_blocks, kv_heads, D, block_size), fill)
    v_cache = torch.full((num_blocks, block_size, kv_heads, D), fill)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    full_k, full_v, tables, slots, q_rows = [], [], [], [], []
    for computed, new in seqs:
        total = computed + new
        table = [perm.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        keys, values = torch.randn(total, kv_heads, D, generator=g), torch.randn(total, kv_heads, D, generator=g)
        for p in range(computed):
            keys_view(k_cache)[table[p // block_size], p % block_size] = keys[p]
            v_cache[table[p // block_size], p % block_size] = values[p]
        full_k.append(keys)
        full_v.append(values)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(computed, total)]
        q_rows.append(torch.randn(new, heads, D, generator=g))
    nd = sum(1 for _, n in seqs if n == 1)
    assert all(n == 1 for _, n in seqs[:nd])
    q = torch.cat(q_rows)
    k_new = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    v_new = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    rows, row = [], 0
    for (computed, new), table in zip(seqs, tables):
        rows.append(SeqRows(row, new, computed + new, table))
        row += new
    layout = StepLayout(rows, slots, nd, block_size)
    return q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v


def attend(backend, q, k_new, v_new, k_cache, v_cache, layout, scale, window=0, softcap=0.0):
    """One layer's attention through attention backend `backend` ("native", "torch", "triton"): its
    metadata built from the layout, the new keys/values written, every row attended."""
    heads, (_, kv_heads, D, _) = q.shape[1], k_cache.shape
    impl = BACKENDS[backend](k_cache.device, heads, kv_heads, D)
    return impl.forward(q, k_new, v_new, (k_cache, v_cache), impl.make_metadata(layout), scale, window, softcap)


def slot_parts(layout):
    """(block, offset) of every new row's slot."""
    slots = torch.tensor(list(layout.slots))
    return slots // layout.block_size, slots % layout.block_size


def run_with_threads_and_check(seqs, heads, kv_heads, D, threads):
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(seqs, heads, kv_heads, 16, D)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attend("native", q, k_new, v_new, k_cache, v_cache, layout, D**-0.5)
    finally:
        torch.set_num_threads(before)
    check_against_dense(out.view(-1, heads, D), q, seqs, full_k, full_v, D**-0.5)


def check_against_dense(out, q, seqs, full_k, full_v, scale, atol=1e-5, rtol=1e-5):
    """out [T, H, D] against float64 dense causal attention, sequence by sequence."""
    start = 0
    for (computed, new), keys, values in zip(seqs, full_k, full_v):
        ref = naive(q[start : start + new], keys, values, scale, computed)
        torch.testing.assert_close(out[start : start + new], ref, atol=atol, rtol=rtol,
                                   msg=lambda m: f"sequence (cached {computed}, new {new}): {m}")
        start += new


# Decodes with context 1, 15, 16, 17, 300; fresh prompts (lengths not multiples of the block
# size too); continuations whose earlier context ends inside, at and past a block boundary.
MIXED = [(0, 1), (14, 1), (15, 1), (16, 1), (299, 1),
         (0, 2), (0, 15), (0, 16), (0, 17), (0, 53),
         (1, 14), (15, 2), (16, 16), (17, 5), (100, 37), (283, 17)]


@pytest.mark.parametrize("heads, kv_heads, block_size, dim", [
    (9, 3, 16, 64),    # the default model's shapes
    (4, 4, 16, 64),    # MHA
    (8, 2, 16, 128),   # G = 4
    (14, 2, 32, 64),   # G = 7 (query heads in groups of 4 + 3), two key groups per block
    (6, 2, 16, 80),    # head dim 80
    (9, 3, 8, 64),     # block size 8: portable kernels
    (6, 3, 5, 20),     # odd block size and head dim: portable kernels
])
def test_native_mixed_batch_matches_dense(native_mode, heads, kv_heads, block_size, dim):
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(MIXED, heads, kv_heads, block_size, dim)
    scale = dim**-0.5
    out = attend("native", q, k_new, v_new, k_cache, v_cache, layout, scale)
    check_against_dense(out.view(-1, heads, dim), q, MIXED, full_k, full_v, scale)
    # every new token's key and value landed in its slot, bit for bit
    blocks, offsets = slot_parts(layout)
    assert torch.equal(keys_view(k_cache)[blocks, offsets], k_new)
    assert torch.equal(v_cache[blocks, offsets], v_new)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_native_many_decodes(native_mode, threads):
    """Enough decodes for whole-row items (all kv heads at once), with a prefill beside them."""
    heads, kv_heads, D = 9, 3, 64
    seqs = [(c, 1) for c in (0, 1, 14, 15, 16, 17, 31, 32, 33, 63, 64, 65, 150, 299, 511, 47, 20, 5, 8, 99)] + [(30, 33)]
    run_with_threads_and_check(seqs, heads, kv_heads, D, threads)


def test_unsupported_shape_is_refused_by_native_and_served_by_torch():
    """A head dim past the native kernel's limit: asking for the native backend is an error at
    start; auto takes the PyTorch backend, which is right."""
    require_native(native.load)
    heads, kv_heads, D = 4, 2, 272
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="native"):
        select_backend("native", cpu, torch.float32, heads, kv_heads, D, 16)
    assert select_backend("auto", cpu, torch.float32, heads, kv_heads, D, 16).name == "torch"
    seqs = [(20, 1), (0, 9), (5, 4)]
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(seqs, heads, kv_heads, 16, D, fill=0.0)
    out = attend("torch", q, k_new, v_new, k_cache, v_cache, layout, D**-0.5)
    check_against_dense(out.view(-1, heads, D), q, seqs, full_k, full_v, D**-0.5, atol=2e-5, rtol=1e-4)


def test_native_error_is_at_sdpa_level(native_mode):
    """The kernel's error against float64 is no worse than float32 sdpa's on the same rows."""
    heads, kv_heads, D = 9, 3, 64
    seqs = [(199, 1), (0, 128), (64, 64)]
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(seqs, heads, kv_heads, 16, D)
    scale = D**-0.5
    out = attend("native", q, k_new, v_new, k_cache, v_cache, layout, scale).view(-1, heads, D)
    start = 0
    for (computed, new), keys, values in zip(seqs, full_k, full_v):
        rows = q[start : start + new]
        ref = naive(rows, keys, values, scale, computed).double()
        mask = torch.arange(computed + new).unsqueeze(0) <= torch.arange(computed, computed + new).unsqueeze(1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            rows.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        ours = (out[start : start + new].double() - ref).abs().max().item()
        theirs = (sdpa.double() - ref).abs().max().item()
        assert ours <= max(2 * theirs, 1e-6), (computed, new, ours, theirs)
        start += new


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("contexts", [[1000], [700, 33], [5000], [64, 65, 200]])
def test_native_long_decodes_split_over_keys(native_mode, contexts, threads):
    """A few long decodes: their keys are split over the threads and the parts merged."""
    heads, kv_heads, D = 9, 3, 64
    seqs = [(c - 1, 1) for c in contexts]
    run_with_threads_and_check(seqs, heads, kv_heads, D, threads)


def test_native_strided_queries(native_mode):
    """q as the models pass it: a slice of a fused q/k projection (llama) or heads-major (generic)."""
    heads, kv_heads, D = 9, 3, 64
    seqs = [(40, 1), (0, 30), (20, 9)]
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step(seqs, heads, kv_heads, 16, D)
    fused = torch.cat([q, torch.zeros(q.shape[0], kv_heads, D)], dim=1)[:, :heads]  # row stride (H + KVH) * D
    heads_major = q.transpose(0, 1).contiguous().transpose(0, 1)  # head stride T * D
    for qs in (fused, heads_major):
        k2, v2 = k_cache.clone(), v_cache.clone()
        out = attend("native", qs, k_new, v_new, k2, v2, layout, D**-0.5)
        check_against_dense(out.view(-1, heads, D), q, seqs, full_k, full_v, D**-0.5)


def test_native_prefix_hit_equals_fresh_prompt(native_mode):
    """A prompt computed in one chunk, or as a continuation of its cached first 32 tokens, or in
    chunks of 16: the same attention output for the same rows, bit for bit (one kernel, whatever
    the chunking)."""
    heads, kv_heads, D = 9, 3, 64
    q, k_new, v_new, k_cache, v_cache, layout, full_k, full_v = build_step([(0, 80)], heads, kv_heads, 16, D)
    full = attend("native", q, k_new, v_new, k_cache, v_cache, layout, D**-0.5)
    table = layout.seqs[0].table
    for first in (32, 16, 64, 70):
        rest = StepLayout([SeqRows(0, 80 - first, 80, table)], layout.slots[first:], 0, 16)
        out = attend("native", q[first:], k_new[first:], v_new[first:], k_cache, v_cache, rest, D**-0.5)
        assert torch.equal(out, full[first:]), first
