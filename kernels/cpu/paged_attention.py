"""The engine's native CPU kernel (paged_attention.cpp, next to this file): paged attention read in place, for
decode rows and prefill chunks alike, one call per layer.

Built on first use by kernels/cpu/build.py: without a C++ compiler `attention` returns None and the
engine uses its pure-PyTorch attention; a failed build raises.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .build import NativeLibrary

# The `cache_dtype` code the C functions take last: the element type of k_cache / v_cache. Queries,
# outputs and the new keys/values given to qs_write_kv are float32 whatever the cache holds; the
# kernel converts cache elements to float32 exactly as it loads them, and qs_write_kv rounds to the
# cache dtype as torch's .to() does (nearest, ties to even).
CACHE_DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 4,
}


_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "qs_abi_version": (_I, []),
    "qs_set_fast": (_I, [_I]),
    "qs_fast_path": (_I, [_L, _L]),
    # q, q row/head strides, k_cache, v_cache, out, out row stride, seqs, S, tables, H, KVH, D, BS, scale,
    # window, softcap, threads, cache_dtype
    "qs_paged_attention": (_I, [_P, _L, _L, _P, _P, _P, _L, _P, _L, _P, _L, _L, _L, _L, _F, _L, _F, _I, _I]),
    # k, k row stride, v, v row stride, k_cache, v_cache, slots, T, KVH, D, BS, cache_dtype
    "qs_write_kv": (_I, [_P, _L, _P, _L, _P, _P, _P, _L, _L, _L, _L, _I]),
}


# -ffp-contract=off: no fused multiply-adds but the explicit ones: the compiler would fuse the
# portable loops' vector and scalar copies differently, and a row's result would depend on its tile.
# ABI 7: the cache_dtype code appended to qs_paged_attention and qs_write_kv.
_LIB = NativeLibrary("paged_attention.cpp", _SIGNATURES, ("qs_abi_version", 7), "using PyTorch attention",
                     extra_flags=("-ffp-contract=off",))
load = _LIB.load  # the library (built on first use), None without a compiler (kernels/cpu/build.py)


def supported(v_cache: torch.Tensor, num_heads: int) -> bool:
    """Whether the native kernel handles this cache (on CPU, a dtype of CACHE_DTYPE_CODES, sizes
    within its limits). Queries must be float32 whatever the cache dtype."""
    _, block_size, kv_heads, head_dim = v_cache.shape
    return (v_cache.device.type == "cpu" and v_cache.dtype in CACHE_DTYPE_CODES and num_heads % kv_heads == 0
            and head_dim <= 256 and block_size <= 256)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: torch.Tensor,
    tables: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> Optional[torch.Tensor]:
    """Attention of every row of q [T, H, D] (float32; rows and heads may be strided, dims dense)
    against the paged cache (k_cache [blocks, KVH, D, block_size], v_cache [blocks, block_size,
    KVH, D], both of one dtype of CACHE_DTYPE_CODES) -> [T, H * D] float32. seqs [S, 4] int64: (first row, rows, context length, offset of its block
    table in tables), the rows being the sequence's last positions (causal); every row of q must
    belong to one entry. window > 0: the row at position p sees keys p - window < k <= p only (the
    table entries of blocks before every row's window are not read); softcap > 0: scores become
    softcap * tanh(score / softcap). None if the kernel is unavailable or does not take these shapes."""
    lib = load()
    code = CACHE_DTYPE_CODES.get(v_cache.dtype)
    if lib is None or q.dtype != torch.float32 or q.stride(2) != 1 or code is None or k_cache.dtype != v_cache.dtype:
        return None
    T, H, D = q.shape
    _, bs, kvh, _ = v_cache.shape
    out = q.new_empty(T, H * D)
    rc = lib.qs_paged_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), H * D,
        seqs.data_ptr(), seqs.shape[0], tables.data_ptr(), H, kvh, D, bs, scale, int(window), float(softcap),
        torch.get_num_threads(), code,
    )
    return None if rc else out


def fast_path(head_dim: int, block_size: int) -> bool:
    """Whether attention with these sizes runs the AVX-512 kernels (else the portable ones)."""
    lib = load()
    return lib is not None and bool(lib.qs_fast_path(head_dim, block_size))


def set_fast(allow: bool) -> bool:
    """Allow (default) or forbid the AVX-512 kernels (tests run the portable ones this way).
    Returns the previous setting; False if the library is unavailable."""
    lib = load()
    return bool(lib.qs_set_fast(int(allow))) if lib is not None else False


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> bool:
    """k, v [T, KVH, D] (float32; rows may be strided, heads and dims dense) into their cache
    slots (k_cache [blocks, KVH, D, block_size], v_cache [blocks, block_size, KVH, D], one dtype of
    CACHE_DTYPE_CODES: rounded to it as torch's .to() does).
    False if the kernel is unavailable or the layout is not one it takes."""
    lib = load()
    T, kvh, d = k.shape
    code = CACHE_DTYPE_CODES.get(v_cache.dtype)
    if (lib is None or code is None or k_cache.dtype != v_cache.dtype or k.dtype != torch.float32
            or v.dtype != torch.float32 or k.stride()[1:] != (d, 1) or v.stride()[1:] != (d, 1)
            or not slots.is_contiguous()):
        return False
    bs = v_cache.shape[1]
    return lib.qs_write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                           v_cache.data_ptr(), slots.data_ptr(), T, kvh, d, bs, code) == 0


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages (MADV_HUGEPAGE; THP
    in "madvise" mode, the common default, uses them only where asked). Decode attention reads
    each sequence's blocks scattered across the KV cache: with 4 KiB pages most of those reads
    also miss the TLB (16 decodes, context 200: 8.5 -> 7.0 ms in a kernel benchmark). False where
    unsupported; harmless either way."""
    huge = 2 << 20
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    begin, end = (start + huge - 1) // huge * huge, (start + nbytes) // huge * huge
    if t.device.type != "cpu" or end - begin < huge:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise(begin, end - begin, 14) == 0  # MADV_HUGEPAGE


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (omp_pause_resource_all, soft).

    libgomp keeps a pool of workers per thread that ever ran a parallel region. Once the workers
    of all pools outnumber the CPUs, it throttles their spin-waiting, and every parallel region of
    the engine thread then pays a futex wake-up: a model step ran ~35-60% slower on 2 cores when
    the thread that loaded the model (or the event loop's thread) still held its pool. The pool
    comes back by itself if the thread runs parallel code again. False if unavailable.
    """
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the runtime torch already loaded (same soname)
        return gomp.omp_pause_resource_all(1) == 0  # 1 = omp_pause_soft
    except (OSError, AttributeError):
        return False
