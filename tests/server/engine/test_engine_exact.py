"""Greedy outputs of the engine equal transformers' generate, one request at a time, on the same
quantized model: many prompt lengths, staggered arrivals, chunked prefill, shared prefixes."""

from __future__ import annotations

import asyncio
import functools
import warnings

import pytest
import torch

from quantserve.server.engine import SamplingParams

from .conftest import run
from .helpers import assert_blocks_all_free, collect, hf_greedy, hf_top2_margin, make_prompts, started

MAX_NEW = 24
# A divergence is accepted only where transformers itself sees a near-tie between its two best
# tokens: batched and unbatched float32 matmuls may differ in the last bits (reported, never silent).
# With bf16 products (medium precision) a last-bit difference upstream sometimes rounds a matmul
# input to the neighbouring bf16 value, and those steps add up over 30 layers: transformers' own
# one-token decode steps and its full forward over the same tokens differ by up to ~0.1 in the
# logits of the default model, so its near-ties are that wide.
NEAR_TIE = {"highest": 1e-3, "medium": 0.25}


@functools.lru_cache(maxsize=None)
def _reference(model_id: int, precision: str, prompt: tuple[int, ...], max_new: int, model) -> tuple[int, ...]:
    return tuple(hf_greedy(model, list(prompt), max_new))


def reference(model, prompt, max_new=MAX_NEW):
    precision = torch.get_float32_matmul_precision()
    return list(_reference(id(model), precision, tuple(prompt), max_new, model))


@pytest.fixture(params=["highest", "medium"])
def matmul_precision(request, smollm):
    """Both float32 matmul precisions the server offers: medium (its default) computes the 4-bit
    matmuls, and the 16-bit output head, with bf16 products on AVX-512-BF16 CPUs, in the engine
    and in transformers alike (both run the same batch-invariant kernels)."""
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision("highest")


def compare(model, prompts, results, refs) -> list[str]:
    """Check outputs token for token; return notes on accepted near-tie divergences."""
    notes = []
    for i, (prompt, got, want) in enumerate(zip(prompts, results, refs)):
        if got == want:
            continue
        j = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        margin, best, second = hf_top2_margin(model, prompt + want[:j])
        msg = (f"request {i} (prompt {len(prompt)} tokens) diverges at output token {j}: engine {got[j:j + 3]}, "
               f"transformers {want[j:j + 3]}; transformers' top-2 margin there {margin:.2e} ({best} vs {second})")
        assert margin < NEAR_TIE[torch.get_float32_matmul_precision()] and got[j] in (best, second), msg
        notes.append(msg)
    return notes


async def _staggered(model, tokenizer, count, **config):
    prompts = make_prompts(tokenizer, count)
    # float32 KV cache: compared token for token with transformers (whose cache is float32)
    engine = await started(model, tokenizer, **{"kv_cache_dtype": "float32", **config})
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    try:
        results = await asyncio.gather(*[
            collect(engine, p, params, f"r{i}", delay=0.03 * i) for i, p in enumerate(prompts)
        ])
        stats = engine.stats()
        assert_blocks_all_free(engine)
    finally:
        await engine.shutdown()
    return prompts, results, stats


def _check_exact(smollm, count, **config):
    model, tokenizer = smollm
    prompts, results, stats = run(_staggered(model, tokenizer, count, **config))
    refs = [reference(model, p) for p in prompts]
    notes = compare(model, prompts, [r.token_ids[0] for r in results], refs)
    for note in notes:
        warnings.warn(note)
    # medium: 3 of 32 requests diverged at a near-tie (margins 0.01-0.03) when this was written
    per = 16 if torch.get_float32_matmul_precision() == "highest" else 8
    assert len(notes) <= max(1, count // per), notes
    for r, ref in zip(results, refs):
        # A request that took the other branch of a near-tie may end elsewhere (an EOS earlier or
        # later than transformers'); its finish reason must still agree with its own length.
        ended = ref if r.token_ids[0] == ref else r.token_ids[0]
        assert r.finish_reason[0] == ("stop" if len(ended) < MAX_NEW else "length")
        assert r.text[0] == model_text(tokenizer, r.token_ids[0])
    return stats


def model_text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_matches_transformers_8_requests(smollm, matmul_precision):
    # A small token budget: long prompts are prefilled in chunks, mixed with decodes.
    stats = _check_exact(smollm, 8, max_num_batched_tokens=96, max_num_seqs=8, num_kv_blocks=256)
    assert stats.prefix_cache_hit_rate > 0  # the chat prompts share their system prompt


@pytest.mark.slow
def test_greedy_matches_transformers_32_requests(smollm, matmul_precision):
    _check_exact(smollm, 32, max_num_batched_tokens=256, max_num_seqs=32, num_kv_blocks=1024)
