"""`quantserve serve --quantize-lm-head int8|nf4` as a real server process on the default model:
it answers through the official openai client, /v1/memory reports the head as held (format, dtype,
bytes, tied) and the resident weights hold no 16-bit vocabulary matrix; a bad value is refused
before anything loads."""

from __future__ import annotations

import httpx
import pytest

V, K = 49152, 576
HEAD_BYTES = {"int8": V * K + 4 * V, "nf4": V * K // 2 + 4 * (V * K // 64) + 4 * 16}


def test_a_bad_value_is_refused_before_loading():
    from .serving import run_serve

    proc = run_serve("--quantize-lm-head", "q4", timeout=120)
    assert proc.returncode == 2 and "--quantize-lm-head: invalid choice: 'q4'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_real_server_with_a_quantized_head(kind, default_model_dir):
    from .serving import start_server

    with start_server("--quantize-lm-head", kind) as server:
        reply = server.client().chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in reply.choices[0].message.content  # loosely: the head is rounded, the answer stays
        memory = httpx.get(server.url + "/v1/memory", headers=server.headers(), timeout=10).json()
        weights = memory["models"][0]["weights"]
        assert weights["lm_head"] == {"quantization": kind, "dtype": kind, "bytes": HEAD_BYTES[kind], "tied": True}
        # The head's own tensors are what the engine holds (the drop of the resident total against
        # the 16-bit head is asserted in tests/server/engine/test_quantized_head_engine.py).
        if kind == "int8":
            assert weights["weight_bytes_by_dtype"]["int8"] == V * K
        assert f"output head quantized to {kind}" in server.log_text()
