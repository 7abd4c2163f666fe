"""Autotuning configurations for the 4-bit matmul kernels, per GPU family.

Triton benchmarks every configuration that survives pruning on the first call for a new
(M bucket, N, K, ...) key, so each list is short. The lists are picked once per process from the
current GPU's properties; the families differ in what limits them:

- hopper  (sm_90+ datacenter, 228 KB shared memory, ~3.3-4.8 TB/s): deep pipelines, wide tiles.
- ampere  (sm_80 datacenter, 164 KB shared memory, ~1.5-2 TB/s): three or four stages.
- consumer (sm_86/89/120 and other small-shared-memory parts, ~100 KB): two or three stages.
- amd     (ROCm; 64-wide wavefronts, Triton's stream pipeliner wants num_stages=2).

A config is (BLOCK_N, BLOCK_KB, SPLIT_K, num_warps, num_stages) for the GEMV kernel (rows M <= 4,
CUDA-core FMAs) and (BLOCK_M, BLOCK_N, BLOCK_KB, SPLIT_K, num_warps, num_stages) for the tl.dot
GEMM kernel. BLOCK_KB counts packed bytes (two weights each) along K.
"""

from __future__ import annotations

import functools

import torch
import triton

# (BLOCK_N, BLOCK_KB, SPLIT_K, num_warps, num_stages)
_GEMV = {
    "hopper": [
        (4, 256, 1, 4, 4), (8, 256, 1, 4, 3), (16, 128, 1, 4, 3), (16, 256, 1, 8, 3), (32, 128, 1, 4, 2),
        (8, 512, 1, 8, 3), (8, 256, 2, 4, 3), (8, 256, 4, 4, 3), (16, 256, 4, 8, 3), (16, 128, 8, 4, 3),
    ],
    "ampere": [
        (4, 256, 1, 4, 3), (8, 256, 1, 4, 3), (16, 128, 1, 4, 3), (16, 256, 1, 8, 2), (32, 128, 1, 4, 2),
        (8, 256, 2, 4, 3), (8, 256, 4, 4, 3), (16, 128, 8, 4, 2),
    ],
    "consumer": [
        (4, 256, 1, 4, 2), (8, 256, 1, 4, 2), (16, 128, 1, 4, 2), (32, 128, 1, 4, 2), (8, 256, 2, 4, 2),
        (8, 256, 4, 4, 2),
    ],
    "amd": [
        (4, 256, 1, 4, 2), (8, 256, 1, 4, 2), (16, 128, 1, 4, 2), (16, 256, 1, 8, 2), (8, 256, 2, 4, 2),
        (8, 256, 4, 4, 2), (16, 128, 8, 4, 2),
    ],
}

# (BLOCK_M, BLOCK_N, BLOCK_KB, SPLIT_K, num_warps, num_stages)
_GEMM = {
    "hopper": [
        (16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 4), (16, 64, 64, 4, 4, 4), (16, 128, 32, 2, 4, 4),
        (32, 64, 64, 1, 4, 4), (32, 128, 64, 2, 4, 4), (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 4),
        (64, 128, 64, 1, 8, 3), (128, 128, 32, 1, 8, 3), (128, 256, 32, 1, 8, 3), (64, 256, 32, 1, 8, 4),
    ],
    "ampere": [
        (16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 3), (16, 64, 64, 4, 4, 4), (32, 64, 64, 1, 4, 4),
        (32, 128, 64, 2, 4, 3), (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3), (128, 128, 32, 1, 8, 3),
        (128, 64, 64, 1, 4, 3),
    ],
    "consumer": [
        (16, 64, 64, 1, 4, 3), (16, 128, 64, 1, 4, 2), (16, 64, 64, 4, 4, 3), (32, 64, 64, 1, 4, 3),
        (64, 64, 64, 1, 4, 3), (64, 128, 32, 1, 4, 2), (128, 64, 32, 1, 8, 2),
    ],
    "amd": [
        (16, 64, 64, 1, 4, 2), (16, 128, 64, 1, 4, 2), (16, 64, 64, 4, 4, 2), (32, 64, 64, 1, 4, 2),
        (64, 64, 64, 1, 4, 2), (64, 128, 64, 1, 8, 2), (128, 128, 32, 1, 8, 2),
    ],
}

# Small configurations for the interpreter (config="default").
DEFAULT_GEMV = dict(BLOCK_N=8, BLOCK_KB=128, SPLIT_K=1, num_warps=4, num_stages=2)
DEFAULT_GEMM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_KB=32, SPLIT_K=1, num_warps=4, num_stages=2)


def gpu_family() -> str:
    """'hopper', 'ampere', 'consumer' or 'amd' for the current GPU ('consumer' when none is visible);
    the current one, not GPU 0: a server on --device cuda:1 runs under a device guard."""
    if not torch.cuda.is_available():
        return "consumer"
    return _family(torch.cuda.current_device())


@functools.cache
def _family(index: int) -> str:
    if torch.version.hip is not None:
        return "amd"
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if props.major >= 9 and smem >= 200 * 1024:
        return "hopper"
    if props.major >= 8 and smem >= 160 * 1024:
        return "ampere"
    return "consumer"


def num_sms() -> int:
    return _num_sms(torch.cuda.current_device()) if torch.cuda.is_available() else 1


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_configs() -> list[triton.Config]:
    return [
        triton.Config(dict(BLOCK_N=bn, BLOCK_KB=bkb, SPLIT_K=sk), num_warps=w, num_stages=s)
        for bn, bkb, sk, w, s in _GEMV[gpu_family()]
    ]


def gemm_configs() -> list[triton.Config]:
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KB=bkb, SPLIT_K=sk), num_warps=w, num_stages=s)
        for bm, bn, bkb, sk, w, s in _GEMM[gpu_family()]
    ]


def _useful_split(split_k: int, tiles: int, kb: int, block_kb: int) -> bool:
    """Split K only while there are too few output tiles to fill the GPU, and each split keeps >= 2 tiles of K."""
    if split_k == 1:
        return True
    return tiles * split_k <= 4 * num_sms() and kb >= 2 * split_k * block_kb


# The GEMV multiplies a [BLOCK_M, BLOCK_N, 2 * BLOCK_KB] fp32 product in registers: keep it at
# <= 64 values per thread so it does not spill.
GEMV_PRODUCT_PER_THREAD = 64


def _gemv_fits(block_m: int, block_n: int, block_kb: int, num_warps: int) -> bool:
    return block_m * block_n * 2 * block_kb <= GEMV_PRODUCT_PER_THREAD * 32 * num_warps


def prune_gemv(configs, named_args, **kwargs):
    n, k = named_args["N"], named_args["K"]
    block_m = kwargs.get("BLOCK_M", 1)
    kb = k // 2
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_KB"] <= max(64, triton.next_power_of_2(kb))
        and c.kwargs["BLOCK_N"] <= max(4, triton.next_power_of_2(n))
        and _gemv_fits(block_m, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_KB"], c.num_warps)
        and _useful_split(c.kwargs["SPLIT_K"], triton.cdiv(n, c.kwargs["BLOCK_N"]), kb, c.kwargs["BLOCK_KB"])
    ]
    if not kept:  # wide rows (M = 4): shrink the smallest config until it fits
        cfg = min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_KB"])
        kw = dict(cfg.kwargs)
        while not _gemv_fits(block_m, kw["BLOCK_N"], kw["BLOCK_KB"], cfg.num_warps) and kw["BLOCK_KB"] > 32:
            kw["BLOCK_KB"] //= 2
        kept = [triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)]
    return kept


def prune_gemm(configs, named_args, **kwargs):
    m_key, n, k = named_args["M_KEY"], named_args["N"], named_args["K"]
    kb = k // 2
    kept = []
    for c in configs:
        bm, bn, bkb, sk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_KB", "SPLIT_K"))
        if bm > max(16, m_key) or bkb > max(32, triton.next_power_of_2(kb)):
            continue
        if bn > max(32, triton.next_power_of_2(n)):
            continue
        if not _useful_split(sk, triton.cdiv(m_key, bm) * triton.cdiv(n, bn), kb, bkb):
            continue
        kept.append(c)
    return kept or configs[:1]


def _split_for(tiles: int, kb: int, block_kb: int, max_split: int) -> int:
    split = 1
    while split < max_split and _useful_split(split * 2, tiles, kb, block_kb) and tiles * split * 2 <= 2 * num_sms():
        split *= 2
    return split


def heuristic_config(gemv: bool, M: int, N: int, K: int) -> dict:
    """One reasonable configuration without benchmarking (config="heuristic", or autotuning switched off)."""
    family = gpu_family()
    stages = 2 if family in ("consumer", "amd") else 3
    kb = K // 2
    if gemv:
        block_m = triton.next_power_of_2(M)
        block_n = 8 if N >= 2048 and block_m == 1 else 4
        block_kb = min(256, max(32, triton.next_power_of_2(kb)))
        while not _gemv_fits(block_m, block_n, block_kb, 4) and block_kb > 32:
            block_kb //= 2
        split = _split_for(triton.cdiv(N, block_n), kb, block_kb, 8)
        return dict(BLOCK_N=block_n, BLOCK_KB=block_kb, SPLIT_K=split, num_warps=4, num_stages=stages)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if block_m <= 32 else 128
    block_kb = 64 if block_m <= 64 else 32
    split = _split_for(triton.cdiv(M, block_m) * triton.cdiv(N, block_n), kb, block_kb, 4) if M <= 64 else 1
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb, SPLIT_K=split,
                num_warps=8 if block_m >= 128 else 4, num_stages=stages)
