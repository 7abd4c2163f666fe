"""Fused dequantize + GEMM with tl.dot (tensor cores) for more activation rows (M > 4).

Each step decodes a [BLOCK_N, 2 * BLOCK_KB] weight tile into the activation dtype and feeds
tl.dot against a [BLOCK_M, 2 * BLOCK_KB] activation tile, accumulating in fp32. The weight is read
once per BLOCK_M rows; programs are ordered with M fastest so that the few M-tiles sharing a weight
tile run together and the second read hits L2. Split-K as in the GEMV for small M * N.

Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import decode_tile, load_activations, split_k_epilogue, split_k_range


@triton.jit
def gemm_4bit_kernel(
    a_ptr, b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_am, stride_om, M_KEY,  # M_KEY: M rounded up to a power of two, the autotuning key
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m
    pid_n = pid // grid_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    kb_start, kb_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_KB)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_KB):
        a = load_activations(a_ptr, rm, M, stride_am, kb0, kb_end, BLOCK_KB)
        w = decode_tile(b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rn, nmask, K,
                        kb0, kb_end, BLOCK_N, BLOCK_KB, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)  # [BN, 2*BKB]
        # The reference rounds the dequantized weight to the activation dtype before its matmul; so
        # does this cast, which also puts it in the tensor cores' input type.
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision="ieee")

    split_k_epilogue(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, counter_ptr, pid, pid_k,
                     HAS_BIAS, SPLIT_K)
