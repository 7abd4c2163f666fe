"""The draft-model proposer of speculative decoding (speculative.py): a small model with the
target's vocabulary guesses the next k tokens, one forward per guess, with its own model runner
and its own (small) KV cache.

Each target sequence being speculated has a shadow Sequence here: the same tokens, then the
drafts of the last round. Before a round the shadow is brought in line with the target: its
tokens after the longest common prefix are replaced (the rejected drafts), its computed count is
cut to that prefix and the blocks past it are given back; then one forward computes what the
draft has not seen yet (the target's accepted and sampled tokens; the whole prompt the first
time, in chunks of max_num_batched_tokens) and gives the first guess, and each further forward
(one row per sequence, batched over the sequences) gives the next. A greedy request gets the
draft's argmax (a point mass); a sampled one a draw from the draft's softmax at the request's
temperature, whose rows go with the drafts (Draft.probs) for the rejection rule.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .scheduler import ScheduledBatch
from .sequence import SamplingParams, Sequence
from .speculative import Draft

logger = logging.getLogger(__name__)

_SHADOW = SamplingParams(max_tokens=1)  # a shadow is never scheduled: its params are not read


class DraftModelProposer:
    name = "draft_model"
    needs_hidden_states = False

    def __init__(self, runner: Any, target_vocab: int, max_num_batched_tokens: int, seed: int = 0) -> None:
        self.runner = runner
        self.target_vocab = target_vocab
        self.chunk = max_num_batched_tokens
        self.bm = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
        self.generator = torch.Generator(device=runner.device)
        self.generator.manual_seed(seed)
        self._shadows: dict[int, Sequence] = {}
        self._synced: dict[int, int] = {}  # seq_id -> the target's length at the last round
        self.forwards = 0  # draft forwards run (statistics)
        self.cost_per_token = 0.0  # one draft token's cost in single-row target steps (build() sets it)

    @classmethod
    def build(cls, spec: Any, target_runner: Any, config: Any, draft_model: Any = None) -> "DraftModelProposer":
        """Load spec.model through quantserve's loader (4-bit unless spec.quantization is "none")
        on the target's device, with a KV cache of as many blocks as the target's."""
        from .model_runner import ModelRunner
        from .models import vocab_size

        if draft_model is None:
            from quantserve.quant import QuantConfig

            from ..loading.loader import LoadConfig, load_model

            quant = None if spec.quantization == "none" else QuantConfig(bnb_4bit_quant_type=spec.quantization)
            loaded = load_model(LoadConfig(model=spec.model, device=target_runner.device, quant=quant, progress=False,
                                           quant_stats=False))
            draft_model = loaded.model
        target_vocab = vocab_size(target_runner.hf_model)
        draft_vocab = vocab_size(draft_model)
        if draft_vocab > target_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft_vocab} tokens) is larger than the target's "
                             f"({target_vocab}): speculative decoding needs the target's tokenizer")
        draft_config = EngineConfig(block_size=config.block_size, num_kv_blocks=target_runner.num_blocks,
                                    max_num_batched_tokens=config.max_num_batched_tokens, forward="auto",
                                    attention_backend=config.attention_backend, kv_cache_dtype=config.kv_cache_dtype,
                                    enforce_eager=True, seed=config.seed)
        runner = ModelRunner(draft_model, draft_config)
        runner.warmup(min(4096, runner.capacity_tokens))
        logger.info("draft model %s: forward %s, %d KV blocks", spec.model, runner.forward.path, runner.num_blocks)
        proposer = cls(runner, target_vocab, config.max_num_batched_tokens, config.seed)
        weights = runner.weight_memory()["total"], target_runner.weight_memory()["total"]
        proposer.cost_per_token = weights[0] / max(weights[1], 1)
        return proposer

    # ------------------------------------------------------------------------------ rounds

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of seq, its tokens made seq's and its KV cut to what is still valid. The
        shadow holds the target's tokens as of the last round (`_synced` of them) and then that
        round's drafts; the target has since appended the accepted drafts and one more token."""
        shadow = self._shadows.get(seq.seq_id)
        theirs = seq.token_ids
        if shadow is None:
            shadow = self._shadows[seq.seq_id] = Sequence(seq.request_id, list(theirs), _SHADOW)
            self._synced[seq.seq_id] = len(theirs)
            return shadow
        mine = shadow.token_ids
        common = min(self._synced[seq.seq_id], len(theirs))
        while common < min(len(mine), len(theirs)) and mine[common] == theirs[common]:
            common += 1  # the drafts the target accepted
        del mine[common:]
        mine.extend(theirs[common:])
        self._synced[seq.seq_id] = len(theirs)
        # KV stays valid up to the common prefix; the last token is always computed anew (its
        # logits give the first guess).
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, len(theirs) - 1)
        self.bm.trim(shadow)
        return shadow

    def _forward(self, shadows: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Compute counts[i] more tokens of each shadow; float32 logits of each one's last row."""
        batch = ScheduledBatch(shadows, counts, [True] * len(shadows))
        runner = self.runner
        logits = runner.model.forward_logits(runner.inputs(batch, runner.flatten(batch)), runner.kv_caches)
        self.forwards += 1
        for shadow, n in zip(shadows, counts):
            shadow.num_computed_tokens += n
        return logits

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[Optional[torch.Tensor]]]:
        """A guess per row: argmax for greedy requests, else a draw from softmax(logits / T)."""
        tokens = logits.argmax(dim=-1).tolist()
        probs: list[Optional[torch.Tensor]] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                continue
            q = torch.softmax(logits[i] / seq.params.temperature, dim=-1)
            tokens[i] = int(torch.multinomial(q, 1, generator=self.generator))
            if q.shape[0] < self.target_vocab:  # a smaller draft vocabulary: q is 0 past it
                q = torch.nn.functional.pad(q, (0, self.target_vocab - q.shape[0]))
            probs[i] = q
        return tokens, probs

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Draft]:
        shadows = [self._sync(seq) for seq in seqs]
        live = []
        for i, shadow in enumerate(shadows):
            # Blocks for the catch-up and every guess (the last guess's KV is never written).
            if self.bm.allocate(shadow, shadow.num_tokens - shadow.num_computed_tokens + max_tokens[i] - 1):
                live.append(i)
            else:  # the draft's cache is full: this one decodes without drafts this step
                self.release(seqs[i])
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        # Catch-up: everything each shadow has not computed, in chunks; the last chunk's row guesses.
        goal = {i: shadows[i].num_tokens for i in live}
        pending = list(live)
        while pending:
            budget, batch = self.chunk, []
            for i in pending:
                if budget <= 0:
                    break
                n = min(goal[i] - shadows[i].num_computed_tokens, budget)
                batch.append((i, n))
                budget -= n
            logits = self._forward([shadows[i] for i, _ in batch], [n for _, n in batch])
            done = [(row, i) for row, (i, n) in enumerate(batch) if shadows[i].num_computed_tokens == goal[i]]
            if done:
                rows = torch.tensor([row for row, _ in done], device=logits.device)
                picked, q = self._pick(logits.index_select(0, rows), [seqs[i] for _, i in done])
                for (_, i), t, p in zip(done, picked, q):
                    self._add(shadows[i], tokens[i], probs[i], t, p)
            pending = [i for i in pending if shadows[i].num_computed_tokens < goal[i]]
        # Further guesses: one row per sequence still short of its count.
        while True:
            more = [i for i in live if len(tokens[i]) < max_tokens[i]]
            if not more:
                break
            logits = self._forward([shadows[i] for i in more], [1] * len(more))
            picked, q = self._pick(logits, [seqs[i] for i in more])
            for i, t, p in zip(more, picked, q):
                self._add(shadows[i], tokens[i], probs[i], t, p)
        out = []
        for i in range(len(seqs)):
            p = torch.stack(probs[i]) if probs[i] and all(x is not None for x in probs[i]) else None
            out.append(Draft(tokens[i], p))
        return out

    @staticmethod
    def _add(shadow: Sequence, tokens: list[int], probs: list, token: int, q: Optional[torch.Tensor]) -> None:
        tokens.append(token)
        probs.append(q)
        shadow.token_ids.append(token)

    def release(self, seq: Sequence) -> None:
        shadow = self._shadows.pop(seq.seq_id, None)
        self._synced.pop(seq.seq_id, None)
        if shadow is not None:
            self.bm.free(shadow)
