"""The generic path: transformers' own modules with our paged attention, on random models of
non-Llama architectures; greedy outputs equal transformers' generate one request at a time."""

from __future__ import annotations

import asyncio

import pytest
import torch

import quantserve.quant as quant
from quantserve.server.engine import SamplingParams

from .conftest import run
from .helpers import assert_blocks_all_free, collect, hf_greedy, hf_top2_margin, started

VOCAB = 512


def random_model(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=512, initializer_range=0.2,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(rotary_pct=0.5, **common)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(num_key_value_heads=2, head_dim=32, **common)
    else:  # pragma: no cover
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    quant.quantize_model(model, quant.QuantConfig())
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt_neox", "qwen3"])
def test_generic_path_matches_transformers(kind, smollm):
    _, tokenizer = smollm  # any tokenizer will do for the text; ids stay below VOCAB
    model = random_model(kind)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 64, 90, 130, 7)]
    prompts.append(prompts[5][:40] + [7, 8, 9])  # shares 2 full blocks with another prompt
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    async def main():
        # float32 KV cache: compared token for token with transformers (whose cache is float32)
        engine = await started(model, tokenizer, num_kv_blocks=128, max_num_batched_tokens=64,
                               forward="transformers", kv_cache_dtype="float32")
        from quantserve.server.engine.models.generic import TransformersModel

        assert isinstance(engine.runner.model, TransformersModel)
        try:
            res = await asyncio.gather(*[collect(engine, p, params, f"r{i}", delay=0.02 * i)
                                         for i, p in enumerate(prompts)])
            assert_blocks_all_free(engine)
            return [r.token_ids[0] for r in res]
        finally:
            await engine.shutdown()

    got = run(main())
    for prompt, out in zip(prompts, got):
        want = hf_greedy(model, prompt, 16)
        if out != want:
            j = next(k for k, (a, b) in enumerate(zip(out, want)) if a != b)
            margin, _, _ = hf_top2_margin(model, prompt + want[:j])
            pytest.fail(f"{kind}: prompt of {len(prompt)} diverges at {j}: {out[j:]} vs {want[j:]} "
                        f"(transformers' top-2 margin {margin:.2e})")
    # transformers' generate still works on the model afterwards (our attention was only lent)
    assert model.config._attn_implementation != "quantserve_paged"


def test_native_and_generic_paths_agree_on_llama(smollm):
    model, tok = smollm
    prompt = tok.encode("Once upon a time, in a small village by the sea,", add_special_tokens=False)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def one(impl):
        engine = await started(model, tok, num_kv_blocks=64, forward=impl)
        try:
            return (await collect(engine, prompt, params, impl)).token_ids[0]
        finally:
            await engine.shutdown()

    assert run(one("layers")) == run(one("transformers"))
