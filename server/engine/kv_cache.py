"""The paged KV cache: its dtype, its size, and its tensors. The one place these rules live
(`quantserve estimate` asks the same functions).

One tensor [layers, 2, blocks, block_size, kv_heads, head_dim] holds every layer's keys and values;
each layer sees (keys [blocks, KVH, D, block_size], values [blocks, block_size, KVH, D]) views of
it (attention/base.py says why keys are transposed within a block).
"""

from __future__ import annotations

import logging

import torch

from quantserve.kernels.cpu import paged_attention as native_kernel

from .attention import kv_cache_shapes
from .attention import triton as triton_attention

logger = logging.getLogger(__name__)

GIB = 2**30
# The default CPU cache holds the tokens this much float32 would hold: see default_cpu_budget.
DEFAULT_CPU_KV_CACHE_GIB = 1.0

# --kv-cache-dtype names -> torch dtypes (vLLM's: "fp8" is fp8_e4m3, OCP's e4m3fn: no infinities, max 448).
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def default_cpu_budget(element_size: int) -> float:
    """Bytes of the default CPU KV cache: as many tokens as 1 GiB of float32 holds (~23k tokens of the
    default model, 64 chats of prompt + answer), whatever the cache dtype, so 0.5 GiB at 16 bits. A
    server that keeps running touches all of its cache (free blocks go out never-used first), so the
    budget is resident memory, kept at what a 64-stream server needs (docs/design/memory.md)."""
    return DEFAULT_CPU_KV_CACHE_GIB * GIB * element_size / 4


def gpu_budget(total: int, utilization: float, in_use: int, activations: int, graphs: int) -> int:
    """The KV cache's share of a GPU, as vLLM computes it: `utilization` of the device's total memory,
    less what is already in use (weights, CUDA context, other processes), one step's peak activations
    and the CUDA graphs' pool."""
    return int(total * utilization) - in_use - activations - graphs


def cache_dtype(wanted: str, backend: str, compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's torch dtype for --kv-cache-dtype `wanted` on attention backend `backend` (auto:
    bfloat16 where the native CPU kernel runs, else the compute dtype, as vLLM's auto on CUDA). A
    combination that backend cannot run is refused here, at startup."""
    if wanted == "auto":
        return torch.bfloat16 if backend == "native" else compute_dtype
    if wanted not in TORCH_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(TORCH_DTYPES)}, got {wanted!r}")
    dtype = TORCH_DTYPES[wanted]
    if backend == "triton" and dtype.itemsize == 1:
        reason = triton_attention.fp8_unusable(device, dtype)
        if reason is not None:
            raise ValueError(f"kv_cache_dtype {wanted!r} with the Triton attention: {reason}; "
                             "use bfloat16 / float16, or attention_backend 'torch'")
    if backend == "native" and dtype not in native_kernel.CACHE_DTYPE_CODES:
        raise ValueError(f"kv_cache_dtype {wanted!r}: the native attention kernel does not read it")
    return dtype


def block_bytes(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize


class KVCache:
    """The cache tensors of `num_blocks` blocks. On a CPU the memory is left untouched (no RSS) until
    blocks are first used; they are zeroed then (`touch`): masked slots must hold finite numbers,
    since softmax weight 0 times NaN is NaN."""

    def __init__(self, num_blocks: int, layers: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size, self.dtype, self.device = num_blocks, block_size, dtype, device
        shape = (layers, 2, num_blocks, block_size, kv_heads, head_dim)
        if device.type == "cpu":
            self.tensor = torch.empty(shape, dtype=dtype, device=device)
            native_kernel.advise_huge_pages(self.tensor)  # before the first touch
            self.zeroed_blocks = 0
            self.touch(0)
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
            self.zeroed_blocks = num_blocks
        keys, values = kv_cache_shapes(num_blocks, block_size, kv_heads, head_dim)
        self.layers = [(self.tensor[i, 0].view(keys), self.tensor[i, 1].view(values)) for i in range(layers)]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def touch(self, max_block: int) -> None:
        """Zero the blocks up to `max_block` not yet zeroed (first use of their memory)."""
        if max_block >= self.zeroed_blocks:
            self.tensor[:, :, self.zeroed_blocks : max_block + 1].zero_()
            self.zeroed_blocks = max_block + 1

    def zero(self, num_blocks: int) -> None:
        self.tensor[:, :, :num_blocks].zero_()


def num_blocks_for(budget: float, bytes_per_block: int) -> int:
    blocks = int(budget // bytes_per_block)
    if blocks < 1:
        raise ValueError(
            f"the KV cache budget ({budget / GIB:.3f} GiB) holds no block of {bytes_per_block} bytes; "
            "give more memory (kv_cache_memory / gpu_memory_utilization)"
        )
    return blocks
