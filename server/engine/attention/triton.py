"""The Triton attention backend: one step's work items for the paged-attention kernel
(kernels/triton/paged_attention.py), and the per-layer call that writes the new keys/values and attends.

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

from .base import AttentionBackend, SeqRows, StepLayout, keys_view, slot_tensor

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


def block_q_for(group: int, has_prefill: bool) -> int:
    """Positions per work item: 1 for a decode-only step, else what fills PREFILL_TILE_ROWS."""
    return max(1, PREFILL_TILE_ROWS // group) if has_prefill else 1


def work_items(entries: Sequence[SeqRows], block_q: int) -> tuple[list[int], list[int]]:
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


def build_plan(entries: Sequence[SeqRows], group: int, kv_heads: int, device: torch.device,
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


@dataclasses.dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token (-1: a padded row, skipped)
    plan: TritonPlan
    num_decodes: int


def unusable(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on `device` (None: they can)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "on a CPU the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1 before starting"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before the process starts"
    return None


def fp8_unusable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton attention cannot run on an fp8 cache on `device` (None: it can). Triton
    compiles fp8 e4m3 (its fp8e4nv) for NVIDIA GPUs of compute capability 8.9+, e5m2 from 8.0. The
    CPU interpreter reads fp8 right but its float32 -> fp8 stores do not round as torch does
    (against .to() on randn values: 2.4% of e4m3 and 4.9% of e5m2 bytes differ), so the KV write
    would store other values. (Its bf16 stores truncate too, half the values one ulp off: bf16
    stays allowed, the interpreter being a test mode whose bf16 arithmetic is known wrong.)"""
    if device.type != "cuda":
        return "the Triton interpreter's float32 -> fp8 stores do not round to nearest as torch does"
    need = (8, 9) if dtype == torch.float8_e4m3fn else (8, 0)
    have = torch.cuda.get_device_capability(device)
    if have < need:
        return f"needs a GPU of compute capability {need[0]}.{need[1]}+ (this one is {have[0]}.{have[1]})"
    return None


class TritonBackend(AttentionBackend):
    name = "triton"

    def make_metadata(self, layout: StepLayout) -> TritonMetadata:
        plan = build_plan(layout.seqs, self.num_heads // self.num_kv_heads, self.num_kv_heads, self.device)
        return TritonMetadata(slot_tensor(layout, self.device), plan, layout.num_decodes)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: TritonMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        return attention(q, k, v, kv[0], kv[1], meta.plan, meta.slot_mapping, scale, int(window or 0),
                         float(softcap or 0.0))
