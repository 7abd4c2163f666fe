"""A step's inputs, built once from the scheduled batch: what the model's forward takes.

The batch is flattened with decode rows first, then prefill chunks (no padding). Everything a
forward reads comes in here and flows one way: token ids, positions, the attention backend's
metadata, the rows whose logits are wanted, the LoRA adapters of each row, rope lengths.
A captured CUDA graph replays from the same host layout (cuda_graphs.py copies it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .attention import AttentionBackend, SeqRows, StepLayout
from .models import lora_layers
from .scheduler import ScheduledBatch


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attention: Any  # the backend's metadata (attention/*.py)
    logit_rows: torch.Tensor  # [R] int64: rows of the flattened batch whose logits are sampled
    lora: Optional[lora_layers.StepAdapters] = None  # None: no row has an adapter
    # [T] int64, only for rope types whose frequencies depend on the sequence length (dynamic,
    # longrope): the length transformers' generate would see for each row (models/rope.py).
    rope_lengths: Optional[torch.Tensor] = None


@dataclasses.dataclass
class HostStep:
    """The flattened batch as host lists (the layout, and what graph replay copies)."""

    layout: StepLayout
    input_ids: list[int]
    positions: list[int]
    order: list[int]  # batch index of each flattened sequence
    last_row: list[int]  # per batch index: its last row in the flattened batch
    max_block: int  # the highest block id the step touches


def flatten(batch: ScheduledBatch, block_size: int) -> HostStep:
    bs = block_size
    decodes = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
    order = decodes + [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seqs: list[SeqRows] = []
    last_row = [0] * len(batch)
    max_block = 0
    for i in order:
        seq, n = batch.seqs[i], batch.num_new_tokens[i]
        start = seq.num_computed_tokens
        context = start + n
        table = seq.block_table
        seqs.append(SeqRows(len(input_ids), n, context, [max(b, 0) for b in table[: -(-context // bs)]]))
        input_ids.extend(seq.token_ids[start:context])
        if context > seq.num_tokens:  # speculative decoding: the drafts verified after the last token
            input_ids.extend(seq.spec_token_ids[: context - seq.num_tokens])
        positions.extend(range(start, context))
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, context))
        last_row[i] = len(input_ids) - 1
        if table:
            max_block = max(max_block, max(table))
    layout = StepLayout(seqs, slots, len(decodes), bs)
    return HostStep(layout, input_ids, positions, order, last_row, max_block)


def build_inputs(batch: ScheduledBatch, host: HostStep, backend: AttentionBackend, device: torch.device,
                 length_dependent_rope: bool, lora: Optional[lora_layers.LoRAState]) -> StepInputs:
    long = dict(dtype=torch.long, device=device)
    # A sequence verifying d drafts wants the logits of its last d + 1 rows (sampler.verify).
    drafts = batch.num_drafts or [0] * len(batch.seqs)
    sample_rows = [r for i, s in enumerate(batch.sample) if s
                   for r in range(host.last_row[i] - drafts[i], host.last_row[i] + 1)]
    rope = None
    if length_dependent_rope:  # as transformers' generate: the prompt at once, then per token
        rope = torch.tensor([batch.seqs[i].num_tokens for i in host.order for _ in range(batch.num_new_tokens[i])],
                            **long)
    adapters = lora_layers.step_batch(lora, [batch.seqs[i].lora for i in host.order],
                                      [batch.num_new_tokens[i] for i in host.order], device)
    return StepInputs(torch.tensor(host.input_ids, **long), torch.tensor(host.positions, **long),
                      backend.make_metadata(host.layout), torch.tensor(sample_rows, **long), adapters, rope)
