"""The sampler on synthetic logits: filters, penalties, seeds, logprobs (no model)."""

from __future__ import annotations

import math

import torch

from quantserve.server.engine.sampler import Sampler
from quantserve.server.engine.sequence import SamplingParams, Sequence

V = 50


def seq(params: SamplingParams, tokens=(1, 2, 3), outputs=(), index=0) -> Sequence:
    s = Sequence("r", list(tokens), params, index=index)
    s.token_ids += list(outputs)
    return s


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_pick_the_argmax():
    x = logits(4)
    sampler = Sampler(torch.device("cpu"))
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(top_k=1)), seq(SamplingParams(temperature=0)),
            seq(SamplingParams(top_p=1e-6))]
    tokens, _ = sampler(x, seqs)
    assert tokens == x.argmax(-1).tolist()


def test_filters_keep_samples_inside_the_allowed_set():
    x = logits(1, seed=3)
    order = x[0].argsort(descending=True).tolist()
    probs = x[0].softmax(-1)
    sampler = Sampler(torch.device("cpu"), seed=1)
    top5 = set(order[:5])
    nucleus = set(order[: next(i for i in range(V) if probs[order[: i + 1]].sum() >= 0.5) + 1])
    strong = {t for t in range(V) if probs[t] >= 0.2 * probs.max()}
    for _ in range(200):
        tokens, _ = sampler(x.repeat(3, 1), [seq(SamplingParams(top_k=5)), seq(SamplingParams(top_p=0.5)),
                                             seq(SamplingParams(min_p=0.2))])
        assert tokens[0] in top5 and tokens[1] in nucleus and tokens[2] in strong


def test_sampling_follows_the_distribution():
    x = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)] + [-1e9] * (V - 3)])
    sampler = Sampler(torch.device("cpu"), seed=0)
    counts = [0, 0, 0]
    for _ in range(3000):
        tokens, _ = sampler(x, [seq(SamplingParams())])
        counts[tokens[0]] += 1
    assert abs(counts[0] / 3000 - 0.7) < 0.04 and abs(counts[2] / 3000 - 0.1) < 0.03


def test_a_seeded_sequence_ignores_its_neighbours():
    x = logits(3, seed=5)
    a = Sampler(torch.device("cpu"), seed=0)
    b = Sampler(torch.device("cpu"), seed=99)
    p = SamplingParams(seed=1234, temperature=1.0)
    alone = [a(x[1:2], [seq(p)])[0][0] for _ in range(1)]
    s_a = seq(p)
    s_b = seq(p)
    got_a = [a(x[1:2], [s_a])[0][0] for _ in range(20)]
    got_b = [b(x, [seq(SamplingParams()), s_b, seq(SamplingParams(temperature=0))])[0][1] for _ in range(20)]
    assert got_a == got_b and alone
    # another choice of the same request draws differently
    other = seq(p, index=1)
    assert [a(x[1:2], [other])[0][0] for _ in range(20)] != got_a


def test_penalties():
    x = torch.zeros(1, V)
    x[0, 7] = 2.0
    x[0, 8] = 1.9
    sampler = Sampler(torch.device("cpu"))
    greedy = dict(temperature=0)
    assert sampler(x, [seq(SamplingParams(**greedy))])[0] == [7]
    # 7 seen in the prompt: repetition penalty 2 halves its logit
    assert sampler(x, [seq(SamplingParams(repetition_penalty=2.0, **greedy), tokens=(7,))])[0] == [8]
    # presence / frequency only count the output
    assert sampler(x, [seq(SamplingParams(presence_penalty=0.5, **greedy), tokens=(7,))])[0] == [7]
    assert sampler(x, [seq(SamplingParams(presence_penalty=0.5, **greedy), outputs=(7,))])[0] == [8]
    assert sampler(x, [seq(SamplingParams(frequency_penalty=0.06, **greedy), outputs=(7, 7))])[0] == [8]
    assert sampler(x, [seq(SamplingParams(frequency_penalty=0.04, **greedy), outputs=(7, 7))])[0] == [7]


def test_logprobs_are_the_raw_distribution():
    x = logits(2, seed=9)
    sampler = Sampler(torch.device("cpu"))
    tokens, lps = sampler(x, [seq(SamplingParams(temperature=2.0, logprobs=4)), seq(SamplingParams())])
    ref = x[0].log_softmax(-1)
    assert lps[1] is None
    lp = lps[0]
    assert lp.token_id == tokens[0] and math.isclose(lp.logprob, ref[tokens[0]].item(), abs_tol=1e-5)
    top = ref.topk(4)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), b in zip(lp.top, top.values.tolist()))
