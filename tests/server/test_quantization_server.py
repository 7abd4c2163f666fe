"""A real `quantserve serve` (the default model, NF4) with --max-model-len auto: the per-layer
quantization report and the summary in /v1/models/{id} (read with the official openai client and
httpx), the 404 for an unknown id, the memory estimate within 5% of /v1/memory, and the refusals
of a server whose settings cannot fit (exit 1 and one line, before the model is loaded)."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from quantserve.server.loading.estimate import EstimateRequest, estimate_memory

from .serving import MODEL, run_serve, start_server


@pytest.fixture(scope="module")
def server(default_model_dir):
    with start_server("--max-model-len", "auto", api_key=None) as srv:  # and --kv-cache-memory 0.25
        yield srv


def test_quantization_report(server, default_model_dir, bnb):
    body = httpx.get(f"{server.url}/v1/models/{MODEL}/quantization", timeout=30).json()
    assert body["object"] == "quantization_report" and body["model"] == MODEL
    layers, summary = body["layers"], body["summary"]
    assert len(layers) == summary["layers"] == 210  # 30 layers x q, k, v, o, gate, up, down
    for layer in layers:
        assert set(layer) >= {"name", "format", "shape", "bits_per_param", "rel_error", "absmax", "outlier_fraction"}
        assert layer["format"] == "nf4" and layer["bits_per_param"] == 4.5 and 0 < layer["rel_error"] < 0.2
        assert len(layer["shape"]) == 2 and layer["absmax"] > 0 and 0 <= layer["outlier_fraction"] < 0.01
    assert summary["format"] == "nf4" and summary["bits_per_param"] == 4.5
    # A layer measured whole (below the stats' sampling size), against bitsandbytes quantizing the
    # checkpoint's own weight and numpy computing the error in float64
    from safetensors import safe_open

    from quantserve.server.loading.quant_stats import SAMPLE_ELEMENTS

    layer = next(x for x in layers if x["shape"][0] * x["shape"][1] <= SAMPLE_ELEMENTS)
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor(layer["name"] + ".weight").float()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref, deq = w.double().numpy(), bnb.functional.dequantize_4bit(packed, state).double().numpy()
    assert layer["rel_error"] == pytest.approx(np.linalg.norm(ref - deq) / np.linalg.norm(ref), rel=1e-4)
    assert layer["absmax"] == pytest.approx(np.abs(ref).max(), rel=1e-6)
    assert summary["rel_error_max"] == max(layer["rel_error"] for layer in layers)
    assert summary["rel_error_mean"] == pytest.approx(sum(layer["rel_error"] for layer in layers) / len(layers))
    # the summary is in the model card too, as the openai client reads it
    card = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0).models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["quantization"] == summary
    with pytest.raises(openai.NotFoundError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0).models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    missing = httpx.get(f"{server.url}/v1/models/no-such-model/quantization", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_estimate_matches_v1_memory_and_auto_context(server, default_model_dir):
    est = estimate_memory(EstimateRequest(model=None, kv_cache_memory=0.25, max_model_len=None))
    memory = httpx.get(f"{server.url}/v1/memory", timeout=30).json()["models"][0]
    assert est.weight_bytes == pytest.approx(memory["weights"]["weight_bytes"], rel=0.05)
    assert est.kv_cache_bytes == pytest.approx(memory["kv_cache"]["bytes_total"], rel=0.05)
    # auto: the model's 8,192 tokens, capped by what the 0.25 GiB cache holds (46,080 bytes a token)
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=30).json()
    assert card["max_model_len"] == min(est.model_max_len, est.kv_cache_tokens) == est.max_model_len
    log = server.log_text()
    assert f"--max-model-len auto: {card['max_model_len']} tokens" in log and "memory estimate: fits" in log


@pytest.mark.parametrize("flags, reason", [
    (["--kv-cache-memory", "100000"], "does not fit: needs"),  # 100,000 GiB of KV cache
    (["--kv-cache-memory", "0.001", "--max-model-len", "4096"], "is more than the KV cache holds"),
])
def test_serve_refuses_what_cannot_fit(default_model_dir, flags, reason):
    done = run_serve("--port", "0", *flags)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("quantserve serve: error: ") and reason in last and "quantserve estimate" in last
    assert "loaded" not in done.stderr  # refused before loading
