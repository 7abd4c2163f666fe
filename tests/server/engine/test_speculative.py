"""Speculative decoding (engine/speculative.py) on the default model: the oracle is the plain
engine (no speculation) on the same weights, token for token, at --matmul-precision highest with
a float32 KV cache; and, for the rejection sampler, the target distribution itself."""

from __future__ import annotations

import asyncio

import pytest
import torch

from quantserve.server.engine import SamplingParams
from quantserve.server.engine.grammar import StructuredOutput
from quantserve.server.engine.spec_config import SpeculativeConfig

from .conftest import run
from .helpers import assert_blocks_all_free, collect, make_prompts, started

# A low row cost: the adaptive rule lets drafts through even in the tests' busy batches, so that
# verification (what these tests check) runs often; the rule itself is tested in test_speculative_rules.
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_max=4, prompt_lookup_min=1,
                          row_cost=0.02)

CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n")
LIST = "apples, pears, plums, cherries, grapes, lemons, limes, melons, peaches, figs"


def copy_prompts(tokenizer) -> list[list[int]]:
    """Chat prompts whose answers copy their input (where prompt lookup finds its drafts)."""
    asks = [f"Repeat this code exactly, renaming add to plus:\n\n{CODE}",
            f"Write this list one item per line, in the same order:\n{LIST}",
            f"Copy this text exactly:\n{CODE}{CODE}"]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for a in asks]


@pytest.fixture
def highest():
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")


def _check_blocks_after_each_step(engine) -> None:
    """After every step, each running sequence holds exactly the blocks its computed tokens need,
    as in the plain engine (the drafts' extra blocks rolled back)."""
    postprocess = engine.scheduler.postprocess
    bm = engine.block_manager

    def checked(batch, sampled):
        updated = postprocess(batch, sampled)
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens), seq
        return updated

    engine.scheduler.postprocess = checked


async def _generate(model, tokenizer, prompts, params, spec=None, stagger=0.02, **config):
    engine = await started(model, tokenizer, **{"kv_cache_dtype": "float32", "num_kv_blocks": 512,
                                                 "speculative_config": spec, **config})
    _check_blocks_after_each_step(engine)
    try:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        results = await asyncio.gather(*[collect(engine, p, sp, f"r{i}", delay=stagger * i)
                                         for i, (p, sp) in enumerate(zip(prompts, params))])
        assert_blocks_all_free(engine)
        stats = engine.spec.stats.snapshot() if engine.spec is not None else None
    finally:
        await engine.shutdown()
    return results, stats


@pytest.mark.parametrize("forward", ["fused", "layers"])
def test_ngram_greedy_equals_plain_engine(smollm, highest, forward):
    """Many prompts and lengths, arriving staggered (verify rows share steps with other sequences'
    decode rows and prompt chunks): the same tokens, text and finish reasons as without drafts."""
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 10) + copy_prompts(tokenizer)
    params = [SamplingParams(max_tokens=8 + (i * 7) % 33, temperature=0) for i in range(len(prompts))]
    config = dict(forward=forward, max_num_batched_tokens=96, max_num_seqs=8)
    plain, _ = run(_generate(model, tokenizer, prompts, params, **config))
    spec, stats = run(_generate(model, tokenizer, prompts, params, NGRAM, **config))
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert b.token_ids == a.token_ids, f"request {i}"
        assert b.text == a.text and b.finish_reason == a.finish_reason, f"request {i}"
    # Both branches were taken: drafts accepted, and drafts rejected (rolled back). (How many drafts
    # are made depends on the batches the staggered arrivals form, so on the machine's speed: a
    # clean-clone run on a loaded 2-core machine saw 27 drafted, 13 accepted.)
    assert stats["num_accepted_tokens"] >= 5, stats
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"], stats


def test_max_tokens_reached_inside_an_accepted_run(smollm, highest):
    """A copy answer cut at every length from 3 to 24: the spec engine stops at exactly max_tokens
    (drafts never run past it) with the plain engine's tokens, and some of those ends came from a
    step that emitted several tokens."""
    model, tokenizer = smollm
    prompt = copy_prompts(tokenizer)[2]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in range(3, 25)]
    plain, _ = run(_generate(model, tokenizer, [prompt] * len(params), params, stagger=0))
    spec, stats = run(_generate(model, tokenizer, [prompt] * len(params), params, NGRAM, stagger=0, max_num_seqs=4))
    multi_end = 0
    for sp, a, b in zip(params, plain, spec):
        assert len(b.token_ids[0]) == sp.max_tokens and b.finish_reason == ["length"]
        assert b.token_ids == a.token_ids and b.text == a.text
        multi_end += len(b.outputs[-1].outputs[0].token_ids) > 1
    assert multi_end > 0 and stats["num_accepted_tokens"] > 0


def test_stop_string_inside_an_accepted_run(smollm, highest):
    """A stop string met in the middle of a step's accepted tokens: the text ends before it, the
    tokens after it are dropped, as the plain engine does (which meets it one token at a time)."""
    model, tokenizer = smollm
    prompt = copy_prompts(tokenizer)[2]
    full, _ = run(_generate(model, tokenizer, [prompt], SamplingParams(max_tokens=60, temperature=0)))
    text = full[0].text[0]
    # Stop strings at several places of the copied code.
    stops = [w for w in ("sub", "return a *", "mul(", "b):\n    return a -") if w in text]
    assert stops, text
    params = [SamplingParams(max_tokens=60, temperature=0, stop=[s]) for s in stops]
    plain, _ = run(_generate(model, tokenizer, [prompt] * len(params), params, stagger=0))
    engine_cuts = []

    async def spec_run():
        engine = await started(model, tokenizer, kv_cache_dtype="float32", num_kv_blocks=512,
                               speculative_config=NGRAM)
        postprocess = engine.scheduler.postprocess

        def watch(batch, sampled):  # how many tokens each step emitted, by request
            for seq, t in zip(batch.seqs, sampled):
                if isinstance(t, list):
                    engine_cuts.append((seq.request_id, len(t)))
            return postprocess(batch, sampled)

        engine.scheduler.postprocess = watch
        try:
            out = [await collect(engine, prompt, sp, f"r{i}") for i, sp in enumerate(params)]
            assert_blocks_all_free(engine)
            return out
        finally:
            await engine.shutdown()

    spec = run(spec_run())
    dropped = 0
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert b.text == a.text and b.token_ids == a.token_ids and b.finish_reason == ["stop"], stops[i]
        assert stops[i] not in b.text[0]
        last_step = [n for rid, n in engine_cuts if rid == f"r{i}"][-1]
        dropped += last_step > len(b.outputs[-1].outputs[0].token_ids)
    assert dropped > 0, "no stop string fell inside a multi-token step"


def test_structured_output_with_speculation(smollm, highest):
    """A JSON schema with drafts on: the grammar cuts the drafts it refuses before they are
    verified, and the output is the plain engine's, token for token."""
    model, tokenizer = smollm
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
              "required": ["items"]}
    structured = StructuredOutput.json_schema(schema)
    prompt = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Give these fruits as a JSON list under 'items': {LIST}"}],
        add_generation_prompt=True, tokenize=True, return_dict=False))
    params = SamplingParams(max_tokens=60, temperature=0, structured=structured)
    plain, _ = run(_generate(model, tokenizer, [prompt], params))
    spec, stats = run(_generate(model, tokenizer, [prompt], params, NGRAM))
    assert spec[0].token_ids == plain[0].token_ids and spec[0].finish_reason == plain[0].finish_reason
    assert stats["num_accepted_tokens"] > 0, stats


def test_client_disconnect_mid_verify(smollm):
    """A stream closed while its sequence is verifying drafts: the request is aborted at the next
    step, every KV block comes back, and the engine serves the next request."""
    model, tokenizer = smollm
    prompt = copy_prompts(tokenizer)[2]

    async def scenario():
        engine = await started(model, tokenizer, num_kv_blocks=512, speculative_config=NGRAM)
        try:
            stream = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0), "gone")
            seen = 0
            async for out in stream:
                seen += len(out.outputs[0].token_ids)
                if engine.spec.stats.num_drafts >= 2:
                    break
            await stream.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if engine.scheduler.num_running == 0 and not engine._requests:
                    break
            assert_blocks_all_free(engine)
            after = await collect(engine, prompt, SamplingParams(max_tokens=8, temperature=0), "next")
            assert len(after.token_ids[0]) == 8
            assert_blocks_all_free(engine)
            return seen
        finally:
            await engine.shutdown()

    assert 0 < run(scenario()) < 200


def test_sampled_requests_run_and_seeded_ones_are_not_speculated(smollm):
    """temperature > 0 goes through the rejection sampler (end to end: counts add up, blocks come
    back); a seeded sampled request gets no drafts, so its tokens stay those of the plain engine."""
    model, tokenizer = smollm
    prompts = copy_prompts(tokenizer)
    params = [SamplingParams(max_tokens=30, temperature=0.7, top_p=0.95, logprobs=2) for _ in prompts]
    spec, stats = run(_generate(model, tokenizer, prompts, params, NGRAM))
    assert stats["num_drafts"] > 0
    for r in spec:
        assert len(r.logprobs[0]) == len(r.token_ids[0])
        assert [lp.token_id for lp in r.logprobs[0]] == r.token_ids[0]
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=7)
    plain, _ = run(_generate(model, tokenizer, prompts[:1], seeded))
    again, stats = run(_generate(model, tokenizer, prompts[:1], seeded, NGRAM))
    assert again[0].token_ids == plain[0].token_ids and stats["num_drafts"] == 0


# ------------------------------------------------------------------------------ draft model


def _random_draft(vocab: int):
    """A tiny random Llama with the default model's vocabulary, 4-bit like a served draft."""
    import transformers

    import quantserve.quant as quant
    from quantserve.server.engine.models.sixteen_bit import to_16bit

    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    draft = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    quant.quantize_model(draft, quant.QuantConfig())
    to_16bit(draft)
    return draft


async def _with_draft(model, tokenizer, prompts, params, spec, draft_model=None, **config):
    from quantserve.server.engine import EngineConfig
    from quantserve.server.engine.engine import AsyncEngine

    engine = AsyncEngine(model, tokenizer, EngineConfig(**{"kv_cache_dtype": "float32", "num_kv_blocks": 512,
                                                          "speculative_config": spec, **config}),
                         draft_model=draft_model)
    await engine.start()
    try:
        results = await asyncio.gather(*[collect(engine, p, params, f"r{i}", delay=0.02 * i)
                                         for i, p in enumerate(prompts)])
        assert_blocks_all_free(engine)
        proposer = engine.spec.proposer
        assert proposer.bm.num_free_blocks == proposer.bm.num_blocks  # the draft's cache too
        return results, engine.spec.stats.snapshot()
    finally:
        await engine.shutdown()


@pytest.mark.slow
def test_draft_model_equal_to_the_target_is_always_accepted(smollm, smollm_folder, highest):
    """The default model as its own draft, loaded by path through the loader (4-bit): at
    temperature 0 every draft is accepted, and the output is the plain engine's."""
    model, tokenizer = smollm
    prompts = make_prompts(tokenizer, 4)
    params = SamplingParams(max_tokens=20, temperature=0)
    spec = SpeculativeConfig(model=str(smollm_folder), num_speculative_tokens=3, draft_cost=0)
    plain, _ = run(_generate(model, tokenizer, prompts, params, max_num_batched_tokens=96))
    got, stats = run(_with_draft(model, tokenizer, prompts, params, spec, max_num_batched_tokens=96))
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    assert stats["num_draft_tokens"] > 20 and stats["num_accepted_tokens"] == stats["num_draft_tokens"], stats


def test_draft_model_that_guesses_badly_changes_nothing(smollm, highest):
    """A random draft (its guesses mostly rejected, rolled back in both caches): greedy output equal
    to the plain engine's over several prompts and lengths; sampled requests run through the
    rejection rule with the draft's distributions."""
    model, tokenizer = smollm
    draft = _random_draft(model.get_input_embeddings().weight.shape[0])
    prompts = make_prompts(tokenizer, 6) + copy_prompts(tokenizer)[:1]
    params = SamplingParams(max_tokens=16, temperature=0)
    spec = SpeculativeConfig(model="random-draft", num_speculative_tokens=3, draft_cost=0, initial_acceptance=1.0)
    plain, _ = run(_generate(model, tokenizer, prompts, params, max_num_batched_tokens=96))
    got, stats = run(_with_draft(model, tokenizer, prompts, params, spec, draft, max_num_batched_tokens=96))
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"], stats
    sampled = SamplingParams(max_tokens=16, temperature=0.9)
    got, stats = run(_with_draft(model, tokenizer, prompts[:3], sampled, spec, draft))
    assert stats["num_drafts"] > 0 and all(len(r.token_ids[0]) > 0 for r in got)


@pytest.mark.slow
def test_lora_requests_with_speculation(smollm, lora_adapters, highest):
    """Requests with LoRA adapters (and one without) verify their drafts through the adapter:
    the plain engine's greedy output, adapter for adapter."""
    model, tokenizer = smollm
    prompts = copy_prompts(tokenizer)[:2]
    params = SamplingParams(max_tokens=24, temperature=0)

    async def generate(spec):
        engine = await started(model, tokenizer, kv_cache_dtype="float32", num_kv_blocks=512, speculative_config=spec)
        try:
            for name in ("attn", "all"):
                engine.loras.load(name, str(lora_adapters[name]))
            out = {}
            for lora in (None, "attn", "all"):
                for i, p in enumerate(prompts):
                    tokens = []
                    async for o in engine.generate(p, params, f"r{i}-{lora}", lora=lora):
                        tokens += o.outputs[0].token_ids if o.outputs else []
                    out[(lora, i)] = tokens
            assert_blocks_all_free(engine)
            return out, engine.spec.stats.snapshot() if engine.spec else None
        finally:
            await engine.shutdown()

    plain, _ = run(generate(None))
    spec, stats = run(generate(NGRAM))
    assert spec == plain
    assert stats["num_accepted_tokens"] > 0
    assert plain[("attn", 0)] != plain[(None, 0)] or plain[("all", 0)] != plain[(None, 0)]  # the adapters matter
