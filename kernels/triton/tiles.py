"""@triton.jit helpers shared by the 4-bit kernels: absmax decoding, weight and activation tiles,
split-K ranges and the epilogue.

Format facts used here (see quant/ops.py): element e of the flattened (N, K) weight sits in byte
e // 2, high nibble for even e; its scale is absmax[e // BLOCKSIZE]. The matmul kernels need
K % BLOCKSIZE == 0 or BLOCKSIZE % K == 0 (and K even): then a row starts on a byte and the
BLOCK_KB bytes of a tile row cover whole quant blocks, or lie inside one.

Double quantization ("nested"): absmax[i] = nested_code[q[i]] * nested_absmax[i // NESTED_BLOCKSIZE]
+ offset, decoded per tile in registers, so the kernels read one byte per block instead of four.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, mask,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 absmax of quant blocks `blk` (any shape); 0 where `mask` is false (not nested)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        am = tl.load(nested_code_ptr + q) * nested + offset
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, nmask, K, kb0,
                BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCKSIZE: tl.constexpr,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_KB]: the absmax of every byte of weight rows `rn`, bytes kb0.. of the row.

    One absmax load per quant block, broadcast over its BLOCKSIZE // 2 bytes.
    """
    BYTES_PER_BLOCK: tl.constexpr = BLOCKSIZE // 2
    row_start = rn.to(tl.int64) * K + 2 * kb0  # flat element index of each tile row's first element
    if BLOCK_KB <= BYTES_PER_BLOCK:
        # The whole tile row lies in one quant block.
        am = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, row_start // BLOCKSIZE, nmask,
                         NESTED, NESTED_BLOCKSIZE)
        scales = tl.broadcast_to(am[:, None], (BLOCK_N, BLOCK_KB))
    else:
        GROUPS: tl.constexpr = BLOCK_KB // BYTES_PER_BLOCK
        g = tl.arange(0, GROUPS)
        blk = row_start[:, None] // BLOCKSIZE + g[None, :]
        valid = nmask[:, None] & ((2 * kb0 + g * BLOCKSIZE) < K)[None, :]
        am = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, valid,
                         NESTED, NESTED_BLOCKSIZE)
        scales = tl.reshape(tl.broadcast_to(am[:, :, None], (BLOCK_N, GROUPS, BYTES_PER_BLOCK)),
                            (BLOCK_N, BLOCK_KB))
    return scales


@triton.jit
def decode_tile(b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, nmask, K, kb0, kb_end,
                BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCKSIZE: tl.constexpr,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 [BLOCK_N, 2 * BLOCK_KB]: weight rows `rn`, elements 2 * kb0 .., dequantized.

    Bytes past kb_end or outside the matrix decode to finite junk (code[0] times 0 or the nested
    offset); callers mask the activations there to 0, so they add nothing.
    """
    rkb = kb0 + tl.arange(0, BLOCK_KB)
    mask = nmask[:, None] & (rkb < kb_end)[None, :]
    packed = tl.load(b_ptr + rn.to(tl.int64)[:, None] * (K // 2) + rkb[None, :], mask=mask, other=0).to(tl.int32)
    scales = tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, nmask, K, kb0,
                         BLOCK_N, BLOCK_KB, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
    hi = tl.load(code_ptr + (packed >> 4)) * scales  # even elements
    lo = tl.load(code_ptr + (packed & 15)) * scales  # odd elements
    return tl.interleave(hi, lo)


@triton.jit
def split_k_range(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_KB: tl.constexpr):
    """This split's byte range [start, end) of every weight row: whole BLOCK_KB tiles, so quant
    blocks stay aligned."""
    row_bytes = K // 2
    chunk = tl.cdiv(tl.cdiv(row_bytes, SPLIT_K), BLOCK_KB) * BLOCK_KB
    kb_start = pid_k * chunk
    return kb_start, tl.minimum(kb_start + chunk, row_bytes)


@triton.jit
def load_activations(a_ptr, rm, M, stride_am, kb0, kb_end, BLOCK_KB: tl.constexpr):
    """[BLOCK_M, 2 * BLOCK_KB] activations of rows `rm` matching weight bytes kb0.. (2 elements a
    byte), in A's dtype; 0 past the rows and past the split's end (the weight tile's junk there
    then adds nothing)."""
    rk = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
    mask = (rm < M)[:, None] & (rk < 2 * kb_end)[None, :]
    return tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :], mask=mask, other=0.0)


@triton.jit
def store_output(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = acc (+ bias), cast to out's dtype."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def split_k_epilogue(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id, pid_k,
                     HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write this program's [BLOCK_M, BLOCK_N] partial sum; the last of the SPLIT_K programs of a tile adds them.

    Each split stores its partial into its own workspace slot, then bumps the tile's counter
    (acq_rel, so its stores are visible to whoever sees the count). The program that brings the
    count to SPLIT_K sums the slots in a fixed order (deterministic), writes the output and resets
    the counter to 0 for the next launch: one kernel, no memset, CUDA-graph capturable.
    """
    if SPLIT_K == 1:
        store_output(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        slot = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + slot, acc, mask=mask)
        # Every thread's partial store happens before the (single-thread) release below.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + slot, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + tile_id, 0, sem="relaxed")
            store_output(total, rm, rn, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
