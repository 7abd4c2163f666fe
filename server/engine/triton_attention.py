"""The engine's Triton attention path: one step's work items for the paged-attention kernel
(kernels/triton/attention.py), and the per-layer call that writes the new keys/values and attends.

The runner builds a `TritonPlan` once per step from host lists (no device reads); every layer then
launches two kernels: the KV write and the attention over the whole flattened batch (decode rows and
prefill chunks in one launch, the cache read in place). The same plan, held in static buffers, is
what a captured decode graph replays (cuda_graphs.py).

On a GPU this is the default; on a CPU it runs only under the Triton interpreter (TRITON_INTERPRET=1
from the start of the process), which is how CI checks it end to end against the native path.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

# Tile rows (query positions x GQA group) per program: decode items hold one position, so the
# smallest tl.dot tile; prefill items take 64 rows (16 positions of a group of 4).
DECODE_TILE_ROWS = 16
PREFILL_TILE_ROWS = 64
BLOCK_N = 64  # keys per inner step


@dataclasses.dataclass
class TritonPlan:
    work: torch.Tensor  # int32 [W, 4]: (first row, rows, position of the first row, table offset)
    tables: torch.Tensor  # int32: every sequence's block table at its offset
    block_q: int  # rows per item the host cut
    splits: int  # key-range splits per item (flash-decoding)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One sequence of the step: its rows are the last `num_rows` positions of its first `context` tokens."""

    first_row: int
    num_rows: int
    context: int
    table: Sequence[int]  # block ids covering the context (freed entries already mapped to a real block)


def block_q_for(group: int, has_prefill: bool) -> int:
    """Positions per work item: 1 for a decode-only step, else what fills PREFILL_TILE_ROWS."""
    return max(1, PREFILL_TILE_ROWS // group) if has_prefill else 1


def work_items(entries: Sequence[Entry], block_q: int) -> tuple[list[int], list[int]]:
    """(work, tables) as flat host lists: each entry's rows cut into items of <= block_q rows."""
    work: list[int] = []
    tables: list[int] = []
    for e in entries:
        offset = len(tables)
        tables.extend(e.table)
        start = e.context - e.num_rows
        for j in range(0, e.num_rows, block_q):
            work += (e.first_row + j, min(block_q, e.num_rows - j), start + j, offset)
    return work, tables


def build_plan(entries: Sequence[Entry], group: int, kv_heads: int, device: torch.device,
               splits: Optional[int] = None) -> TritonPlan:
    """The step's plan; splits default to what fills the GPU for a decode-only step (1 with prefills)."""
    from quantserve.kernels.triton import ops

    has_prefill = any(e.num_rows > 1 for e in entries)
    block_q = block_q_for(group, has_prefill)
    work, tables = work_items(entries, block_q)
    if splits is None:
        max_context = max((e.context for e in entries), default=1)
        splits = 1 if has_prefill else ops.decode_splits(len(entries), kv_heads, max_context, block_n=BLOCK_N)
    return TritonPlan(
        work=torch.tensor(work or [0, 0, 0, 0], dtype=torch.int32).view(-1, 4).to(device, non_blocking=True),
        tables=torch.tensor(tables or [0], dtype=torch.int32).to(device, non_blocking=True),
        block_q=block_q,
        splits=splits,
    )


def keys_view(k_cache: torch.Tensor) -> torch.Tensor:
    return k_cache.permute(0, 3, 1, 2)  # [blocks, KVH, D, bs] -> [blocks, bs, KVH, D]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              plan: TritonPlan, slots: torch.Tensor, scale: float, window: int, softcap: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (the step's new tokens) -> [T, H * D]."""
    from quantserve.kernels.triton import ops

    T, H, D = q.shape
    kv = keys_view(k_cache)
    ops.write_kv(k if k.stride(-1) == 1 else k.contiguous(), v if v.stride(-1) == 1 else v.contiguous(),
                 kv, v_cache, slots)
    out = q.new_empty(T, H, D)
    ops.paged_attention(q if q.stride(-1) == 1 else q.contiguous(), kv, v_cache, plan.work, plan.tables, scale,
                        window=window, softcap=softcap, block_q=plan.block_q, splits=plan.splits,
                        block_n=BLOCK_N, out=out)
    return out.view(T, H * D)
