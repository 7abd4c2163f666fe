"""Launchers for the Triton kernels, and the same launchers as `triton_op`s (namespace quant_triton).

    dequantize_4bit(B, n, code, absmax, blocksize, dtype, nested=None) -> [n] tensor
    gemm_4bit(A, B, N, K, code, absmax, blocksize, bias=None, nested=None) -> A @ W.T (+ bias)
    paged_attention(q, key_cache, value_cache, work, tables, scale, window, softcap) -> [T, H, D] (attention.py)
    write_kv(k, v, key_cache, value_cache, slots): the step's new keys/values into their cache slots

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
from .paged_attention import paged_attention_kernel, paged_attention_reduce_kernel, write_kv_kernel
from .dequant import dequantize_4bit_kernel
from .gemm import gemm_4bit_kernel
from .gemv import gemv_4bit_kernel

GEMV_MAX_ROWS = 4
SPLIT_GEMM_MAX_ROWS = 64
MAX_SPLIT_K = 8  # the largest SPLIT_K in configs.py; sizes the split-K workspace
# False: config=None means configs.heuristic_config instead of autotuning (fast start, e.g. tests).
AUTOTUNE = True
# False once a server has tuned at startup (model_runner.tune): a key the tuners have not met takes
# the heuristic configuration instead of minutes of benchmarking inside a served step.
TUNE_NEW_KEYS = True

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


def _quick_bench(fn, quantiles=None):
    # Triton's default (25 ms warm-up, 100 ms of repetitions per config) made a server's startup
    # tuning of ~50 shape x bucket keys take minutes; these kernels run 5-500 us, so 20 ms still
    # times each config over 40+ runs.
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotune_options() -> dict:
    import inspect

    return {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


@functools.cache
def _gemv_tuned():
    return triton.autotune(configs=configs.gemv_configs(), key=["M_KEY", "N", "K", "BLOCKSIZE", "NESTED"],
                           prune_configs_by={"early_config_prune": configs.prune_gemv},
                           **_autotune_options())(gemv_4bit_kernel)


@functools.cache
def _gemm_tuned(split: bool):
    cfgs = [c for c in configs.gemm_configs() if split or c.kwargs["SPLIT_K"] == 1]
    return triton.autotune(configs=cfgs, key=["M_KEY", "N", "K", "BLOCKSIZE", "NESTED"],
                           prune_configs_by={"early_config_prune": configs.prune_gemm},
                           **_autotune_options())(gemm_4bit_kernel)


def _tuned(gemv: bool, split: bool, M: int, N: int, K: int, blocksize: int, nested: bool) -> bool:
    """Whether the tuner gemm_4bit would call has a choice for this key (its key begins with the
    autotune key's values: M_KEY, N, K, BLOCKSIZE, NESTED; the argument dtypes follow)."""
    tuner = _gemv_tuned() if gemv else _gemm_tuned(split)
    count, prefixes = _TUNED_PREFIXES.get(id(tuner), (-1, set()))
    if count != len(tuner.cache):  # rebuilt only when the tuner learnt something
        prefixes = {key[:5] for key in tuner.cache}
        _TUNED_PREFIXES[id(tuner)] = (len(tuner.cache), prefixes)
    return (triton.next_power_of_2(M), N, K, blocksize, nested) in prefixes


_TUNED_PREFIXES: dict[int, tuple[int, set]] = {}


def tuners() -> dict:
    """The autotuned kernels by name (tune_cache.py saves and restores their choices)."""
    return {"gemv": _gemv_tuned(), "gemm_split": _gemm_tuned(True), "gemm": _gemm_tuned(False)}


# Split-K tile counters, zero between launches (the kernels reset what they use). One buffer per
# device, grown on demand; kernels on one device and stream never overlap, so they can share it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _persistent_counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:  # a captured CUDA graph may still launch kernels on it: never free it
            _RETIRED_COUNTERS.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


_RETIRED_COUNTERS: list[torch.Tensor] = []


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
    elif config is None and not TUNE_NEW_KEYS and not _tuned(gemv, split, M, N, K, blocksize, nested is not None):
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


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    work: torch.Tensor,
    tables: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    block_q: Optional[int] = None,
    splits: int = 1,
    block_n: int = 64,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Paged attention of the rows of q [T, H, D] described by `work` (int32 [W, 4], see
    attention.py) -> out [T, H, D] in q's dtype (rows of no item are left as they were).

    key_cache: any [blocks, block_size, KVH, D] view (strided: the engine's transposed keys are
    `keys_view(k_cache)`); value_cache [blocks, block_size, KVH, D] with dense heads and dims;
    tables: int32, every item's block table at its offset. block_q: the rows per item the host
    cut (default: what fits in 16 tile rows with this GQA group); splits: key-range splits per
    item (flash-decoding), merged by a second kernel."""
    T, H, D = q.shape
    _, page, kvh, _ = key_cache.shape
    group = H // kvh
    if out is None:
        out = torch.empty_like(q)
    W = work.shape[0]
    if W == 0 or T == 0:
        return out
    if block_q is None:
        block_q = default_block_q(group, 16)
    block_m = tile_rows(group, block_q)
    d_pad = max(16, triton.next_power_of_2(D))
    if splits > 1:
        part_acc = torch.empty(W * kvh * splits * block_m * d_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(W * kvh * splits * block_m * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    ks = key_cache.stride()
    vs = value_cache.stride()
    wrap_triton(paged_attention_kernel)[(W, kvh, splits)](
        q, key_cache, value_cache, out, work, tables, part_acc, part_ml,
        float(scale), float(softcap or 0.0), int(window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        ks[0], ks[1], ks[2], ks[3], vs[0], vs[1], vs[2],
        GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=d_pad, PAGE=page, BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_N=block_n, SPLITS=splits, WINDOW=bool(window), SOFTCAP=bool(softcap),
        # a prefill tile's float32 accumulator (64 x 128: 32 KB) would take 64 registers a thread with 4 warps
        num_warps=8 if block_m * d_pad > 64 * 64 else 4,
    )
    if splits > 1:
        wrap_triton(paged_attention_reduce_kernel)[(W, kvh)](
            out, work, part_acc, part_ml, out.stride(0), out.stride(1),
            GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_M=block_m, BLOCK_Q=block_q, SPLITS=splits,
            num_warps=4,
        )
    return out


def tile_rows(group: int, block_q: int) -> int:
    """BLOCK_M: rows of a program's tile (block_q positions x group heads), a power of two >= 16
    (tl.dot's smallest tile on tensor cores)."""
    return max(16, triton.next_power_of_2(group * block_q))


def default_block_q(group: int, block_m: int) -> int:
    """Query positions per item that fill (at most) block_m tile rows with this GQA group."""
    return max(1, block_m // group)


def write_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [T, KVH, D] (dense dims) into their slots (int64 [T]; negative: skipped) of the cache,
    key_cache a [blocks, block_size, KVH, D] view, value_cache [blocks, block_size, KVH, D]."""
    T, kvh, D = k.shape
    if T == 0:
        return
    ks, vs = key_cache.stride(), value_cache.stride()
    wrap_triton(write_kv_kernel)[(T,)](
        k, v, key_cache, value_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ks[0], ks[1], ks[2], ks[3], vs[0], vs[1], vs[2],
        KV_HEADS=kvh, KV_HEADS_PAD=triton.next_power_of_2(kvh), HEAD_DIM=D, HEAD_DIM_PAD=triton.next_power_of_2(D),
        PAGE=key_cache.shape[1], num_warps=4,
    )


def decode_splits(items: int, kv_heads: int, max_context: int, sms: Optional[int] = None,
                  block_n: int = 64, max_splits: int = 16) -> int:
    """Key-range splits per item that fill the GPU: ~2 programs per SM, each with >= 2 tiles of keys."""
    sms = configs.num_sms() if sms is None else sms
    programs = max(1, items * kv_heads)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, max_splits, max_context // (2 * block_n)))


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
