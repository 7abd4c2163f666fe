"""Fused dequantize + GEMV for a few activation rows (M <= 4): CUDA-core FMAs, fp32 accumulation.

Batch-1 decode is memory-bound: each program streams a [BLOCK_N, BLOCK_KB] tile of packed weights
per step, decodes it in registers (code table lookup times the block's absmax, double-quantized
absmax decoded in place) and multiplies it with the M activation rows. Split-K (SPLIT_K programs per
output tile, reduced in-kernel by the last one to finish) keeps the GPU busy when N is small.

Grid: (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import decode_tile, load_activations, split_k_epilogue, split_k_range


@triton.jit
def gemv_4bit_kernel(
    a_ptr, b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_am, stride_om, M_KEY,  # M_KEY: M rounded up to a power of two, the autotuning key
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    kb_start, kb_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_KB)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_KB):
        w = decode_tile(b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, nmask, K,
                        kb0, kb_end, BLOCK_N, BLOCK_KB, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)  # [BN, 2*BKB]
        x = load_activations(a_ptr, rm, M, stride_am, kb0, kb_end, BLOCK_KB)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

    tile_id = pid_m * tl.num_programs(0) + pid_n
    split_k_epilogue(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, tile_id, pid_k,
                     HAS_BIAS, SPLIT_K)
