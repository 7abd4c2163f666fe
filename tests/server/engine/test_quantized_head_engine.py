"""The engine with a quantized output head (--quantize-lm-head int8|nf4) on the default model
(NF4 layers, tied embeddings): its greedy tokens and their logprobs equal transformers' forward on
the same converted model (one source of truth: both call the same head and embedding modules),
and the resident weights drop by the 16-bit matrix less the head's bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantserve.server.engine import EngineConfig, SamplingParams
from quantserve.server.engine.models.quantized_head import QuantizedEmbedding, quantize_lm_head

from .conftest import load_quantized, run
from .helpers import collect, hf_top2_margin, make_prompts, started

V, K = 49152, 576
MAX_NEW = 12
# At "highest" precision, with a float32 KV cache, the engine's batched, paged forward and
# transformers' full forward differ only in summation order: measured <= 2e-5 in logprob with
# either head (and the 16-bit one). 2e-4 is that with margin, and far below what a wrong head
# costs (the int8 and nf4 heads' logprobs differ by ~1e-2..1e-1). A 16-bit KV cache (the CPU
# default where the native attention reads it) alone moves logprobs by ~2e-2.
LOGPROB_TOL = 2e-4
KV_FLOAT32 = {"kv_cache_dtype": "float32"} if "kv_cache_dtype" in {f.name for f in dataclasses.fields(EngineConfig)} \
    else {}
ENGINE = dict(max_num_seqs=4, num_kv_blocks=128, **KV_FLOAT32)  # the same for the baseline
NEAR_TIE = 1e-3  # as test_engine_exact.py at "highest"


@pytest.fixture(scope="module")
def baseline_weights(smollm):
    """Resident weight bytes of the engine with the 16-bit head (the session's shared model)."""
    model, tokenizer = smollm

    async def measure():
        engine = await started(model, tokenizer, **ENGINE)
        try:
            return engine.weight_memory()
        finally:
            await engine.shutdown()

    return run(measure())


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_engine_equals_transformers_with_a_quantized_head(kind, smollm_folder, smollm, baseline_weights):
    torch.set_float32_matmul_precision("highest")
    _, tokenizer = smollm
    model = load_quantized(smollm_folder)
    info = quantize_lm_head(model, kind)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    prompts = make_prompts(tokenizer, 4)

    async def go():
        engine = await started(model, tokenizer, **ENGINE)
        try:
            assert engine.runner.model.lm_head is model.get_output_embeddings()  # the engine calls the same module
            weights = engine.weight_memory()  # at start, as the baseline (steps may add scratch tensors)
            params = SamplingParams(max_tokens=MAX_NEW, temperature=0, logprobs=0, ignore_eos=True)
            results = [await collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)]
            return results, weights
        finally:
            await engine.shutdown()

    results, weights = run(go())
    for prompt, res in zip(prompts, results):
        got = res.token_ids[0]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1].double()
        want_lp = torch.log_softmax(logits, -1)
        for j, (token, lp) in enumerate(zip(got, res.logprobs[0])):
            best = int(logits[j].argmax())
            if token != best:  # only where transformers itself sees a near-tie
                margin, first, second = hf_top2_margin(model, prompt + got[:j])
                assert margin < NEAR_TIE and token in (first, second), (j, token, best, margin)
            assert abs(lp.logprob - float(want_lp[j, token])) < LOGPROB_TOL, (j, lp.logprob, float(want_lp[j, token]))
    head_bytes = V * K + 4 * V if kind == "int8" else V * K // 2 + 4 * (V * K // 64) + 4 * 16
    assert info["bytes"] == head_bytes
    # The 16-bit vocabulary matrix (the tied embedding and head: one copy) is gone, the head is in.
    assert weights.get("bfloat16", 0) < V * K * 2 <= baseline_weights["bfloat16"]
    assert baseline_weights["total"] - weights["total"] == V * K * 2 - head_bytes, (baseline_weights, weights)
