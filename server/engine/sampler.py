"""Turn one step's logits into tokens, vectorized over the batch.

Order (as vLLM): penalties -> logit_bias -> grammar mask -> min_tokens -> greedy argmax, or
temperature -> top_k -> top_p -> min_p -> sample. A constrained sequence (a grammar: JSON schema,
regex, tool calls) can only pick tokens its grammar allows next; grammar.py keeps each one's
matcher and builds the batch's bitmask, which `prepare` starts while the model computes.
Sampling is an exponential race, argmax(p / E) with E ~ Exp(1) per token, which draws exactly
from p; a seeded sequence draws its E from its own generator, so its tokens depend only on its
seed and its own logits, never on what else is in the batch. Logprobs are those of the model's
raw distribution (log_softmax of the logits, before penalties and temperature).
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Optional

import torch

from .outputs import TokenLogprob
from .sequence import Sequence

logger = logging.getLogger(__name__)

_SEED_MASK = 2**63 - 1


def _choice_seed(seed: int, index: int) -> int:
    # Choice 0 uses the seed itself; the others a different but fixed stream each.
    return seed if index == 0 else (seed * 6364136223846793005 + index * 1442695040888963407) & _SEED_MASK


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.seeded: dict[int, torch.Generator] = {}  # seq_id -> its own generator
        self.grammars: Any = None  # grammar.GrammarBank once the engine has a GrammarCompiler
        self._mask_worker: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: Optional[tuple[list[Sequence], concurrent.futures.Future]] = None

    def use_grammars(self, compiler: Any) -> None:
        """Enable constrained sequences (compiler: grammar.GrammarCompiler)."""
        from .grammar import GrammarBank

        self.grammars = GrammarBank(compiler)

    def release(self, seq: Sequence) -> None:
        self.seeded.pop(seq.seq_id, None)
        if self.grammars is not None:
            self.grammars.release(seq.seq_id)

    def prepare(self, seqs: list[Sequence]) -> None:
        """Start building the grammar masks of the sequences that sample this step, on a worker
        thread while the model runs (llguidance drops the GIL); __call__ collects them."""
        if self.grammars is None or not any(s.params.structured is not None for s in seqs):
            return
        if self._mask_worker is None:
            self._mask_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="quantserve-grammar")
        self._pending = (seqs, self._mask_worker.submit(self.grammars.fill, seqs))

    def _masks(self, seqs: list[Sequence]) -> tuple[list[int], Optional[torch.Tensor]]:
        pending, self._pending = self._pending, None
        if pending is not None:
            prepared, future = pending
            if len(prepared) == len(seqs) and all(a is b for a, b in zip(prepared, seqs)):
                return future.result()
            future.result()  # prepared for another batch (not expected): build them afresh
        return self.grammars.fill(seqs)

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self.seeded.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_choice_seed(seq.params.seed, seq.index))
            self.seeded[seq.seq_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[Optional[TokenLogprob]]]:
        """logits: [S, V] (one row per sequence in seqs). Returns (token ids, logprobs or None)."""
        logits = logits.float()
        raw = logits
        params = [s.params for s in seqs]
        logits = self._process(logits, seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == len(seqs):
            tokens = logits.argmax(dim=-1)
        else:
            if greedy:
                idx = torch.tensor(greedy, device=logits.device)
                tokens[idx] = logits[idx].argmax(dim=-1)
            idx = torch.tensor(sampled, device=logits.device)
            tokens[idx] = self._sample(logits if len(sampled) == len(seqs) else logits[idx],
                                       [seqs[i] for i in sampled])
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, tokens, token_list)

    # ------------------------------------------------------------------------------ speculative

    def verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[int]
               ) -> tuple[list[list[int]], list[Optional[list[TokenLogprob]]]]:
        """Speculative decoding's verification (speculative.py). seqs[i] verifies the first
        drafts[i] tokens of its spec_token_ids; logits holds drafts[i] + 1 rows per sequence, in
        order (row j: the distribution after the sequence's tokens and its first j drafts).
        Returns per sequence the tokens it emits -- the accepted drafts, then one more -- and
        their logprobs (None where not asked for).

        Each row is processed as a plain step at that position would process it (penalties,
        logit_bias, grammar mask and min_tokens see the accepted drafts before it), then:
        greedy: a draft is accepted while it is the row's argmax; the first other argmax is the
        token after it (so the output is the plain engine's, given the same logits). Sampling:
        the standard rule (Leviathan et al. 2023; Chen et al. 2023): draft x drawn from q is
        accepted with probability min(1, p(x) / q(x)), p the row's final distribution (after
        temperature, top_k, top_p, min_p); at the first rejection the token is drawn from
        max(p - q, 0) renormalized; after d acceptances one more is drawn from the last row's p.
        Each emitted token is then distributed exactly as p. An n-gram draft is a point mass
        (q(x) = 1: accepted with probability p(x), the residual is p without x)."""
        logits = logits.float()
        starts, row = [], 0
        for d in drafts:
            starts.append(row)
            row += d + 1
        emitted: list[list[int]] = [[] for _ in seqs]
        rows_of: list[list[int]] = [[] for _ in seqs]  # the logit row of each emitted token
        simple = all(s.params.greedy and not s.params.has_penalties and not s.params.logit_bias
                     and not s.params.min_tokens and s.params.structured is None for s in seqs)
        if simple:  # greedy, rows independent of the drafts: one argmax over every row
            best = logits.argmax(dim=-1).tolist()
            for i, seq in enumerate(seqs):
                for j in range(drafts[i] + 1):
                    token = best[starts[i] + j]
                    emitted[i].append(token)
                    rows_of[i].append(starts[i] + j)
                    if j == drafts[i] or token != seq.spec_token_ids[j]:
                        break
        else:
            self._verify_rows(logits, seqs, drafts, starts, emitted, rows_of)
        return emitted, self._verify_logprobs(logits, seqs, emitted, rows_of)

    def _verify_rows(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[int], starts: list[int],
                     emitted: list[list[int]], rows_of: list[list[int]]) -> None:
        """verify's general case: position by position over the sequences still accepting."""
        alive = list(range(len(seqs)))
        j = 0
        while alive:
            rows = [starts[i] + j for i in alive]
            sub = [seqs[i] for i in alive]
            for i in alive:  # what a plain step at this position would have seen
                seqs[i].token_ids.extend(emitted[i])
            try:
                processed = self._process(logits[rows], sub)
            finally:
                for i in alive:
                    if emitted[i]:
                        del seqs[i].token_ids[-len(emitted[i]):]
            greedy = [a for a, seq in enumerate(sub) if seq.params.greedy]
            sampled = [a for a, seq in enumerate(sub) if not seq.params.greedy]
            chosen = [0] * len(sub)
            accepted = [False] * len(sub)
            if greedy:
                best = processed[greedy].argmax(dim=-1).tolist() if len(greedy) < len(sub) \
                    else processed.argmax(dim=-1).tolist()
                for a, token in zip(greedy, best):
                    i = alive[a]
                    chosen[a] = token
                    accepted[a] = j < drafts[i] and token == seqs[i].spec_token_ids[j]
            if sampled:
                probs = self._probs(processed[sampled], [sub[a].params for a in sampled])
                self._accept_or_resample(probs, [sub[a] for a in sampled], [drafts[alive[a]] for a in sampled], j,
                                         sampled, chosen, accepted)
            still = []
            for a, i in enumerate(alive):
                emitted[i].append(chosen[a])
                rows_of[i].append(rows[a])
                if accepted[a]:
                    still.append(i)
            alive = still
            j += 1

    def _accept_or_resample(self, probs: torch.Tensor, seqs: list[Sequence], drafts: list[int], j: int,
                            where: list[int], chosen: list[int], accepted: list[bool]) -> None:
        """Rows of sampled sequences at draft position j: accept the draft or draw the token."""
        dev = probs.device
        probs = probs / probs.sum(dim=-1, keepdim=True)  # min_p leaves rows unnormalized
        draw = probs.clone()
        checks = []  # (row, draft token, q(x))
        for r, (seq, d) in enumerate(zip(seqs, drafts)):
            if j >= d:
                continue  # the row after every draft: a plain draw from p
            x = seq.spec_token_ids[j]
            q = None if seq.spec_probs is None else seq.spec_probs[j].to(dev, torch.float32)
            checks.append((r, x, q))
        if checks:
            gens = [self._generator(seqs[r]) if seqs[r].params.seed is not None else self.generator for r, _, _ in checks]
            u = [float(torch.rand((), generator=g, device=dev)) for g in gens]
            px = probs[[r for r, _, _ in checks], [x for _, x, _ in checks]].tolist()
            for (r, x, q), ur, p in zip(checks, u, px):
                qx = 1.0 if q is None else float(q[x])
                if qx > 0 and ur * qx < p:  # u < p(x) / q(x)
                    accepted[where[r]] = True
                    chosen[where[r]] = x
                    continue
                if q is None:  # point mass at x: the residual is p without x
                    draw[r, x] = 0.0
                else:
                    draw[r] = (probs[r] - q).clamp_(min=0.0)
                if not bool(draw[r].gt(0).any()):  # p equal to q everywhere (rounding): keep p
                    draw[r] = probs[r]
        tokens = self._race(draw, seqs).tolist()
        for r, token in enumerate(tokens):
            if not accepted[where[r]]:
                chosen[where[r]] = token

    def _verify_logprobs(self, logits: torch.Tensor, seqs: list[Sequence], emitted: list[list[int]],
                         rows_of: list[list[int]]) -> list[Optional[list[TokenLogprob]]]:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[Optional[list[TokenLogprob]]] = [None] * len(seqs)
        if not wanted:
            return out
        row_seqs = [seqs[i] for i in wanted for _ in emitted[i]]
        rows = [r for i in wanted for r in rows_of[i]]
        tokens = [t for i in wanted for t in emitted[i]]
        lps = self._logprobs(logits[rows], row_seqs, torch.tensor(tokens, device=logits.device), tokens)
        k = 0
        for i in wanted:
            out[i] = lps[k: k + len(emitted[i])]
            k += len(emitted[i])
        return out

    # ------------------------------------------------------------------------------ pieces

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties, logit_bias, grammar masks and min_tokens (a copy where any applies)."""
        params = [s.params for s in seqs]
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        constrained = any(p.logit_bias or p.min_tokens or p.structured is not None for p in params)
        if penalized or constrained:
            logits = logits.clone()
            for i in penalized:
                self._apply_penalties(logits[i], seqs[i])
        if constrained:
            self._constrain(logits, seqs)
        return logits

    def _apply_penalties(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        vocab = row.shape[0]
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
            seen = seen[seen < vocab]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=row.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """logit_bias, the grammar masks and min_tokens, in place."""
        for i, seq in enumerate(seqs):
            bias = seq.params.logit_bias
            if bias:
                ids = torch.tensor([t for t, _ in bias], device=logits.device)
                logits[i, ids] += torch.tensor([b for _, b in bias], device=logits.device, dtype=logits.dtype)
        rows: list[int] = []
        if self.grammars is not None and any(s.params.structured is not None for s in seqs):
            rows, bitmask = self._masks(seqs)
            self.grammars.shorten_budgets(seqs)  # closing a structure the budget is about to cut
            for i in self.grammars.apply(logits, rows, bitmask):
                self._grammar_failed(logits, i, seqs[i])
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                ends = [t for t in (*seq.eos_token_ids, *seq.stop_token_ids) if t < logits.shape[1]]
                if ends:
                    row = logits[i].clone()
                    row[ends] = float("-inf")
                    # A grammar that allows only the end wins over min_tokens (it is complete).
                    if torch.isfinite(row).any():
                        logits[i] = row

    def _grammar_failed(self, logits: torch.Tensor, i: int, seq: Sequence) -> None:
        # Nothing is allowed: the matcher hit a resource limit or an error (not expected with
        # checked grammars). End the sequence with "length", as a cut-short output, never
        # "stop": its text is not known to be complete. This step's token is the last.
        logger.error("request %s: grammar matcher failed: %s", seq.request_id,
                     self.grammars.is_failed(seq) or "no token allowed")
        logits[i] = 0.0
        ends = [t for t in (*seq.eos_token_ids, *seq.stop_token_ids) if t < logits.shape[1]]
        logits[i, ends] = float("-inf")
        seq.max_tokens = seq.num_output_tokens + 1

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        return self._race(self._probs(logits, [s.params for s in seqs]), seqs)

    def _probs(self, logits: torch.Tensor, params: list) -> torch.Tensor:
        """The distribution sampled from: temperature, top_k, top_p, min_p (rows may not sum to 1
        after min_p; the race draws in proportion)."""
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        logits = logits / temps
        top_k = [p.top_k for p in params]
        if any(top_k):
            vocab = logits.shape[1]
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
            kmax = int(ks.max())
            kth = logits.topk(kmax, dim=-1).values.gather(1, (ks - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = [p.top_p for p in params]
        if any(x < 1 for x in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
            drop = before > torch.tensor(top_p, device=dev).unsqueeze(1)
            drop[:, 0] = False
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row drawn in proportion to probs (the exponential race)."""
        dev = probs.device
        params = [s.params for s in seqs]
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if len(unseeded) == len(seqs):
            noise.exponential_(generator=self.generator)
        else:
            if unseeded:
                idx = torch.tensor(unseeded, device=dev)
                noise[idx] = torch.empty((len(unseeded), probs.shape[1]), device=dev).exponential_(
                    generator=self.generator)
            for i, (seq, p) in enumerate(zip(seqs, params)):
                if p.seed is not None:
                    noise[i].exponential_(generator=self._generator(seq))
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an exact 0 draw would divide 0 by 0
        return (probs / noise).argmax(dim=-1)

    def _logprobs(self, raw: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor,
                  token_list: list[int]) -> list[Optional[TokenLogprob]]:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[Optional[TokenLogprob]] = [None] * len(seqs)
        if not wanted:
            return result
        idx = torch.tensor(wanted, device=raw.device)
        logprobs = raw[idx].log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
        kmax = max(seqs[i].params.logprobs for i in wanted)
        top_vals, top_ids = (logprobs.topk(kmax, dim=-1) if kmax else (None, None))
        top_vals = top_vals.tolist() if kmax else None
        top_ids = top_ids.tolist() if kmax else None
        for j, i in enumerate(wanted):
            k = seqs[i].params.logprobs
            top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
            result[i] = TokenLogprob(token_id=token_list[i], logprob=chosen[j], top=top)
        return result
