"""The attention backend contract: what the runner builds once per step, and what every layer calls.

The KV cache of one layer is a pair of tensors: keys [num_blocks, num_kv_heads, head_dim,
block_size] (transposed within a block, so that the native decode kernel computes a block's
scores as whole-vector FMAs; `keys_view` gives the [num_blocks, block_size, heads, dim] view) and
values [num_blocks, block_size, num_kv_heads, head_dim]. Token p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size.

A step's batch is flattened: decode rows first, then prefill chunks, no padding. The runner
describes it once on the host (`StepLayout`: every sequence's rows, context and block table);
the backend chosen at engine start turns that into its own metadata (`make_metadata`), and each
layer calls `forward`, which writes the step's new keys/values into their slots and then attends
every row through the block tables (so a block registered for prefix sharing during scheduling is
filled before anyone reads it in the same step).

Per layer, `window` (sliding-window attention: the token at position p sees p - window < k <= p,
as transformers' sliding-window mask) and `softcap` (Gemma 2's attention logit soft-capping:
score -> softcap * tanh(score / softcap)) are part of every backend's contract. A block table may
name block -1 for blocks freed because no layer's window reaches them any more (block_manager.py):
the layout maps it to block 0, which is never read unmasked.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SeqRows:
    """One sequence of a step: its rows are the last `num_rows` positions of its first `context` tokens."""

    first_row: int  # in the flattened batch
    num_rows: int
    context: int  # tokens of the sequence in the cache after this step (earlier + these)
    table: Sequence[int]  # block ids covering the context (freed entries already mapped to block 0)

    @property
    def start(self) -> int:
        """Position of the first row."""
        return self.context - self.num_rows


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """A step's flattened batch as host lists, built once by the runner (step_inputs.py)."""

    seqs: Sequence[SeqRows]  # decodes first (num_rows == 1), then prefill chunks
    slots: Sequence[int]  # [T] the cache slot of every row's new key/value
    num_decodes: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.slots)


def keys_view(k_cache: torch.Tensor) -> torch.Tensor:
    """The key cache [blocks, KVH, D, block_size] seen as [blocks, block_size, KVH, D] (strided)."""
    return k_cache.permute(0, 3, 1, 2)


def kv_cache_shapes(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
    """(keys, values) shapes of one layer's cache: every backend reads this layout (kv_cache.py
    allocates it)."""
    return (num_blocks, kv_heads, head_dim, block_size), (num_blocks, block_size, kv_heads, head_dim)


class AttentionBackend(abc.ABC):
    """One way to run paged attention, chosen once at engine start (select.py)."""

    name: ClassVar[str]

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.device = device
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    @abc.abstractmethod
    def make_metadata(self, layout: StepLayout) -> Any:
        """This backend's metadata for one step (tensors on the backend's device)."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: Any, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        """q [T, H, D]; k, v [T, KVH, D] (the step's new tokens) -> [T, H * D]; writes k, v first."""

    def __repr__(self) -> str:
        return self.name


def slot_tensor(layout: StepLayout, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(layout.slots), dtype=torch.long, device=device)


def decode_table_rows(layout: StepLayout) -> tuple[list[int], int]:
    """The decode rows' block tables as one 0-padded row-major list, and its width."""
    decodes = layout.seqs[: layout.num_decodes]
    width = max((len(s.table) for s in decodes), default=0)
    flat: list[int] = []
    for s in decodes:
        flat.extend(s.table)
        flat.extend([0] * (width - len(s.table)))
    return flat, width

