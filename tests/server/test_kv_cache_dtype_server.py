"""--kv-cache-dtype through a real server (a subprocess, as users start it): /v1/memory reports the
resolved dtype and its bytes per token, the budget holds blocks in proportion, the default model
still answers; bad values are refused before anything loads."""

from __future__ import annotations

import httpx
import pytest

from .serving import MODEL, QUESTION, run_serve, start_server

# The default model: 2 (K, V) x 30 layers x 3 KV heads x 64 dims per token, times the dtype's bytes.
ELEMENTS_PER_TOKEN = 2 * 30 * 3 * 64


@pytest.mark.parametrize("flags, dtype, itemsize", [
    ((), "bfloat16", 2),  # auto on a CPU with the native kernel
    (("--kv-cache-dtype", "fp8"), "float8_e4m3fn", 1),  # vLLM's fp8 = e4m3
])
def test_memory_reports_the_cache_dtype(default_model_dir, flags, dtype, itemsize):
    from quantserve.kernels.cpu import paged_attention as native

    if native.load() is None and not flags:
        pytest.skip("no native kernel: auto keeps float32")
    with start_server(*flags) as server:  # --kv-cache-memory 0.25 (GiB)
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=120,
                       json={"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        kv = httpx.get(server.url + "/v1/memory", headers=server.headers(), timeout=30).json()["models"][0]["kv_cache"]
    assert kv["dtype"] == dtype
    assert kv["bytes_per_token"] == ELEMENTS_PER_TOKEN * itemsize
    per_block = 16 * ELEMENTS_PER_TOKEN * itemsize
    assert kv["blocks_total"] == int(0.25 * 2**30 // per_block)  # the budget counts this dtype's bytes
    assert kv["bytes_total"] == kv["blocks_total"] * per_block


def test_bad_value_is_refused_with_the_choices():
    proc = run_serve("--kv-cache-dtype", "int4", timeout=120)
    assert proc.returncode == 2
    assert "--kv-cache-dtype" in proc.stderr and "fp8_e5m2" in proc.stderr and "int4" in proc.stderr


def test_help_says_what_auto_picks():
    proc = run_serve("--help", timeout=120)
    text = " ".join(proc.stdout.split())
    assert "--kv-cache-dtype" in text and "auto picks bfloat16 on a CPU where the native attention kernel runs" in text
