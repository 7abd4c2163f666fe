"""A bitsandbytes-saved 8-bit checkpoint of the default model (transformers + bitsandbytes
load_in_8bit, save_pretrained), served by quantserve's engine as stored: its greedy text equals
transformers + bitsandbytes' on the same checkpoint.

The reference is bitsandbytes' dequantized-weight forward (its CPU MatMul8bitFp, which it takes in
training mode; a Linear has no dropout), which the default int8 forward computes to float rounding.
bitsandbytes' eval-mode forward quantizes the activations to int8 (LLM.int8 proper, quantserve's
--int8-activations) and writes different text on two of these three prompts: that is the error the
default removes, so the test also checks the two references differ somewhere (else it would prove
nothing). torch's float32 matmul precision is "highest" here (quantserve serve --matmul-precision
highest); the KV cache float32 as transformers'.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from .engine.helpers import collect, hf_greedy, started

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis in one sentence."]
MAX_NEW = 16


@pytest.fixture(scope="module")
def bnb_saved(default_model_dir, tmp_path_factory):
    """(folder of the bitsandbytes-saved 8-bit checkpoint, transformers' model loaded from it)."""
    import transformers as tf

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("smollm_int8_bnb")
    config = tf.BitsAndBytesConfig(load_in_8bit=True)
    model = tf.AutoModelForCausalLM.from_pretrained(default_model_dir, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(folder)
    del model
    return folder, tf.AutoModelForCausalLM.from_pretrained(folder).eval()  # as stored


def _prompts(tokenizer) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for q in QUESTIONS]


def _engine_greedy(model, tokenizer, prompts) -> list[list[int]]:
    from quantserve.server.engine import SamplingParams

    async def main():
        engine = await started(model, tokenizer, num_kv_blocks=128, enable_prefix_caching=False,
                               max_num_batched_tokens=512, kv_cache_dtype="float32")
        try:
            params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
            return [(await collect(engine, p, params, f"r{i}")).token_ids[0] for i, p in enumerate(prompts)]
        finally:
            await engine.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 600))


@pytest.mark.slow
def test_greedy_text_of_a_bitsandbytes_saved_checkpoint_equals_transformers(bnb_saved):
    import bitsandbytes as bnb

    from quantserve.quant import Linear8bitLt
    from quantserve.server.loading.loader import LoadConfig, load_model

    folder, theirs = bnb_saved
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        result = load_model(LoadConfig(str(folder), progress=False))  # the default request: as stored
        assert result.report.prequantized and result.report.quant.load_in_8bit
        layers = [m for m in result.model.modules() if isinstance(m, Linear8bitLt)]
        assert len(layers) == 210 and not any(m.int8_activations for m in layers)
        tokenizer = result.tokenizer
        prompts = _prompts(tokenizer)
        ours = _engine_greedy(result.model, tokenizer, prompts)
        int8_activations = [hf_greedy(theirs, p, MAX_NEW) for p in prompts]
        for layer in theirs.modules():
            if isinstance(layer, bnb.nn.Linear8bitLt):
                layer.train()  # bitsandbytes' dequantized-weight path
        want = [hf_greedy(theirs, p, MAX_NEW) for p in prompts]
    finally:
        torch.set_float32_matmul_precision(precision)
    for prompt_ours, prompt_want in zip(ours, want):
        # transformers stops at the end token; the engine ignored it and went on.
        assert tokenizer.decode(prompt_ours[: len(prompt_want)]) == tokenizer.decode(prompt_want)
    assert int8_activations != want  # the int8-activation forward writes other text
    assert "Paris" in tokenizer.decode(want[0])
