"""--speculative-config through a real server (a subprocess, as users start it): bad configs are
refused before anything loads, naming the problem; an n-gram server answers a copy request with
the plain server's greedy text and counts its drafts in /metrics (vLLM's names)."""

from __future__ import annotations

import httpx
import pytest

from quantserve.server.testing import parse_metrics

from .serving import MODEL, run_serve, start_server

NGRAM = '{"method": "ngram", "num_speculative_tokens": 5}'
COPY = [{"role": "user", "content": "Copy this code exactly:\n\ndef add(a, b):\n    return a + b\n\n\n"
                                    "def sub(a, b):\n    return a - b\n"}]


@pytest.mark.parametrize("text, problem", [
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min (4) is more than prompt_lookup_max (2)"),
    ("{method: ngram}", "not valid JSON"),
])
def test_bad_config_is_refused_at_startup(text, problem):
    proc = run_serve("--speculative-config", text, timeout=120)
    assert proc.returncode == 2  # argparse's status for a refused flag, as every other setting
    assert "--speculative-config" in proc.stderr and problem in proc.stderr


def test_bad_config_from_the_environment_is_refused():
    proc = run_serve(timeout=120, env={"QUANTSERVE_SPECULATIVE_CONFIG": '{"num_speculative_tokens": 2}'})
    assert proc.returncode != 0 and "ngram" in proc.stderr


@pytest.mark.slow
def test_ngram_server_answers_as_the_plain_server(default_model_dir):
    body = {"model": MODEL, "messages": COPY, "max_tokens": 48, "temperature": 0}
    texts = []
    for flags in ((), ("--speculative-config", NGRAM)):
        with start_server("--matmul-precision", "highest", "--kv-cache-dtype", "float32", *flags) as server:
            r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=120, json=body)
            assert r.status_code == 200
            texts.append(r.json()["choices"][0]["message"]["content"])
            assert r.json()["usage"]["completion_tokens"] == 48 or r.json()["choices"][0]["finish_reason"] == "stop"
            metrics = parse_metrics(httpx.get(server.url + "/metrics", headers=server.headers(), timeout=30).text)
    assert texts[1] == texts[0]
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert 0 < metrics["vllm:spec_decode_num_accepted_tokens_total"] <= metrics["vllm:spec_decode_num_draft_tokens_total"]
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos_total"] == metrics[
        "vllm:spec_decode_num_accepted_tokens_total"]


@pytest.mark.slow
def test_missing_draft_model_fails_the_start(default_model_dir, tmp_path):
    proc = run_serve("--kv-cache-memory", "0.25", "--speculative-config",
                     f'{{"model": "{tmp_path / "nothing"}", "num_speculative_tokens": 3}}', timeout=300)
    assert proc.returncode == 1 and "nothing" in proc.stderr
