"""Speculative decoding: cheap guesses of a sequence's next tokens, verified by the model in one
forward over the k+1 positions (pure Python here; the verification is the sampler's, the KV
bookkeeping the scheduler's and the block manager's).

A step with speculation: before scheduling, the SpecDecoder asks its proposer for up to k draft
tokens per decoding sequence (`Sequence.spec_token_ids`). The scheduler gives such a sequence
1 + d new tokens (its last sampled token and d drafts) in the same batch as every other decode row
and prompt chunk; the model computes logits for all d + 1 positions in that one forward; the
sampler accepts a prefix of the drafts and samples one more token (sampler.Sampler.verify), so a
step emits 1 .. d + 1 tokens for that sequence. The KV of rejected drafts is forgotten: the
sequence's computed count stops at its accepted tokens and the blocks past them are given back
(BlockManager.trim); the prefix cache only ever names blocks whose tokens are all verified.

Proposers (the `Proposer` protocol): "ngram" (prompt lookup: the tokens that followed the last
occurrence of the sequence's latest n-gram) and "draft_model" (speculative_draft.py: a small model
of the same vocabulary with its own KV cache). An EAGLE-style head fits the same protocol: it
would set `needs_hidden_states` and read the target's last hidden rows, which the runner can hand
over after each step (not built yet).

The adaptive rule (`SpecDecoder.plan`), per step and per sequence. The cost of a step with T rows
is modelled as 1 + c (T - 1) single-row steps (c = `row_cost`, 0.2 on a CPU: on the 2-core dev
machine the default model's fused step took 7.1 ms for 1 row, 10.4 ms for 5 and 13.7 ms for 8 with
one logit row (c = 0.12), and a verify step, which computes the 49k-token head for every row,
7.4 ms for 1 row and 17.2 ms for 6 (c = 0.26); 0.02 on a GPU, where a few more rows are nearly
free). With B sequences running, a plain step yields B / (1 + c (B - 1))
tokens per unit of cost. Giving a sequence d drafts costs c d more and yields E(d) = a + a^2 + ...
+ a^d more tokens in expectation, a being its estimated acceptance rate per draft token (an
exponential moving average, starting at `initial_acceptance`). A sequence gets the largest d <= k
with E(d) / (c d) >= B / (1 + c (B - 1)) -- its drafts must pay at least what the step already
earns -- and none when even d = 1 does not. A draft model's own forward adds r per draft
(`draft_cost`, default its weight bytes over the target's), so c + r replaces c above.
So speculation turns itself off for a sequence whose drafts are rejected (below break-even) and, as B grows and the step becomes compute-bound, for
everyone but sequences that copy nearly perfectly. `disable_by_batch_size` (vLLM's) is a hard
cap on top: no drafts at all while more sequences run. A sequence without drafts drifts back
toward `initial_acceptance` (5% a step), so it tries again later.
Seeded requests that sample (temperature > 0) are never speculated: their tokens would then depend
on the batch (through the rule above), and a seed promises they depend only on the seed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

from .sequence import Sequence
from .spec_config import SpeculativeConfig

__all__ = ["Draft", "NgramProposer", "Proposer", "SpecDecoder", "SpeculativeConfig", "build_spec_decoder"]

logger = logging.getLogger(__name__)


class Draft:
    """A proposal for one sequence: tokens and, for a sampled draft, the distributions they were
    drawn from (probs[j] = q(. | prefix, tokens[:j]), a [len(tokens), V] float32 tensor); None
    means each token is a point mass (n-gram lookup, greedy drafts)."""

    __slots__ = ("tokens", "probs")

    def __init__(self, tokens: list[int], probs: Any = None) -> None:
        self.tokens = tokens
        self.probs = probs


class Proposer(Protocol):
    """What a draft source implements. `propose` is called on the engine thread before each step
    with the decoding sequences that may speculate and the most drafts each may get (>= 1); it
    returns one Draft per sequence (empty tokens: no guess). `release` forgets a finished one."""

    name: str
    needs_hidden_states: bool  # EAGLE-style heads: they read the target's last hidden rows

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]: ...

    def release(self, seq: Sequence) -> None: ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    prompt_lookup_max down to prompt_lookup_min) in its prompt and output, and propose the tokens
    that followed it. Per sequence an index n-gram -> end position of its latest occurrence is
    kept, extended as tokens arrive (the current suffix itself is never indexed before it is
    looked up), so a lookup costs O(max - min + 1) dict probes."""

    name = "ngram"
    needs_hidden_states = False

    def __init__(self, lookup_min: int, lookup_max: int) -> None:
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        self._index: dict[int, tuple[list[dict], list[int]]] = {}  # seq_id -> (per n, tokens indexed)

    def _indexed(self, seq: Sequence) -> list[dict]:
        entry = self._index.get(seq.seq_id)
        if entry is None:
            entry = self._index[seq.seq_id] = ([{} for _ in range(self.lookup_min, self.lookup_max + 1)], [0])
        tables, done = entry
        tokens = seq.token_ids
        # Index the n-grams ending at positions done[0] .. len - 2 (not the last: that is the query).
        end = len(tokens) - 1
        for e in range(done[0], end):
            for i, n in enumerate(range(self.lookup_min, self.lookup_max + 1)):
                if e + 1 >= n:
                    tables[i][tuple(tokens[e + 1 - n: e + 1])] = e
        done[0] = max(done[0], end)
        return tables

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        out = []
        for seq, k in zip(seqs, max_tokens):
            tables = self._indexed(seq)
            tokens = seq.token_ids
            draft: list[int] = []
            for i in range(len(tables) - 1, -1, -1):  # longest n first
                n = self.lookup_min + i
                if n > len(tokens):
                    continue
                e = tables[i].get(tuple(tokens[-n:]))
                if e is not None:
                    draft = tokens[e + 1: e + 1 + k]
                    break
            out.append(Draft(draft))
        return out

    def release(self, seq: Sequence) -> None:
        self._index.pop(seq.seq_id, None)


class SpecStats:
    """Counters with vLLM's meaning: drafts (sequence-steps that verified at least one draft
    token), draft tokens verified, accepted tokens, and accepted tokens per draft position."""

    def __init__(self, k: int) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * k

    def snapshot(self) -> dict[str, Any]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos)}


class SpecDecoder:
    """The engine's side of speculation: which sequences get drafts this step (the adaptive rule
    in the module docstring), the proposer call, and the statistics."""

    DRIFT = 0.05  # per step without drafts, the estimate moves this much back toward the prior
    EMA = 0.3  # weight of the latest verification in the acceptance estimate

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, row_cost: float,
                 grammars: Any = None) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.proposer = proposer
        self.row_cost = config.row_cost if config.row_cost is not None else row_cost
        # What proposing one draft token costs, in single-row target steps: ~0 for n-gram lookup;
        # for a draft model the ratio of its weight bytes to the target's (decode steps read every
        # weight once), unless the config gives draft_cost.
        own = getattr(proposer, "cost_per_token", 0.0)
        self.draft_cost = config.draft_cost if config.draft_cost is not None else own
        self.prior = config.initial_acceptance
        self.grammars = grammars  # sampler.grammars: drafts a grammar refuses are cut before verify
        self.stats = SpecStats(self.k)
        self._rate: dict[int, float] = {}  # seq_id -> acceptance estimate per draft token
        self.steps_with_drafts = 0
        self.steps_off_by_batch = 0

    # ------------------------------------------------------------------------------ rule

    def num_drafts_for(self, rate: float, batch: int) -> int:
        """The most drafts worth verifying at acceptance estimate `rate` in a step of `batch`
        running sequences (0: none pays)."""
        c = self.row_cost
        earned = batch / (1 + c * (batch - 1))  # tokens per unit of cost of the plain step
        best, gain, p = 0, 0.0, 1.0
        for d in range(1, self.k + 1):
            p *= rate
            gain += p
            if gain / ((c + self.draft_cost) * d) >= earned:
                best = d
        return best

    def plan(self, running: list[Sequence]) -> None:
        """Set spec_token_ids of the running decoding sequences for the next step."""
        for seq in running:
            seq.spec_token_ids = []
            seq.spec_probs = None
        decoding = [s for s in running if s.num_computed_tokens == s.num_tokens - 1 and s.num_output_tokens > 0]
        if not decoding:
            return
        cap = self.config.disable_by_batch_size
        if cap is not None and len(running) > cap:
            self.steps_off_by_batch += 1
            return
        chosen, limits = [], []
        for seq in decoding:
            p = seq.params
            if p.seed is not None and not p.greedy:
                continue
            rate = self._rate.get(seq.seq_id, self.prior)
            d = min(self.num_drafts_for(rate, len(running)), seq.max_tokens - seq.num_output_tokens - 1)
            if d <= 0:
                self._rate[seq.seq_id] = rate + self.DRIFT * (self.prior - rate)
                continue
            chosen.append(seq)
            limits.append(d)
        if not chosen:
            return
        for seq, draft in zip(chosen, self.proposer.propose(chosen, limits)):
            tokens = draft.tokens
            if tokens and seq.params.structured is not None and self.grammars is not None:
                tokens = tokens[: self.grammars.accepted_prefix(seq, tokens)]
            if tokens:
                seq.spec_token_ids = list(tokens)
                seq.spec_probs = None if draft.probs is None else draft.probs[: len(tokens)]

    def record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """A verification of `num_drafts` drafts of seq accepted the first `num_accepted`."""
        if num_drafts <= 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            s.accepted_per_pos[j] += 1
        observed = num_accepted / (num_accepted + (1 if num_accepted < num_drafts else 0)) if num_accepted else 0.0
        rate = self._rate.get(seq.seq_id, self.prior)
        self._rate[seq.seq_id] = (1 - self.EMA) * rate + self.EMA * observed

    def release(self, seq: Sequence) -> None:
        self._rate.pop(seq.seq_id, None)
        self.proposer.release(seq)


def default_row_cost(device_type: str) -> float:
    """c of the adaptive rule: the cost of one more row in a step, in single-row steps."""
    return 0.2 if device_type == "cpu" else 0.02


def build_spec_decoder(config: Any, runner: Any, draft_model: Any = None) -> Optional[SpecDecoder]:
    """The engine's SpecDecoder for config.speculative_config (None: off). A model speculation
    cannot serve exactly is refused here, at startup, with the reason (ValueError)."""
    spec = config.speculative_config
    if spec is None:
        return None
    if runner.length_dependent_rope:
        raise ValueError("speculative decoding cannot serve this model: its rope frequencies depend on the sequence "
                         "length, so a verified position's keys would differ from a decoded one's")
    if spec.method == "ngram":
        proposer: Any = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    else:
        from .speculative_draft import DraftModelProposer

        proposer = DraftModelProposer.build(spec, runner, config, draft_model)
    logger.info("speculative decoding: %s, up to %d draft tokens per step", proposer.name, spec.num_speculative_tokens)
    return SpecDecoder(spec, proposer, default_row_cost(runner.device.type), runner.sampler.grammars)
