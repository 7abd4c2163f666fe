"""Paged attention in Triton on the engine's KV cache, for decode rows and prefill chunks alike.

The cache is read in place through a [blocks, block_size, kv_heads, head_dim] view given by its
four strides, so one kernel serves the engine's layout (keys transposed within a block:
[blocks, kv_heads, head_dim, block_size]) and a plain [blocks, block_size, kv_heads, head_dim] one
alike. Values are [blocks, block_size, kv_heads, head_dim] with dense dims.

Work items (int32 [W, 4]): (first row, rows, position of the first row, offset of the sequence's
block table in `tables`). Row r of an item sits at position pos0 + r of its sequence and attends
to key positions k <= pos0 + r (and k > pos0 + r - window with a sliding window); the item's
keys, new ones included, are already in the cache. The host cuts each sequence's rows into items
of at most BLOCK_Q rows; a decode is an item of one row. rows = 0 is an empty item (padding of a
captured batch): nothing is written. pos0 = -1 with one row: no key is visible, the row gets zeros.

One program per (item, KV head, split) computes a [BLOCK_M, head_dim] tile whose rows are
(query position, query head of the KV head's GQA group) pairs, so each K/V tile is loaded once
for the whole group and multiplied with tl.dot (tensor cores; BLOCK_M >= 16 for them): scores
q @ K^T [BLOCK_M, BLOCK_N] in float32, online softmax in float32, P (cast to the query's dtype, as
FlashAttention does) @ V accumulated in float32. The cache may hold another dtype than the queries
(--kv-cache-dtype: float32, bfloat16, float16, fp8 where the GPU converts it): K and V tiles are
converted to the query's dtype as they are loaded; the KV write rounds to the cache's dtype
(nearest, ties to even). Page lookups are per key (t // block_size), so
BLOCK_N does not depend on the block size.

Split-K (flash-decoding): with SPLITS > 1 each program takes 1/SPLITS of its item's visible key
range (whole BLOCK_N tiles) and writes an unnormalized partial output with its running max and
sum; `paged_attention_reduce_kernel` merges them. The ranges come from each item's own context, so
a grid fixed at CUDA-graph capture still spreads a short context over every split. Every launch is
asynchronous and capturable: no host syncs, allocations depend on shapes only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tl has no tanh on every Triton version the engine meets; exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, work_ptr, tables_ptr, part_acc_ptr, part_ml_ptr,
    scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row0 = tl.load(work_ptr + item * 4)
    nrows = tl.load(work_ptr + item * 4 + 1)
    pos0 = tl.load(work_ptr + item * 4 + 2)
    table = tables_ptr + tl.load(work_ptr + item * 4 + 3).to(tl.int64)

    m = tl.arange(0, BLOCK_M)
    qi = m // GROUP  # query position within the item
    head = kv_head * GROUP + m % GROUP
    rmask = (qi < nrows) & (qi < BLOCK_Q)
    d = tl.arange(0, HEAD_DIM_PAD)
    dmask = d < HEAD_DIM
    rows = (row0 + qi).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [M, D]
    pos = pos0 + qi  # [M]

    # Visible keys of the whole item: [lo, hi); this split's share of them: [k_start, k_end).
    hi = pos0 + nrows
    lo = 0
    if WINDOW:
        lo = tl.maximum(pos0 - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK_N) * BLOCK_N
    k_start = lo + split * chunk
    k_end = tl.minimum(k_start + chunk, hi)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_N):
        t = k0 + tl.arange(0, BLOCK_N)
        tmask = t < k_end
        page = tl.load(table + t // PAGE, mask=tmask, other=0).to(tl.int64)
        slot = page * stride_kb + (t % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + slot[None, :] + d[:, None] * stride_kd,
                    mask=dmask[:, None] & tmask[None, :], other=0.0).to(q.dtype)  # [D, N], from the cache's dtype
        s = tl.dot(q, k, input_precision="ieee") * scale  # [M, N] float32
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        vis = tmask[None, :] & (t[None, :] <= pos[:, None])
        if WINDOW:
            vis = vis & (t[None, :] > pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vslot = page * stride_vb + (t % PAGE) * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + vslot[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :],
                    other=0.0).to(q.dtype)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # nothing visible: zeros
        tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    else:
        part = ((item * tl.num_programs(1) + kv_head) * SPLITS + split).to(tl.int64) * BLOCK_M + m  # [M]
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc)


@triton.jit
def paged_attention_reduce_kernel(
    out_ptr, work_ptr, part_acc_ptr, part_ml_ptr, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, SPLITS: tl.constexpr,
):
    """Merge the SPLITS partial tiles of one (item, KV head): grid (items, kv_heads)."""
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    row0 = tl.load(work_ptr + item * 4)
    nrows = tl.load(work_ptr + item * 4 + 1)
    m = tl.arange(0, BLOCK_M)
    qi = m // GROUP
    head = kv_head * GROUP + m % GROUP
    rmask = (qi < nrows) & (qi < BLOCK_Q)
    d = tl.arange(0, HEAD_DIM_PAD)
    dmask = d < HEAD_DIM
    m_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=tl.float32)
    for split in range(SPLITS):
        part = ((item * tl.num_programs(1) + kv_head) * SPLITS + split).to(tl.int64) * BLOCK_M + m
        m_s = tl.load(part_ml_ptr + part * 2)
        l_s = tl.load(part_ml_ptr + part * 2 + 1)
        a_s = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :])
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty split weighs exp(-inf) = 0
        alpha = tl.exp(m_run - m_safe)
        beta = tl.exp(m_s - m_safe)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
    rows = (row0 + qi).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_kslot, stride_kh_c, stride_kd, stride_vb, stride_vslot, stride_vh_c,
    KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):
    """k, v [T, kv_heads, head_dim] into their cache slots; grid (T,), one token's heads per
    program. A negative slot (a padded row of a captured batch) writes nothing."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        h = tl.arange(0, KV_HEADS_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
        block = slot // PAGE
        off = slot % PAGE
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(k_cache_ptr + block * stride_kb + off * stride_kslot + h[:, None] * stride_kh_c
                 + d[None, :] * stride_kd, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + block * stride_vb + off * stride_vslot + h[:, None] * stride_vh_c + d[None, :],
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)
