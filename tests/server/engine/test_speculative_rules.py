"""Speculative decoding without a model: KV rollback and the prefix cache (scheduler + block
manager, pure Python), the n-gram proposer, the adaptive rule, the config's refusals, and the
rejection sampler's output distribution against the target's (a statistical test)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.sampler import Sampler
from quantserve.server.engine.scheduler import Scheduler
from quantserve.server.engine.sequence import SamplingParams, Sequence
from quantserve.server.engine.spec_config import SpeculativeConfig
from quantserve.server.engine.speculative import NgramProposer, SpecDecoder

BS = 4


def _decoding(bm: BlockManager, sched: Scheduler, prompt: list[int], first: int) -> Sequence:
    """A sequence whose prompt was prefilled and whose first token was sampled."""
    seq = Sequence("r", prompt, SamplingParams(max_tokens=100, temperature=0))
    sched.add(seq)
    batch = sched.schedule()
    sched.postprocess(batch, [first])
    return seq


@pytest.mark.parametrize("accepted", [0, 1, 3, 5])
def test_rejected_drafts_give_their_blocks_back(accepted):
    """After verifying 5 drafts of which `accepted` are kept, the sequence holds exactly the blocks
    (and the free list exactly the count) of a plain engine that decoded the same tokens."""
    spec_bm, plain_bm = BlockManager(64, BS), BlockManager(64, BS)
    spec_s, plain_s = Scheduler(spec_bm, 8, 64), Scheduler(plain_bm, 8, 64)
    prompt = list(range(10, 17))  # 7 tokens: the drafts cross two block boundaries
    seq = _decoding(spec_bm, spec_s, prompt, 1)
    ref = _decoding(plain_bm, plain_s, prompt, 1)
    seq.spec_token_ids = [2, 3, 4, 5, 6]
    batch = spec_s.schedule()
    assert batch.num_new_tokens == [6] and batch.num_drafts == [5]
    assert len(seq.block_table) == spec_bm.blocks_needed(seq.num_tokens + 5)
    emitted = [2, 3, 4, 5, 6][:accepted] + [9]
    spec_s.postprocess(batch, [emitted])
    for token in emitted:  # the plain engine: one token per step
        b = plain_s.schedule()
        plain_s.postprocess(b, [token])
    assert seq.token_ids == ref.token_ids
    assert seq.num_computed_tokens == ref.num_computed_tokens
    assert len(seq.block_table) == len(ref.block_table)
    assert spec_bm.num_free_blocks == plain_bm.num_free_blocks
    # and decoding goes on from there as the plain one does
    b1, b2 = spec_s.schedule(), plain_s.schedule()
    assert b1.num_new_tokens == b2.num_new_tokens == [1] and not b1.num_drafts


def test_prefix_cache_never_names_a_rejected_token():
    """Drafts fill a whole block and are rejected: no hash names that block, and a new prompt
    equal to the prefix plus the rejected drafts finds only the verified blocks."""
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, 8, 64)
    prompt = [10, 11, 12, 13, 14, 15, 16]  # 7 tokens; +1 sampled = 2 full blocks verified
    seq = _decoding(bm, sched, prompt, 17)
    seq.spec_token_ids = [20, 21, 22, 23, 24]  # positions 8..12: block 2 entirely drafts
    batch = sched.schedule()
    registered = {bm.block_hash[b] for b in seq.block_table if bm.block_hash[b] is not None}
    assert len(registered) == 2  # only the blocks of verified tokens
    sched.postprocess(batch, [[30]])  # every draft rejected
    newcomer = Sequence("n", prompt + [17, 20, 21, 22, 23, 24, 25], SamplingParams())
    assert len(bm.find_cached_prefix(newcomer)) == 2
    assert all(h in bm.hash_to_block for h in registered)
    assert len(bm.hash_to_block) == 2


def test_drafts_are_dropped_before_anyone_is_preempted():
    """Too few free blocks for the drafts: the sequence decodes one token; nobody is preempted."""
    bm = BlockManager(3, BS)
    sched = Scheduler(bm, 8, 64)
    seq = _decoding(bm, sched, list(range(11)), 1)  # 12 tokens: 3 blocks... 11 computed, in 3 blocks
    seq.spec_token_ids = [2, 3, 4, 5, 6]
    batch = sched.schedule()
    assert batch.num_new_tokens == [1] and not batch.num_drafts and sched.num_preemptions == 0


def test_ngram_proposer_follows_the_latest_occurrence():
    proposer = NgramProposer(1, 3)
    seq = Sequence("r", [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 2], SamplingParams())
    # "1 2" last occurred at positions 5-6, followed by 3 9 9 1 2
    assert proposer.propose([seq], [4])[0].tokens == [3, 9, 9, 1]
    seq.append_token(3)
    assert proposer.propose([seq], [2])[0].tokens == [9, 9]  # "1 2 3" at 5-7 (latest)
    seq2 = Sequence("r", [5, 6, 7, 8], SamplingParams())
    assert proposer.propose([seq2], [3])[0].tokens == []


def test_adaptive_rule_turns_off_below_break_even_and_in_big_batches():
    spec = SpecDecoder(SpeculativeConfig(method="ngram", num_speculative_tokens=8), NgramProposer(1, 2), 0.12)
    # one stream: good acceptance -> many drafts; poor -> few; below break-even (a < c) -> none
    assert spec.num_drafts_for(0.95, 1) == 8
    assert 0 < spec.num_drafts_for(0.3, 1) < 8
    assert spec.num_drafts_for(0.1, 1) == 0
    # 16 streams: the step is past the knee; only near-perfect copying still pays
    assert spec.num_drafts_for(0.5, 16) == 0
    assert spec.num_drafts_for(1.0, 16) == 8
    # a sequence whose drafts keep failing stops getting them, then tries again later
    seq = Sequence("r", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=500, temperature=0))
    seq.append_token(2)
    seq.num_computed_tokens = seq.num_tokens - 1
    for _ in range(10):
        spec.record(seq, 3, 0)
    spec.plan([seq])
    assert seq.spec_token_ids == []
    for _ in range(200):
        spec.plan([seq])
        if seq.spec_token_ids:
            break
    assert seq.spec_token_ids, "never tried again"


@pytest.mark.parametrize("text, problem", [
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"num_speculative_tokens": 3}', '"method": "ngram" or a draft "model"'),
    ('{"method": "ngram", "num_speculative_tokens": 3, "model": "x"}', "takes no"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min (4) is more than prompt_lookup_max (2)"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "greater than or equal to 1"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 1}', "Extra inputs"),
    ('{"method": "eagle", "num_speculative_tokens": 3}', "ngram"),
    ("ngram", "not valid JSON"),
])
def test_bad_configs_are_refused(text, problem):
    with pytest.raises(ValidationError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        SpeculativeConfig.model_validate(text)


# ------------------------------------------------------------------------------ rejection sampler

V = 8
N = 40_000
# The chi-square statistic's 99.99% quantile for 7 degrees of freedom (V - 1): a correct sampler
# fails this fixed-seed test with probability 1e-4 per check; the wrong distributions below are
# ~100x beyond it.
CHI2_7_9999 = 29.88


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _seqs(n: int, params: SamplingParams, drafts: list[int], q=None) -> list[Sequence]:
    out = []
    for _ in range(n):
        seq = Sequence("r", [0], params)
        seq.spec_token_ids = list(drafts)
        seq.spec_probs = q
        out.append(seq)
    return out


@pytest.mark.parametrize("case", ["point_mass", "draft_distribution", "top_k_temperature"])
def test_rejection_sampler_keeps_the_target_distribution(case):
    """N sequences verify two drafts against fixed target rows; the first emitted token must be
    distributed as row 0's target p0 and, where the first draft was accepted, the second as p1
    (the rows are independent here); chi-square at a stated tolerance (above)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0, max_tokens=100)
    if case == "top_k_temperature":
        params = SamplingParams(temperature=0.7, top_k=5, max_tokens=100)
    sampler = Sampler(torch.device("cpu"), seed=123)
    target = sampler._probs(logits, [params] * 3)
    target = target / target.sum(-1, keepdim=True)
    q = None
    draft = [int(target[0].argsort(descending=True)[2]), 5]  # the third most likely token
    if case == "draft_distribution":  # the drafts were drawn from q, a different distribution
        q = torch.softmax(torch.randn(2, V, generator=g), -1)
        draws = torch.multinomial(q, N, replacement=True, generator=g)  # [2, N]
        seqs = []
        for t in range(N):
            seqs += _seqs(1, params, [int(draws[0, t]), int(draws[1, t])], q)
    else:
        seqs = _seqs(N, params, draft)
    rows = logits.repeat(N, 1)  # 3 rows per sequence, in order
    emitted, _ = sampler.verify(rows, seqs, [2] * N)
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=V).float()
    assert _chi2(first, target[0]) < CHI2_7_9999
    second = torch.bincount(torch.tensor([e[1] for e in emitted if len(e) > 1], dtype=torch.long), minlength=V).float()
    assert second.sum() > 1000
    assert _chi2(second, target[1]) < CHI2_7_9999
    # The test has power: the drafts' own distribution (always accepting) is far outside it.
    if case == "draft_distribution":
        assert _chi2(torch.bincount(draws[0], minlength=V).float(), target[0]) > 100 * CHI2_7_9999
    else:
        assert target[0][draft[0]] < 0.9  # rejections happen, so the residual draw is exercised


def test_greedy_verification_accepts_the_argmax_prefix():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([2, 3, 7, 1]):
        logits[row, best] = 1.0
    seq = _seqs(1, SamplingParams(temperature=0), [2, 3, 4])[0]
    emitted, _ = sampler.verify(logits, [seq], [3])
    assert emitted == [[2, 3, 7]]
    seq = _seqs(1, SamplingParams(temperature=0), [2, 3, 7])[0]
    assert sampler.verify(logits, [seq], [3])[0] == [[2, 3, 7, 1]]
    seq = _seqs(1, SamplingParams(temperature=0, repetition_penalty=1.5), [5])[0]  # the general path
    assert sampler.verify(logits[:2], [seq], [1])[0] == [[2]]
    assert math.isfinite(float(logits.sum()))


def test_grammar_cuts_the_drafts_it_refuses(default_model_dir):
    """Drafts for a constrained sequence stop at the first token its grammar would refuse
    (GrammarBank.accepted_prefix), and the matcher is left where it was."""
    from transformers import AutoTokenizer

    from quantserve.server.engine.grammar import GrammarCompiler, StructuredOutput

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    sampler = Sampler(torch.device("cpu"))
    sampler.use_grammars(compiler)
    spec = StructuredOutput("regex", "[0-9]{1,6}-[a-z]{1,6}")
    seq = Sequence("r", [1, 2, 3], SamplingParams(temperature=0, structured=spec, max_tokens=20))
    digits = [tokenizer.convert_tokens_to_ids(c) for c in "12"]
    dash, letter = tokenizer.convert_tokens_to_ids("-"), tokenizer.convert_tokens_to_ids("a")
    bank = sampler.grammars
    assert bank.accepted_prefix(seq, digits + [dash, letter]) == 4
    assert bank.accepted_prefix(seq, digits + [letter, dash]) == 2  # a letter before the dash: refused
    seq.append_token(digits[0])
    assert bank.accepted_prefix(seq, [dash, dash]) == 1  # the matcher followed the sequence, not the drafts
