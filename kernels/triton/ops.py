"""Launchers for the Triton kernels, and the same launchers as `triton_op`s (namespace quant_triton).

    dequantize_4bit(B, n, code, absmax, blocksize, dtype, nested=None) -> [n] tensor
    gemm_4bit(A, B, N, K, code, absmax, blocksize, bias=None, nested=None) -> A @ W.T (+ bias)
    paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale) -> [S, H, D]

`B` is the packed weight viewed as uint8, `code` the 16 float32 code values on B's device, `absmax`
float32 per block, or uint8 codes with `nested = Nested(nested_absmax, nested_code, offset, blocksize)`.
quant/backends/triton.py calls these launchers for the quant ops on the "cuda" key. The
`torch.ops.quant_triton.*` ops wrap them with torch.library.triton_op, so torch.compile can trace
into the Triton kernels when a model calls them directly.

Kernel choice for gemm_4bit: M <= GEMV_MAX_ROWS rows use the CUDA-core GEMV; up to
SPLIT_GEMM_MAX_ROWS the tl.dot GEMM with split-K configurations; above, tl.dot without split-K.
Every launch is asynchronous and CUDA-graph capturable: no host syncs, allocations depend only on
shapes. Autotuning runs on the first call for a new shape key, so warm up before capturing a graph.
`config` overrides autotuning: a dict of meta-parameters (tests), "default" (small tiles, the
interpreter's choice) or "heuristic" (configs.heuristic_config; also what AUTOTUNE = False picks).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Union

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import configs
from .attention import paged_attention_decode_kernel, paged_attention_reduce_kernel
from .dequant import dequantize_4bit_kernel
from .gemm import gemm_4bit_kernel
from .gemv import gemv_4bit_kernel

GEMV_MAX_ROWS = 4
SPLIT_GEMM_MAX_ROWS = 64
MAX_SPLIT_K = 8  # the largest SPLIT_K in configs.py; sizes the split-K workspace
# False: config=None means configs.heuristic_config instead of autotuning (fast start, e.g. tests).
AUTOTUNE = True

Config = Union[None, str, dict]


class Nested(NamedTuple):
    """Double quantization of absmax: absmax[i] = code[q[i]] * absmax[i // blocksize] + offset."""

    absmax: torch.Tensor  # float32 [ceil(num_blocks / blocksize)]
    code: torch.Tensor  # float32 [256]
    offset: float
    blocksize: int = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Autotuned kernels, built on first use (building reads the GPU's properties).


@functools.cache
def _gemv_tuned():
    return triton.autotune(configs=configs.gemv_configs(), key=["M_KEY", "N", "K", "BLOCKSIZE", "NESTED"],
                           prune_configs_by={"early_config_prune": configs.prune_gemv})(gemv_4bit_kernel)


@functools.cache
def _gemm_tuned(split: bool):
    cfgs = [c for c in configs.gemm_configs() if split or c.kwargs["SPLIT_K"] == 1]
    return triton.autotune(configs=cfgs, key=["M_KEY", "N", "K", "BLOCKSIZE", "NESTED"],
                           prune_configs_by={"early_config_prune": configs.prune_gemm})(gemm_4bit_kernel)


# Split-K tile counters, zero between launches (the kernels reset what they use). One buffer per
# device, grown on demand; kernels on one device and stream never overlap, so they can share it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _persistent_counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _absmax_args(absmax: torch.Tensor, nested: Optional[Nested]):
    """(absmax, nested_absmax, nested_code, offset, NESTED, NESTED_BLOCKSIZE); unused pointers alias absmax."""
    if nested is None:
        return absmax, absmax, absmax, 0.0, False, 256
    return absmax, nested.absmax, nested.code, float(nested.offset), True, int(nested.blocksize)


def matmul_supported(N: int, K: int, blocksize: int) -> bool:
    """Whether the fused kernels handle this weight: rows start on a byte and on a quant block (or lie in one)."""
    return K % 2 == 0 and (K % blocksize == 0 or blocksize % K == 0) and N > 0


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    N: int,
    K: int,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    bias: Optional[torch.Tensor] = None,
    nested: Optional[Nested] = None,
    config: Config = None,
    counters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A [M, K] (contiguous rows, fp16/bf16/fp32) @ W.T (+ bias) for the 4-bit W of shape (N, K), in A's dtype.

    Needs matmul_supported(N, K, blocksize). `counters`: a zeroed int32 buffer for split-K
    (default: a persistent per-device one; pass a fresh one when tracing).
    """
    if A.dim() != 2 or A.shape[1] != K or A.stride(1) != 1:
        raise ValueError(f"A must be [M, {K}] with contiguous rows, got {tuple(A.shape)} strides {A.stride()}")
    if not matmul_supported(N, K, blocksize):
        raise ValueError(f"unsupported weight ({N}, {K}) with blocksize {blocksize}")
    M = A.shape[0]
    out = torch.empty((M, N), dtype=A.dtype, device=A.device)
    if M == 0:
        return out
    gemv = M <= GEMV_MAX_ROWS
    split = gemv or M <= SPLIT_GEMM_MAX_ROWS
    block_m = triton.next_power_of_2(M) if gemv else None
    if config is None and interpreting():
        config = "default"
    elif config is None and not AUTOTUNE:
        config = "heuristic"
    if config == "default":
        config = dict(configs.DEFAULT_GEMV if gemv else configs.DEFAULT_GEMM)
    elif config == "heuristic":
        config = configs.heuristic_config(gemv, M, N, K)

    max_split = config["SPLIT_K"] if isinstance(config, dict) else (MAX_SPLIT_K if split else 1)
    ws = torch.empty(max_split * M * N if max_split > 1 else 1, dtype=torch.float32, device=A.device)
    if counters is None:
        if isinstance(config, dict):
            bm = block_m if gemv else config["BLOCK_M"]
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, config["BLOCK_N"])
        else:  # any tile shape autotuning may pick
            tiles = triton.cdiv(M, block_m or 16) * triton.cdiv(N, 4)
        counters = _persistent_counters(A.device, tiles)

    abs_p, nabs_p, ncode_p, offset, is_nested, nested_bs = _absmax_args(absmax, nested)
    args = (A, B, code, abs_p, nabs_p, ncode_p, offset, bias if bias is not None else A, out, ws, counters,
            M, N, K, A.stride(0), out.stride(0), triton.next_power_of_2(M))
    consts = dict(BLOCKSIZE=blocksize, NESTED=is_nested, NESTED_BLOCKSIZE=nested_bs, HAS_BIAS=bias is not None)

    if gemv:
        consts["BLOCK_M"] = block_m

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(M, meta["BLOCK_M"]))

        kernel = gemv_4bit_kernel if isinstance(config, dict) else _gemv_tuned()
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        kernel = gemm_4bit_kernel if isinstance(config, dict) else _gemm_tuned(split)
    if isinstance(config, dict):
        consts.update(config)
    wrap_triton(kernel)[grid](*args, **consts)
    return out


def dequantize_4bit(
    B: torch.Tensor,
    n: int,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    nested: Optional[Nested] = None,
    block_bytes: int = 1024,
) -> torch.Tensor:
    """The n dequantized values of the packed bytes B (uint8), flat [n] in `dtype`."""
    out = torch.empty(n, dtype=dtype, device=B.device)
    if n == 0:
        return out
    abs_p, nabs_p, ncode_p, offset, is_nested, nested_bs = _absmax_args(absmax, nested)
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    wrap_triton(dequantize_4bit_kernel)[grid](
        B, code, abs_p, nabs_p, ncode_p, offset, out, n,
        BLOCKSIZE=blocksize, NESTED=is_nested, NESTED_BLOCKSIZE=nested_bs, BLOCK_BYTES=block_bytes,
        num_warps=4,
    )
    return out


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: Optional[int] = None,
    block_t: Optional[int] = None,
) -> torch.Tensor:
    """softmax(q K^T * scale) V per sequence over its paged cache; out [num_seqs, num_heads, head_dim] in q's dtype.

    The last dimension of every input must be contiguous. partition_size (tokens, a multiple of
    block_t): split each context into partitions (flash-decoding); default: split only when
    num_seqs * num_kv_heads is too small to fill the GPU.
    """
    num_seqs, num_heads, head_dim = query.shape
    _, page_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = triton.next_power_of_2(head_dim)
    if block_t is None:
        # Keeps the [group, tokens, head_dim] fp32 products of a step at <= 8K values (registers).
        block_t = max(1, min(64, 8192 // (group_pad * head_dim_pad)))
    max_context = block_tables.shape[1] * page_size
    if partition_size is None:
        programs = num_seqs * num_kv_heads
        want = triton.cdiv(2 * configs.num_sms(), programs)  # partitions per (seq, kv head) to fill the GPU
        partition_size = max(512, triton.cdiv(triton.cdiv(max_context, want), 512) * 512) if want > 1 else max_context
    partition_size = max(block_t, triton.cdiv(partition_size, block_t) * block_t)
    num_partitions = max(1, triton.cdiv(max_context, partition_size))
    split = num_partitions > 1
    if split:
        rows = num_seqs * num_heads
        partial = torch.empty(rows * num_partitions * head_dim, dtype=torch.float32, device=query.device)
        maxes = torch.empty(rows * num_partitions, dtype=torch.float32, device=query.device)
        sums = torch.empty_like(maxes)
    else:
        partial = maxes = sums = out  # unused
    wrap_triton(paged_attention_decode_kernel)[(num_seqs, num_kv_heads, num_partitions)](
        query, key_cache, value_cache, block_tables, context_lens, out, partial, maxes, sums,
        float(scale), num_partitions,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=page_size,
        BLOCK_T=block_t, PARTITION_SIZE=partition_size, SPLIT=split, num_warps=4,
    )
    if split:
        wrap_triton(paged_attention_reduce_kernel)[(num_seqs, num_heads)](
            out, partial, maxes, sums, num_heads, num_partitions, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PARTITIONS_PAD=triton.next_power_of_2(num_partitions),
            num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------
# triton_op wrappers: the same kernels as PyTorch operators torch.compile can trace into.


def _nested(nested_absmax, nested_code, offset, nested_blocksize) -> Optional[Nested]:
    if nested_absmax is None or nested_code is None:
        return None
    return Nested(nested_absmax, nested_code, offset, nested_blocksize)


@triton_op("quant_triton::gemm_4bit", mutates_args=())
def _gemm_4bit_op(
    A: torch.Tensor, B: torch.Tensor, N: int, K: int, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
    bias: Optional[torch.Tensor] = None, nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None, offset: float = 0.0, nested_blocksize: int = 256,
) -> torch.Tensor:
    counters = torch.zeros(triton.cdiv(A.shape[0], 4) * triton.cdiv(N, 4) + 1, dtype=torch.int32, device=A.device)
    return gemm_4bit(A, B, N, K, code, absmax, blocksize, bias,
                     _nested(nested_absmax, nested_code, offset, nested_blocksize), counters=counters)


@triton_op("quant_triton::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    B: torch.Tensor, n: int, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype,
    nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
    offset: float = 0.0, nested_blocksize: int = 256,
) -> torch.Tensor:
    return dequantize_4bit(B, n, code, absmax, blocksize, dtype,
                           _nested(nested_absmax, nested_code, offset, nested_blocksize))


@triton_op("quant_triton::paged_attention_decode", mutates_args=())
def _paged_attention_decode_op(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    return paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale)
