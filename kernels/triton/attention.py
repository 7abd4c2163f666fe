"""Paged-attention decode: one query token per sequence against its paged KV cache.

Layout (the engine's cache): key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim];
block_tables int32 [num_seqs, max_blocks_per_seq] (page i of sequence s holds its tokens
i * block_size ..); context_lens int32 [num_seqs]. Entries of a block table past the sequence's
last page are never read.

One program per (sequence, KV head, context partition) handles every query head of its GQA group,
so each K/V row is read once. It streams BLOCK_T tokens per step (looking their pages up in the
block table) with an online softmax in fp32. With more than one partition (flash-decoding, for few
sequences with long contexts) each program writes an unnormalized partial output plus its running
max and sum, and `paged_attention_reduce_kernel` combines them. The partition count comes from the
block table's width, never from context_lens, so the launch needs no host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, partial_ptr, max_ptr, sum_ptr,
    scale, num_partitions,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    stride_os, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, PARTITION_SIZE: tl.constexpr, SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    d = tl.arange(0, HEAD_DIM_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [G, D]

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), dtype=tl.float32)
    t_start = part * PARTITION_SIZE
    t_end = tl.minimum(t_start + PARTITION_SIZE, context_len)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < t_end
        page = tl.load(table + t // PAGE_SIZE, mask=tmask, other=0).to(tl.int64)
        in_page = t % PAGE_SIZE
        kd_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (page * stride_kb + in_page * stride_kt + kv_head * stride_kh)[:, None] + d[None, :],
                    mask=kd_mask, other=0.0).to(tl.float32)  # [T, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, T]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: this step has at least one token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (page * stride_vb + in_page * stride_vt + kv_head * stride_vh)[:, None] + d[None, :],
                    mask=kd_mask, other=0.0).to(tl.float32)  # [T, D]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    hd_mask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        row = seq * (tl.num_programs(1) * GROUP) + heads  # [G], index of (seq, head)
        stat = row * num_partitions + part
        tl.store(max_ptr + stat, m_i, mask=gmask)
        tl.store(sum_ptr + stat, l_i, mask=gmask)
        tl.store(partial_ptr + stat.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc, mask=hd_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context: acc = 0, zeros out
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_mask)


@triton.jit
def paged_attention_reduce_kernel(
    out_ptr, partial_ptr, max_ptr, sum_ptr, num_heads, num_partitions, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PARTITIONS_PAD: tl.constexpr,
):
    """Combine the partitions of one (sequence, head): grid (num_seqs, num_heads)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * num_heads + head
    p = tl.arange(0, PARTITIONS_PAD)
    pmask = p < num_partitions
    d = tl.arange(0, HEAD_DIM_PAD)
    dmask = d < HEAD_DIM
    m = tl.load(max_ptr + row * num_partitions + p, mask=pmask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # an empty context: every partition is empty
    # Partitions past the context never ran a step: their max is -inf and they weigh 0.
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    total = tl.sum(w * tl.load(sum_ptr + row * num_partitions + p, mask=pmask, other=0.0), axis=0)
    parts = tl.load(partial_ptr + (row * num_partitions + p).to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                    mask=pmask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, axis=0)
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
