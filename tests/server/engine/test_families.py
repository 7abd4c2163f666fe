"""The families people serve (family_models.py), through the native path, against transformers.

- logits: every position's logits computed by the engine's runner under its own scheduler
  (batching, chunked prefill, prefix-cache hits, preemption by a small KV cache), the tokens fed
  being transformers' greedy continuation, equal transformers' logits within float drift;
  transformers' logits come as generate computes them (the prompt in one call, then one token
  per call), which is what length-dependent rope types (dynamic, longrope) are defined by.
- generation: greedy outputs of the engine (concurrent, staggered requests) equal transformers'
  generate token for token (a divergence is accepted only at a transformers near-tie).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from quantserve.server.engine import EngineConfig, SamplingParams
from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.model_runner import ModelRunner
from quantserve.server.engine.models.decoder import DecoderModel
from quantserve.server.engine.scheduler import Scheduler
from quantserve.server.engine.sequence import Sequence

from . import family_models as fm
from .conftest import run
from .helpers import assert_blocks_all_free, collect, hf_top2_margin, started

MAX_NEW = 12
NEAR_TIE = 1e-3
LOGIT_ATOL = 2e-3  # relative to the largest logit magnitude of the position


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: parallel regions cost more than they save, and on a busy machine OpenMP
    threads waiting for each other made a forward 100x slower (9 ms vs 1.7 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reset_rope(model) -> None:
    """transformers' dynamic rope keeps the frequencies of the longest sequence it has seen: each
    oracle call starts from the original ones, as a fresh model would."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


def hf_generate(model, prompt: list[int], max_new: int = MAX_NEW) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation, and its logits at every position of prompt + continuation
    but the last: the prompt's from one forward over it, the rest as generate computed them."""
    reset_rope(model)
    with torch.inference_mode():
        prompt_logits = model(torch.tensor([prompt])).logits[0].float()
        reset_rope(model)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    tokens = out.sequences[0, len(prompt):].tolist()
    steps = torch.stack([x[0].float() for x in out.logits[1:]]) if len(out.logits) > 1 else prompt_logits[:0]
    return tokens, torch.cat([prompt_logits, steps])


_oracles: dict[str, list] = {}


def oracle(key: str, model, prompts) -> list[tuple[list[int], torch.Tensor]]:
    """hf_generate of each prompt, once per model (both tests of a family use it)."""
    if key not in _oracles:
        _oracles[key] = [hf_generate(model, p) for p in prompts]
    return _oracles[key]


def engine_logits(model, tokens: list[list[int]], prompt_lens: list[int], num_blocks: int, budget: int,
                  kv_cache_dtype: str = "float32", forward: str = "auto", runners: list | None = None):
    """Teacher-forced run of the runner under its scheduler: {(seq, position): logits when the
    position was first computed}, and the scheduler's statistics. Each sequence is fed tokens[i]
    (its prompt, then the given tokens). A float32 KV cache by default: the logits are compared
    with transformers' (float32 cache). `forward`: the forward path; `runners` gets the runner."""
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=num_blocks, max_num_batched_tokens=budget,
                                             kv_cache_dtype=kv_cache_dtype, forward=forward))
    if runners is not None:
        runners.append(runner)
    bm = BlockManager(runner.num_blocks, 16, runner.supports_prefix_caching, sliding_window=runner.sliding_window)
    # First come, first served: on this tiny cache that order both preempts and serves shared prefixes
    # from the cache, the runner paths these tests are for (the fair policy interleaves the prompts'
    # prefills, and on an all-sliding model their shared blocks are evicted before anyone reuses them;
    # fairness has its own tests, test_fair_scheduling.py).
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, recompute_above=runner.recompute_above,
                      policy="fcfs")
    seqs = []
    for i, (toks, plen) in enumerate(zip(tokens, prompt_lens)):
        seq = Sequence(f"r{i}", toks[:plen], SamplingParams(max_tokens=len(toks) - plen, temperature=0,
                                                              ignore_eos=True))
        seqs.append(seq)
        sched.add(seq)
    index = {id(s): i for i, s in enumerate(seqs)}
    got: dict[tuple[int, int], torch.Tensor] = {}
    while sched.has_work():
        batch = sched.schedule()
        assert not batch.cut_off
        inputs = runner.inputs(batch, runner.flatten(batch))
        inputs.logit_rows = torch.arange(inputs.input_ids.shape[0])  # every row, not only the sampled ones
        logits = runner.model.forward_logits(inputs, runner.kv_caches)
        order = [i for i, n in enumerate(batch.num_new_tokens) if n == 1] + \
                [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
        row = 0
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            for j in range(n):  # the first computation: a recompute (preemption) must not hide it
                got.setdefault((index[id(seq)], seq.num_computed_tokens + j), logits[row + j])
            row += n
        sampled = [tokens[index[id(s)]][s.num_computed_tokens + n] if sample else None
                   for s, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample)]
        sched.postprocess(batch, sampled)
    assert bm.num_free_blocks == bm.num_blocks
    return got, sched.num_preemptions, bm.prefix_cache_hit_rate if runner.supports_prefix_caching else None


def check_logits(key, model, prompts, num_blocks=12, budget=64):
    refs = oracle(key, model, prompts)
    tokens = [p + out for p, (out, _) in zip(prompts, refs)]
    got, preemptions, hit_rate = engine_logits(model, tokens, [len(p) for p in prompts], num_blocks, budget)
    for i, (toks, (_, want)) in enumerate(zip(tokens, refs)):
        for p in range(len(toks) - 1):
            if (i, p) not in got:
                continue  # a prefix-cache hit: the engine never computed it
            scale = want[p].abs().max().item()
            err = (got[(i, p)] - want[p]).abs().max().item()
            assert err <= LOGIT_ATOL * max(scale, 1.0), f"sequence {i} position {p}: max |diff| {err:.2e} (scale {scale:.1f})"
    return preemptions, hit_rate


@pytest.mark.parametrize("family", sorted(fm.FAMILIES))
def test_family_logits_match_transformers(family):
    model = fm.family_model(family)
    preemptions, hit_rate = check_logits(family, model, fm.prompts())
    assert preemptions > 0  # the small cache made the scheduler preempt and recompute
    assert hit_rate is None or hit_rate > 0  # shared prefixes served from the cache (where it is on)


@pytest.mark.parametrize("rope_type", sorted(fm.ROPE_TYPES))
def test_rope_types_match_transformers(rope_type):
    """Every rope scaling type transformers ships, on a Llama, past the dynamic / longrope thresholds."""
    model = fm.build_model(fm.rope_config(rope_type))
    check_logits(f"rope:{rope_type}", model, fm.prompts(count=6, seed=2), num_blocks=40)


def compare_greedy(key, model, prompts, got: list[list[int]]) -> None:
    for prompt, out, (want, _) in zip(prompts, got, oracle(key, model, prompts)):
        if out == want:
            continue
        j = next(k for k, (a, b) in enumerate(zip(out, want)) if a != b)
        reset_rope(model)
        margin, best, second = hf_top2_margin(model, prompt + want[:j])
        assert margin < NEAR_TIE and out[j] in (best, second), (
            f"prompt of {len(prompt)} tokens diverges at {j}: engine {out[j:]}, transformers {want[j:]} "
            f"(transformers' top-2 margin {margin:.2e})")


@pytest.mark.parametrize("family", sorted(fm.FAMILIES))
def test_family_greedy_matches_transformers(family):
    model = fm.family_model(family)
    prompts = fm.prompts()
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

    async def main():
        # float32 KV cache: compared token for token with transformers (float32 cache)
        engine = await started(model, None, num_kv_blocks=12, max_num_batched_tokens=48, max_num_seqs=8,
                               kv_cache_dtype="float32")
        assert isinstance(engine.runner.model, DecoderModel)
        try:
            res = await asyncio.gather(*[collect(engine, p, params, f"r{i}")
                                         for i, p in enumerate(prompts)])
            assert_blocks_all_free(engine)
            return ([r.token_ids[0] for r in res], engine.stats(), engine.block_manager.num_released_out_of_window,
                    engine.runner.sliding_window)
        finally:
            await engine.shutdown()

    got, stats, released, sliding_window = run(main())
    compare_greedy(family, model, prompts, got)
    # The small cache made the scheduler preempt, or (every layer sliding) give blocks back early.
    assert stats.num_preemptions > 0 or released > 0
    assert (released > 0) == (sliding_window is not None)


def test_what_neither_path_serves_is_refused_naming_why():
    """A model neither path can serve fails at load with one line naming the reason (the server
    exits with it), never a hang at request time."""
    from quantserve.server.engine.attention import SdpaBackend
    from quantserve.server.engine.forward_path import build_forward
    from quantserve.server.engine.models import UnsupportedModelError

    config = fm.build_config("gemma3")
    config.use_bidirectional_attention = True  # EmbeddingGemma-style: not a causal LM
    model = fm.build_model(config)
    attention = SdpaBackend(torch.device("cpu"), 4, 2, 32)
    with pytest.raises(UnsupportedModelError, match="bidirectional attention"):
        build_forward(model, "auto", attention, torch.float32)
    for path in ("layers", "fused"):
        with pytest.raises(UnsupportedModelError, match=f"forward '{path}' cannot serve"):
            build_forward(model, path, attention, torch.float32)
    # any causal LM transformers serves goes through the transformers path when asked
    qwen3 = fm.family_model("qwen3")
    adapter, choice = build_forward(qwen3, "transformers", attention, torch.float32)
    assert type(adapter).__name__ == "TransformersModel" and choice.path == "transformers"
