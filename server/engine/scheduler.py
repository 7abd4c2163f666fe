"""The scheduler: which sequences run in the next step, and how many of their tokens (pure Python).

One policy for prefill and decode (as vLLM V1): every running sequence wants the tokens it has
not computed yet (1 for a decoding one, the rest of the prompt for one being prefilled), taken
first come first served under a per-step token budget (`max_num_batched_tokens`); a prompt
longer than the budget left is prefilled in chunks over several steps, mixed with the decodes.
Then waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and the
KV blocks allow, reusing cached prefix blocks. When a running sequence needs a block and none is
free, the most recently admitted running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (prompt + output so far) when it fits again.
Where every layer of the model slides over a window, a running sequence first gives back the
blocks that fell out of it (BlockManager.release_out_of_window).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Optional

from .block_manager import BlockManager
from .sequence import FinishReason, Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledBatch:
    """One step's work: seqs[i] computes its next num_new_tokens[i] tokens; it samples a token
    when they reach its end (sample[i])."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    sample: list[bool]
    # Sequences the scheduler ended with "length": they cannot fit in the whole KV cache.
    cut_off: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        recompute_above: Optional[int] = None,
        max_loras: Optional[int] = None,
    ) -> None:
        self.block_manager = block_manager
        # Most distinct LoRA adapters among the running sequences (None: no limit). A waiting
        # sequence whose adapter would exceed it is passed over (it stays in the queue, in
        # order) until a running adapter's sequences finish.
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # A sequence whose cache was computed at most this long is recomputed once it grows past
        # it (longrope models whose keys change with the sequence length: Phi-3).
        self.recompute_above = recompute_above
        self._long: set[int] = set()  # seq_ids whose cache was computed past recompute_above
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop seq now (abort, stop string, failure): leave the queues, free its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._long.discard(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------------------ schedule

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        cut_off: list[Sequence] = []
        preempted = False

        # Running sequences first, in admission order.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._needs_recompute(seq):
                self.running.pop(i)
                self._preempt(seq)  # recomputed from its first token when re-admitted
                preempted = True
                continue
            bm.release_out_of_window(seq)  # sliding-window models: blocks no layer sees again
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, n):
                if len(self.running) == 1:  # alone and still too big: it never will fit
                    self.running.pop()
                    self._finish(seq, FinishReason.LENGTH)
                    cut_off.append(seq)
                    break
                victim = self.running.pop()  # the latest admitted; never one scheduled already
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1

        # Then waiting ones, in arrival order; a step that had to preempt admits nobody.
        loras = {s.lora_id for s in self.running if s.lora_id} if self.max_loras is not None else set()
        passed_over: list[Sequence] = []  # waiting for a LoRA slot: back to the front, in order, at the end
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.lora_id and seq.lora_id not in loras and self.max_loras is not None \
                    and len(loras) >= self.max_loras:
                passed_over.append(self.waiting.popleft())
                continue
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, n, cached):
                if not self.running:  # the whole cache is free and it still does not fit
                    self.waiting.popleft()
                    self._finish(seq, FinishReason.LENGTH)
                    cut_off.append(seq)
                    continue
                break  # first come first served: nobody overtakes the head of the queue
            bm.record_prefix_query(seq.num_tokens)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            self.waiting.popleft()
            if seq.lora_id:
                loras.add(seq.lora_id)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(passed_over))

        if self.recompute_above is not None:
            self._long.update(s.seq_id for s in seqs if s.num_computed_tokens == 0 and s.num_tokens > self.recompute_above)
        sample = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, counts)]
        return ScheduledBatch(seqs, counts, sample, cut_off)

    def _needs_recompute(self, seq: Sequence) -> bool:
        limit = self.recompute_above
        return (limit is not None and seq.num_tokens > limit and seq.num_computed_tokens > 0
                and seq.seq_id not in self._long)

    # ------------------------------------------------------------------------------ postprocess

    def postprocess(self, batch: ScheduledBatch, sampled: list[Optional[int]]) -> list[Sequence]:
        """Record a finished step: tokens computed, sampled tokens appended, stops checked.

        sampled[i] is the token seqs[i] sampled (None where it did not sample). Returns the
        sequences that got a new token; those that finished have left the running queue.
        """
        updated = []
        finished = False
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or preempted meanwhile
            seq.num_computed_tokens += n
            if token is None:
                continue
            reason = seq.append_token(token)
            updated.append(seq)
            if reason is not None:
                self._finish(seq, reason)
                finished = True
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return updated
