"""`quantserve serve --quant int8`: the flag and its environment variable, and (slow) a real server
process serving the default model in LLM.int8 to the official openai client."""

from __future__ import annotations

import json

import httpx
import pytest

from quantserve.server.cli import build_parser
from quantserve.server.serve import settings_from_args


def test_serve_takes_quant_int8(monkeypatch):
    args = build_parser().parse_args(["serve", "--quant", "int8"])
    assert settings_from_args(args).quant == "int8"
    monkeypatch.setenv("QUANTSERVE_QUANT", "int8")
    assert settings_from_args(build_parser().parse_args(["serve"])).quant == "int8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quant", "int4"])


def test_load_for_serving_int8_settings(monkeypatch):
    from quantserve.server.config import Settings
    from quantserve.server.loading import loader

    seen = {}
    monkeypatch.setattr(loader, "load_model", lambda config: seen.__setitem__("config", config))
    loader.load_for_serving(Settings(quant="int8"))
    assert seen["config"].quant.load_in_8bit and seen["config"].quant.llm_int8_threshold == 6.0
    assert not seen["config"].quant.llm_int8_activations  # the default: the dequantized-weight matmul
    loader.load_for_serving(Settings(quant="int8", int8_activations=True))
    assert seen["config"].quant.llm_int8_activations


def test_serve_takes_int8_activations(monkeypatch):
    args = build_parser().parse_args(["serve", "--quant", "int8", "--int8-activations"])
    assert settings_from_args(args).int8_activations
    assert not settings_from_args(build_parser().parse_args(["serve", "--quant", "int8"])).int8_activations
    monkeypatch.setenv("QUANTSERVE_INT8_ACTIVATIONS", "true")
    assert settings_from_args(build_parser().parse_args(["serve"])).int8_activations


@pytest.mark.slow
def test_real_server_serves_int8(default_model_dir):
    from .serving import start_server

    with start_server("--quant", "int8") as server:
        client = server.client()
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        # The words themselves are LLM.int8's (tests/server/engine/test_engine_int8.py checks the
        # arithmetic); here: the int8 model is what is served, and it answers.
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens <= 16
        assert "210 layers int8" in server.log_text()
        memory = httpx.get(server.url + "/v1/memory", headers=server.headers(), timeout=10).json()
        weights = memory["models"][0]["weights"]
        assert weights["quantized_layers"] == 210
        # One byte per weight of every projection, from the model's config: q, k, v, o, gate, up, down.
        config = json.loads((default_model_dir / "config.json").read_text())
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
        assert weights["weight_bytes_by_dtype"]["int8"] == config["num_hidden_layers"] * per_layer
