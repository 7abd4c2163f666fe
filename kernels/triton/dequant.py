"""Dequantize packed NF4/FP4 weights to fp32/fp16/bf16 (flat blocks, any element count).

Each program decodes BLOCK_BYTES packed bytes into 2 * BLOCK_BYTES output elements: a code table
lookup per nibble times its block's absmax in fp32, rounded once to the output dtype (as the
reference does), high nibble first. Grid: (cdiv(nbytes, BLOCK_BYTES),).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import load_absmax


@triton.jit
def dequantize_4bit_kernel(
    b_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr, n,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    BYTES_PER_BLOCK: tl.constexpr = BLOCKSIZE // 2
    start = tl.program_id(0).to(tl.int64) * BLOCK_BYTES  # first byte; a multiple of BYTES_PER_BLOCK or inside one
    rb = start + tl.arange(0, BLOCK_BYTES)
    nbytes = (n + 1) // 2
    packed = tl.load(b_ptr + rb, mask=rb < nbytes, other=0).to(tl.int32)
    if BLOCK_BYTES <= BYTES_PER_BLOCK:
        am = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, start // BYTES_PER_BLOCK,
                         start < nbytes, NESTED, NESTED_BLOCKSIZE)
        scales = tl.broadcast_to(am, (BLOCK_BYTES,))
    else:
        GROUPS: tl.constexpr = BLOCK_BYTES // BYTES_PER_BLOCK
        blk = start // BYTES_PER_BLOCK + tl.arange(0, GROUPS)
        am = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk, blk < tl.cdiv(n, BLOCKSIZE),
                         NESTED, NESTED_BLOCKSIZE)
        scales = tl.reshape(tl.broadcast_to(am[:, None], (GROUPS, BYTES_PER_BLOCK)), (BLOCK_BYTES,))
    dtype = out_ptr.dtype.element_ty
    hi = (tl.load(code_ptr + (packed >> 4)) * scales).to(dtype)
    lo = (tl.load(code_ptr + (packed & 15)) * scales).to(dtype)
    re = 2 * start + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + re, tl.interleave(hi, lo), mask=re < n)
