"""The paged-attention decode op for the engine's KV-cache layout: its contract (schema and fake),
its pure-PyTorch reference, and the Triton kernel registered for the "cuda" key where a GPU and
Triton are present (kernels/triton/attention.py). Attention is not quantization: it lives here,
with the other kernels, not in quant/.

    torch.ops.quantserve.paged_attention_decode(query, key_cache, value_cache, block_tables,
                                                context_lens, scale) -> out

The CPU engine calls its own fused C++ kernel (kernels/cpu/paged_attention.py), which reads a
different cache layout in place; this op is the GPU path's contract.
"""

from __future__ import annotations

import importlib.util

import torch

NAMESPACE = "quantserve"

_lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - the one owner of this schema

# The paged-attention decode op for the engine's KV cache layout, with its pure-PyTorch reference.
#
#     paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale) -> out
#
# - query [num_seqs, num_heads, head_dim]: one new token per sequence.
# - key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim]: token t of a sequence
#   lives in page block_tables[s, t // block_size], slot t % block_size.
# - block_tables int32 [num_seqs, max_blocks_per_seq]; entries past a sequence's last page are
#   ignored (may hold anything). context_lens int32 [num_seqs]: tokens to attend to, including the
#   current one (its K/V are already written to the cache).
# - GQA: num_heads % num_kv_heads == 0; query head h reads KV head h // (num_heads // num_kv_heads).
# - out [num_seqs, num_heads, head_dim] in query's dtype: softmax(q . k * scale) . v over the first
#   context_lens[s] tokens, computed in float32; a sequence with context length 0 gets zeros.
#
# Its reference kernel (below) gathers every sequence's pages into a contiguous
# [max_blocks * block_size] window and masks past the context length.
_lib.define(
    "paged_attention_decode"
    "(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor context_lens, "
    "float scale) -> Tensor"
)


@torch.library.register_fake(f"{NAMESPACE}::paged_attention_decode")
def _fake(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
):
    torch._check(query.dim() == 3, lambda: f"query must be [num_seqs, num_heads, head_dim], got {tuple(query.shape)}")
    torch._check(key_cache.dim() == 4, lambda: f"key_cache must be 4-D, got {tuple(key_cache.shape)}")
    torch._check(value_cache.shape == key_cache.shape, lambda: "key_cache and value_cache shapes differ")
    torch._check(key_cache.shape[3] == query.shape[2], lambda: "head_dim of query and cache differ")
    torch._check(
        query.shape[1] % key_cache.shape[2] == 0,
        lambda: f"num_heads ({query.shape[1]}) must be a multiple of num_kv_heads ({key_cache.shape[2]})",
    )
    torch._check(block_tables.dtype == torch.int32, lambda: f"block_tables must be int32, got {block_tables.dtype}")
    torch._check(context_lens.dtype == torch.int32, lambda: f"context_lens must be int32, got {context_lens.dtype}")
    torch._check(block_tables.shape[0] == query.shape[0], lambda: "block_tables needs one row per sequence")
    torch._check(context_lens.shape == (query.shape[0],), lambda: "context_lens needs one entry per sequence")
    return torch.empty_like(query)


def reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    window = block_tables.shape[1] * block_size
    pages = block_tables.long().clamp(0, num_blocks - 1)  # unused entries: any valid page, masked below
    # [num_seqs, window, num_kv_heads, head_dim] -> one KV head per query head
    k = key_cache[pages].reshape(num_seqs, window, num_kv_heads, head_dim).float()
    v = value_cache[pages].reshape(num_seqs, window, num_kv_heads, head_dim).float()
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("shd,sthd->sht", query.float(), k) * scale
    valid = torch.arange(window, device=query.device)[None, :] < context_lens.long()[:, None]  # [S, window]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(valid[:, None, :], probs, 0.0)  # all-masked rows (context 0) give NaN, then 0
    return torch.einsum("sht,sthd->shd", probs, v).to(query.dtype)


torch.library.register_kernel(f"{NAMESPACE}::paged_attention_decode", "CompositeExplicitAutograd")(reference)


def _triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or key_cache.dtype != query.dtype or value_cache.dtype != query.dtype \
            or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32 or query.dim() != 3 \
            or key_cache.dim() != 4 or query.shape[1] % key_cache.shape[2]:
        return reference(query, key_cache, value_cache, block_tables, context_lens, scale)

    def rows(t):  # the kernel needs a contiguous last dimension
        return t if t.stride(-1) == 1 else t.contiguous()

    from .triton import ops

    return ops.paged_attention_decode(
        rows(query), rows(key_cache), rows(value_cache), rows(block_tables), context_lens.contiguous(), scale
    )


def _register_cuda() -> None:
    # Without a GPU, CUDA tensors (if any) would take the reference through CompositeExplicitAutograd.
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        torch.library.register_kernel(f"{NAMESPACE}::paged_attention_decode", "cuda")(_triton)


_register_cuda()
