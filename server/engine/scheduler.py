"""The scheduler: which sequences run in the next step, and how many of their tokens (pure Python).

One policy for prefill and decode (as vLLM V1): every running sequence wants the tokens it has
not computed yet (1 for a decoding one, the rest of the prompt for one being prefilled), taken
first come first served under a per-step token budget (`max_num_batched_tokens`); a prompt
longer than the budget left is prefilled in chunks over several steps, mixed with the decodes.
Then waiting sequences are admitted while the budget, `max_num_seqs` and the KV blocks allow,
reusing cached prefix blocks. When a running sequence needs a block and none is free, the
sequence last in the running order is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed (prompt + output so far) when it fits again.

Who goes first is the policy's (`policy`; every sequence carries its `client` and `priority`):
- "fair" (default): max-min fair shares of the running slots, across clients and, within a
  client, across its requests (clients behind one address or key are told apart by their
  requests). The next admitted comes from the client with the fewest running sequences (ties:
  the earliest); within it, from the request with the best priority (lower first), then the
  fewest running, then the earliest, so a client's priority ranks its own requests and buys
  nothing against other clients. When a slot or KV blocks are missing, the newest sequence of a
  client holding more than one sequence over the newcomer's client is preempted for it (else,
  within the newcomer's client, the newest of a request of no better priority holding more than
  one over the newcomer's request), so a new request's first token waits about one step, not
  for another's whole batch; that admission happens even in a step that preempted for blocks.
  The running order interleaves requests within a client and then clients (each one's first,
  then each one's second, ...): the prefill budget goes round-robin and the sequence preempted
  for blocks is the newest of the biggest request of the biggest client. While an under-served
  client or request waits, running prefills leave its prompt up to half the step's budget.
- "priority" (vLLM's): one queue by (priority, arrival); a waiting sequence preempts a running
  one of a worse (higher) priority when it lacks room.
- "fcfs": one queue by arrival, no preemption for admission (the behaviour before fairness).
`max_seqs_per_client` (any policy but fcfs) is a hard cap: a client at it waits even when
slots are free.
Where every layer of the model slides over a window, a running sequence first gives back the
blocks that fell out of it (BlockManager.release_out_of_window).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Literal, Optional

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
    # Speculative decoding: draft tokens seqs[i] verifies this step (the first num_drafts[i] of its
    # spec_token_ids, after its last token; counted in num_new_tokens). Empty: none anywhere.
    num_drafts: list[int] = dataclasses.field(default_factory=list)

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
        policy: Literal["fair", "priority", "fcfs"] = "fair",
        max_seqs_per_client: Optional[int] = None,
    ) -> None:
        if policy not in ("fair", "priority", "fcfs"):
            raise ValueError(f"policy must be fair, priority or fcfs, got {policy!r}")
        if max_seqs_per_client is not None and max_seqs_per_client < 1:
            raise ValueError(f"max_seqs_per_client must be >= 1 or None, got {max_seqs_per_client}")
        self.policy = policy
        self.max_seqs_per_client = None if policy == "fcfs" else max_seqs_per_client
        self._num_admitted = 0  # admission counter: Sequence.admitted orders the running ones
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
        seq.spec_token_ids = []
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
        self._order_running()
        # Prompt tokens kept free of running prefills for an under-served client's newcomer.
        reserve = self._reserve()

        # Running sequences first, in the policy's running order.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._needs_recompute(seq):
                self.running.pop(i)
                self._preempt(seq)  # recomputed from its first token when re-admitted
                preempted = True
                continue
            bm.release_out_of_window(seq)  # sliding-window models: blocks no layer sees again
            want = seq.num_tokens - seq.num_computed_tokens
            if seq.spec_token_ids:
                if want != 1:  # not decoding (recomputed): drafts are for the token after the last
                    seq.spec_token_ids = []
                else:  # verify as many drafts as the budget leaves (they never wait for a prefill)
                    del seq.spec_token_ids[max(budget - 1, 0):]
                    want += len(seq.spec_token_ids)
            n = min(want, budget if want == 1 or seq.spec_token_ids else budget - reserve)
            if n <= 0:  # a prefill chunk would eat the newcomer's room: it waits a step
                i += 1
                continue
            while not bm.allocate(seq, n):
                if seq.spec_token_ids:  # short of blocks: drop the drafts before preempting anyone
                    seq.spec_token_ids = []
                    n = 1
                    continue
                if len(self.running) == 1:  # alone and still too big: it never will fit
                    self.running.pop()
                    self._finish(seq, FinishReason.LENGTH)
                    cut_off.append(seq)
                    break
                victim = self.running.pop()  # last in running order; never one scheduled already
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1

        # Then waiting ones. A step that had to preempt for running ones admits nobody (it would
        # take blocks back from them) but, under "fair", a client under its share: it would have
        # preempted the biggest client anyway, and under KV pressure such steps can be most steps.
        if self.waiting and budget > 0 and (not preempted or self.policy == "fair"):
            self._admit(seqs, counts, budget, cut_off, underserved_only=preempted)

        if self.recompute_above is not None:
            self._long.update(s.seq_id for s in seqs if s.num_computed_tokens == 0 and s.num_tokens > self.recompute_above)
        sample = [s.num_computed_tokens + n >= s.num_tokens for s, n in zip(seqs, counts)]
        drafts = [s.num_computed_tokens + n - s.num_tokens if t else 0 for s, n, t in zip(seqs, counts, sample)]
        return ScheduledBatch(seqs, counts, sample, cut_off, drafts if any(drafts) else [])

    # ------------------------------------------------------------------------------ fairness

    def _order_running(self) -> None:
        """Sort the running sequences: the first get the budget first, the last are preempted first."""
        if self.policy == "fcfs" or len(self.running) < 2:
            return
        if self.policy == "priority":
            self.running.sort(key=lambda s: (s.priority, s.admitted))
            return
        # fair, on two levels: a client's sequences interleave its requests (each request's first,
        # then each one's second, ... by priority), then the clients interleave likewise. The last
        # is the newest sequence of the biggest request of the biggest client.
        by_request: dict[int, int] = {}
        taken: Counter = Counter()
        for s in sorted(self.running, key=lambda s: s.admitted):
            by_request[s.seq_id] = taken[s.request_id]
            taken[s.request_id] += 1
        by_client: dict[int, int] = {}
        taken = Counter()
        for s in sorted(self.running, key=lambda s: (s.priority, by_request[s.seq_id], s.admitted)):
            by_client[s.seq_id] = taken[s.client]
            taken[s.client] += 1
        self.running.sort(key=lambda s: (by_client[s.seq_id], s.admitted))

    def _reserve(self) -> int:
        """Under "fair": the prompt tokens of the first waiting sequence whose client runs fewer
        sequences than another client (or whose request runs fewer than another of its client's),
        at most half the step's budget; else 0."""
        if self.policy != "fair" or not self.waiting or not self.running:
            return 0
        clients, requests = self._counts()
        most = max(clients.values())
        most_of: dict[str, int] = {}
        for s in self.running:
            most_of[s.client] = max(most_of.get(s.client, 0), requests[s.request_id])
        for seq in self.waiting:
            behind = clients[seq.client] < most or requests[seq.request_id] < most_of.get(seq.client, 0)
            if behind and not self._at_cap(seq, clients):
                return min(seq.num_tokens - seq.num_computed_tokens, self.max_num_batched_tokens // 2)
        return 0

    def _counts(self) -> tuple[Counter, Counter]:
        """Running sequences by client and by request."""
        return Counter(s.client for s in self.running), Counter(s.request_id for s in self.running)

    def _at_cap(self, seq: Sequence, clients: Counter) -> bool:
        cap = self.max_seqs_per_client
        return cap is not None and clients[seq.client] >= cap

    def _victim_for(self, seq: Sequence, clients: Counter, requests: Counter) -> Optional[Sequence]:
        """The running sequence to preempt so that `seq` can be admitted, or None.

        fair: the newest of the biggest client when it runs more than one sequence over seq's
        client; else, within seq's client, the newest of its biggest request (of no better
        priority) when that runs more than one over seq's request (clients behind one address or
        key are told apart by their requests). priority: the worst running one if worse than seq."""
        if self.policy == "priority":
            worst = max(self.running, key=lambda s: (s.priority, s.admitted), default=None)
            return worst if worst is not None and worst.priority > seq.priority else None
        if self.policy != "fair" or not self.running:
            return None
        biggest = max(clients, key=lambda c: clients[c])
        if clients[biggest] > clients[seq.client] + 1:
            # running is in the order _order_running gave: the biggest client's last is its newest.
            return next(s for s in reversed(self.running) if s.client == biggest)
        mine = [s for s in self.running if s.client == seq.client and s.priority >= seq.priority]
        if mine:
            big = max(mine, key=lambda s: (requests[s.request_id], s.admitted)).request_id
            if requests[big] > requests[seq.request_id] + 1:
                return next(s for s in reversed(self.running) if s.request_id == big)
        return None

    def _admit(self, seqs: list[Sequence], counts: list[int], budget: int, cut_off: list[Sequence],
               underserved_only: bool = False) -> None:
        bm = self.block_manager
        clients, requests = self._counts()
        loras = {s.lora_id for s in self.running if s.lora_id} if self.max_loras is not None else set()
        # Waiting sequences by client, then by request, in queue order (preempted ones first, then
        # arrival). fcfs and priority: one queue (priority: sorted by priority, stably).
        fair = self.policy == "fair"
        queue = sorted(self.waiting, key=lambda s: s.priority) if self.policy == "priority" else self.waiting
        position = {s.seq_id: i for i, s in enumerate(queue)}
        queues: dict[str, dict[str, deque[Sequence]]] = {}
        for seq in queue:
            key = (seq.client, seq.request_id) if fair else ("", "")
            queues.setdefault(key[0], {}).setdefault(key[1], deque()).append(seq)

        def head(client: str) -> tuple[str, Sequence]:
            """A client's next: its request with the best priority, then fewest running, then earliest."""
            rid, q = min(queues[client].items(), key=lambda item: (
                item[1][0].priority, requests[item[0]], position[item[1][0].seq_id]))
            return rid, q[0]

        def drop(client: str, rid: str) -> None:
            q = queues[client][rid]
            q.popleft()
            if not q:
                del queues[client][rid]
                if not queues[client]:
                    del queues[client]

        changed = False
        while queues and budget > 0:
            heads = {client: head(client) for client in queues}
            client = min(heads, key=lambda c: (clients[c], position[heads[c][1].seq_id])) if fair else ""
            rid, seq = heads[client]
            if underserved_only and self._victim_for(seq, clients, requests) is None:
                break  # the fairest head is not under its share: nobody is
            if self._at_cap(seq, clients):
                if fair:
                    del queues[client]  # this client's others wait too
                else:
                    drop(client, rid)  # passed over, stays in the queue
                continue
            if seq.lora_id and seq.lora_id not in loras and self.max_loras is not None \
                    and len(loras) >= self.max_loras:
                drop(client, rid)  # waits for a LoRA slot, in its place
                continue
            admitted = False
            while True:
                cached = bm.find_cached_prefix(seq)
                num_cached = len(cached) * bm.block_size
                n = min(seq.num_tokens - num_cached, budget)
                if len(self.running) < self.max_num_seqs and bm.allocate(seq, n, cached):
                    admitted = True
                    break
                if not self.running:  # the whole cache is free and it still does not fit
                    drop(client, rid)
                    changed = True
                    self._finish(seq, FinishReason.LENGTH)
                    cut_off.append(seq)
                    break
                victim = self._victim_for(seq, clients, requests)
                if victim is None:
                    break
                budget += self._unschedule(victim, seqs, counts)
                self.running.remove(victim)
                clients[victim.client] -= 1
                requests[victim.request_id] -= 1
                self._preempt(victim)
                changed = True
            if seq.status is SequenceStatus.FINISHED:
                continue
            if not admitted:
                break  # nobody overtakes the head the policy chose
            bm.record_prefix_query(seq.num_tokens)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            drop(client, rid)
            changed = True
            if seq.lora_id:
                loras.add(seq.lora_id)
            seq.status = SequenceStatus.RUNNING
            seq.admitted = self._num_admitted
            self._num_admitted += 1
            clients[seq.client] += 1
            requests[seq.request_id] += 1
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if changed:  # admitted and cut-off ones leave; preempted ones were put in front
            self.waiting = deque(s for s in self.waiting if s.status is SequenceStatus.WAITING)

    @staticmethod
    def _unschedule(victim: Sequence, seqs: list[Sequence], counts: list[int]) -> int:
        """Take victim out of this step's batch if it is in it; the budget it gives back."""
        for i, s in enumerate(seqs):
            if s is victim:
                seqs.pop(i)
                return counts.pop(i)
        return 0

    def _needs_recompute(self, seq: Sequence) -> bool:
        limit = self.recompute_above
        return (limit is not None and seq.num_tokens > limit and seq.num_computed_tokens > 0
                and seq.seq_id not in self._long)

    # ------------------------------------------------------------------------------ postprocess

    def postprocess(self, batch: ScheduledBatch, sampled: list[Optional[int]]) -> list[Sequence]:
        """Record a finished step: tokens computed, sampled tokens appended, stops checked.

        sampled[i] is the token seqs[i] sampled (None where it did not sample), or, where it
        verified drafts, the tokens it emitted: the accepted drafts, then the one sampled after
        them. The KV of rejected drafts is forgotten: the computed count stops at the accepted
        tokens and the blocks past them go back (BlockManager.trim). Tokens after one that ends
        the sequence (EOS, max_tokens) are dropped. Returns the sequences that got new tokens;
        those that finished have left the running queue.
        """
        updated = []
        finished = False
        drafts = batch.num_drafts or [0] * len(batch.seqs)
        for seq, n, token, d in zip(batch.seqs, batch.num_new_tokens, sampled, drafts):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or preempted meanwhile
            seq.spec_token_ids = []
            seq.spec_probs = None
            if token is None:
                seq.num_computed_tokens += n
                continue
            tokens = [token] if isinstance(token, int) else token
            seq.num_computed_tokens += n - (d - (len(tokens) - 1))  # rejected drafts: not computed
            reason = None
            for t in tokens:
                reason = seq.append_token(t)
                if reason is not None:
                    break
            updated.append(seq)
            if reason is not None:
                self._finish(seq, reason)
                finished = True
            elif d:
                self.block_manager.trim(seq)
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return updated
