"""AsyncEngine.embed through the engine's prefill path (pooling.py, ModelRunner.prefill_hidden): on
each forward path (fused, layers, transformers) it equals transformers' own forward of the same
weights with the same pooling, a batch equals one prompt at a time, a prompt longer than the token
budget is prefilled in chunks, the prefix cache is left as it was, and a batch that finds too few
free KV blocks waits for running sequences instead of preempting them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from quantserve.server.engine import SamplingParams
from quantserve.server.engine.block_manager import BlockManager
from quantserve.server.engine.pooling import Pooling, batches

from .conftest import run
from .family_models import build_config, build_model, prompts
from .helpers import assert_blocks_all_free, collect, started

PATHS = ["fused", "layers", "transformers"]


@pytest.fixture(scope="module")
def model():
    """A Qwen3-shaped random model, NF4 with float32 compute (what the fused path serves)."""
    return build_model(build_config("qwen3"))


def reference(model, prompt: list[int], pooling: Pooling) -> torch.Tensor:
    """transformers' own forward of one prompt, pooled."""
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0].float()
    vector = {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling.mode]
    return torch.nn.functional.normalize(vector, dim=-1) if pooling.normalize else vector


async def _embed(model, texts, pooling, **config):
    engine = await started(model, None, **config)
    try:
        assert engine.execution()["forward"] == config.get("forward", "fused")  # auto: fused for this model
        engine.pooling = pooling
        batch = await engine.embed(texts)
        singles = [(await engine.embed([t]))[0] for t in texts]
        assert_blocks_all_free(engine)
        return torch.tensor(batch), torch.tensor(singles)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("forward, mode", [(path, "mean") for path in PATHS] + [("fused", "last"), ("transformers", "cls")])
def test_equals_transformers_and_batch_equals_one_by_one(model, forward, mode):
    texts = prompts(8)
    pooling = Pooling(mode, mode != "cls", "test")
    batch, singles = run(_embed(model, texts, pooling, forward=forward, num_kv_blocks=64, max_num_batched_tokens=256,
                                kv_cache_dtype="float32"))
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    for text, got in zip(texts, batch):
        want = reference(model, text, pooling)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32 keys and values: reordering noise


def test_default_settings_bf16_cache(model):
    """The engine's defaults (auto forward, the native kernel's bfloat16 keys and values): close."""
    texts = prompts(8)
    pooling = Pooling("mean", True, "test")
    batch, singles = run(_embed(model, texts, pooling, num_kv_blocks=64))
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    for text, got in zip(texts, batch):
        assert float(torch.cosine_similarity(got, reference(model, text, pooling), dim=0)) > 0.999


@pytest.mark.parametrize("forward", ["layers", "transformers"])
def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks(model, forward):
    texts = prompts(10)
    long, short = texts[8] * 3, texts[:3]  # 300 tokens, budget 64: five passes over one block table
    pooling = Pooling("mean", True, "test")
    batch, singles = run(_embed(model, [long, *short], pooling, forward=forward, num_kv_blocks=64,
                                max_num_batched_tokens=64, kv_cache_dtype="float32"))
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    for text, got in zip([long, *short], batch):
        torch.testing.assert_close(got, reference(model, text, pooling), atol=1e-5, rtol=1e-5)


def _prefix_cache(bm: BlockManager):
    return dict(bm.hash_to_block), list(bm.block_hash), bm.prefix_hits, bm.prefix_queries, bm.prefix_cache_hit_rate


def test_prefix_cache_untouched_and_generation_unchanged(model):
    texts = prompts(10)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    async def main():
        engine = await started(model, None, forward="layers", num_kv_blocks=128, max_num_batched_tokens=128)
        try:
            bm = engine.block_manager
            before = [await collect(engine, p, greedy, f"warm{i}") for i, p in enumerate(texts[:4])]
            cached = _prefix_cache(bm)
            assert cached[0], "the warm-up requests left prefixes in the cache"
            vectors = await engine.embed(texts)
            assert _prefix_cache(bm) == cached
            assert_blocks_all_free(engine)
            # generation and embeddings at once: both as they are alone, and the cache hits as before
            together = await asyncio.gather(*(collect(engine, p, greedy, f"again{i}") for i, p in enumerate(texts[:4])),
                                            engine.embed(texts))
            assert [r.token_ids for r in together[:4]] == [r.token_ids for r in before]
            for prompt, result in zip(texts, together[:4]):
                assert result.num_cached_tokens == (len(prompt) - 1) // 16 * 16  # every full block found again
            torch.testing.assert_close(torch.tensor(together[4]), torch.tensor(vectors), atol=1e-5, rtol=1e-5)
            assert engine.scheduler.num_preemptions == 0
            assert_blocks_all_free(engine)
        finally:
            await engine.shutdown()

    run(main())


def test_waits_for_blocks_instead_of_preempting(model):
    """A running sequence holds most of a small cache: the batch runs once it has finished."""
    prompt = prompts(10)[4]  # 64 tokens: 4 blocks, 8 once it has generated 64 more
    texts = [p for p in prompts(8) if len(p) < 48][:3]
    pooling = Pooling("mean", True, "test")

    async def main():
        engine = await started(model, None, forward="layers", num_kv_blocks=10, max_num_batched_tokens=128,
                               kv_cache_dtype="float32")
        try:
            engine.pooling = pooling
            bm = engine.block_manager
            stream = collect(engine, prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True), "long")
            task = asyncio.ensure_future(stream)
            while bm.num_free_blocks > 3:  # the sequence holds 7 of 10 blocks (8 at its end)
                await asyncio.sleep(0.001)
            needed = sum(-(-len(t) // bm.block_size) for t in texts)
            assert needed == 4 > bm.num_free_blocks
            vectors = await engine.embed(texts)
            assert engine._num_requests_finished == 1  # the batch ran after the sequence had finished
            assert len((await task).token_ids[0]) == 64 and engine.scheduler.num_preemptions == 0
            for text, got in zip(texts, vectors):
                torch.testing.assert_close(torch.tensor(got), reference(model, text, pooling), atol=1e-5, rtol=1e-5)
            assert_blocks_all_free(engine)
        finally:
            await engine.shutdown()

    run(main())


def test_scratch_blocks_take_uncached_blocks_first():
    bm = BlockManager(8, 4)
    from quantserve.server.engine.sequence import Sequence

    seq = Sequence("a", list(range(12)), SamplingParams())
    assert bm.allocate(seq, 12)
    bm.free(seq)  # 3 cached blocks, free
    cached = _prefix_cache(bm)
    blocks = bm.take_scratch(5)
    assert blocks is not None and len(blocks) == 5 and not set(blocks) & set(cached[0].values())
    assert bm.take_scratch(4) is None and bm.num_free_blocks == 3  # too few: nothing changes
    bm.return_scratch(blocks)
    assert _prefix_cache(bm) == cached and bm.num_free_blocks == 8 and not any(bm.ref_counts)
    assert list(bm.free_blocks)[:5] == blocks  # first in line for reuse
    blocks = bm.take_scratch(7)  # 2 more than the uncached ones: the least recently freed cached blocks go
    assert set(cached[0].values()) - set(blocks) == {0} and list(bm.hash_to_block.values()) == [0]  # the head stays
    bm.return_scratch(blocks)


def test_batches_keep_within_tokens_rows_and_blocks():
    lengths = (5, 1, 9, 3, 9, 2, 30, 4)
    texts = [[1] * n for n in lengths]
    groups = batches(texts, 10, 3, 4, 5)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # in order
    for group in groups:
        if len(group) > 1:
            assert sum(lengths[i] for i in group) <= 10 and len(group) <= 3
            assert sum(-(-lengths[i] // 4) for i in group) <= 5
    assert [6] in groups  # longer than the budget: alone
